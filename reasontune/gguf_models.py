"""Reading a GGUF file as a plain Hugging Face causal LM: weights dequantised to a float dtype, with its tokenizer.

(torch and transformers are imported only when a file is read: the command line checks a
``--model`` value with this module before it loads anything.)

transformers reads GGUF files (through the ``gguf`` and ``accelerate`` packages, the optional
extra ``reasontune[gguf]``) but marks such a model as quantised, so ``save_pretrained`` refuses
it. ``load_gguf_model`` therefore copies the dequantised weights into a model built from the
same config: what it returns trains, saves and reloads like any Hugging Face model, and its
checkpoints never need the GGUF file again.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
from pathlib import Path
from typing import Any

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file (all versions)
GGUF_PACKAGES = ("gguf", "accelerate")
INSTALL_HINT = "pip install 'reasontune[gguf]'"


def is_gguf_file(name_or_path: str | Path) -> bool:
    """Returns whether a ``--model`` value names a GGUF file (by its suffix; hub ids never end in .gguf)."""
    return str(name_or_path).lower().endswith(GGUF_SUFFIX)


def missing_gguf_packages() -> list[str]:
    """Returns the packages that reading a GGUF file needs and this environment lacks (empty: none)."""
    return [name for name in GGUF_PACKAGES if importlib.util.find_spec(name) is None]


def missing_packages_message(missing: list[str]) -> str:
    """Returns the one-line explanation of missing GGUF packages, naming the extra that installs them."""
    return f"reading a GGUF file needs the {' and '.join(missing)} package{'s' if len(missing) > 1 else ''}: {INSTALL_HINT}"


def require_gguf_packages() -> None:
    """Raises ImportError naming the extra to install when ``gguf`` or ``accelerate`` is missing."""
    missing = missing_gguf_packages()
    if missing:
        raise ImportError(missing_packages_message(missing))


def gguf_file_problem(path: str | Path) -> str | None:
    """Returns what makes ``path`` unreadable as a GGUF file (missing, a directory, another format), or None."""
    path = Path(path).expanduser()
    if not path.exists():
        return "no such file; check the path"
    if not path.is_file():
        return "is not a file; give the .gguf file itself"
    with open(path, "rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        return f"is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})"
    return None


def _dequantising_options() -> dict:
    """Returns the ``from_pretrained`` options that make transformers unpack every GGUF weight to floats.

    Recent transformers may keep GGUF weights packed (custom matmul kernels, not trainable);
    ``GgufConfig(dequantize=True)`` asks for plain tensors. Older versions always dequantise and
    have no such option.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    if "dequantize" not in inspect.signature(GgufConfig.__init__).parameters:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_gguf_tokenizer(path: str | Path):
    """Returns the tokenizer stored in a GGUF file (vocabulary, merges, special tokens and chat template)."""
    from transformers import AutoTokenizer

    require_gguf_packages()
    path = Path(path).expanduser().resolve()
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=str(path))
    except (ValueError, KeyError) as error:  # a tokenizer kind transformers cannot convert
        raise OSError(f"transformers cannot read the tokenizer of {path.name}: {str(error).splitlines()[0]}") from error


def load_gguf_model(path: str | Path, dtype: Any = None, attn_implementation: str = "sdpa"):
    """Returns a plain causal LM holding the GGUF file's weights dequantised to ``dtype``.

    The model is built from the file's config without any quantisation settings and the
    dequantised float32 weights are copied into it (cast to ``dtype``), so ``save_pretrained``
    writes an ordinary directory that ``from_pretrained`` loads without the GGUF. Tied
    embeddings stay tied (one parameter). ``dtype`` is a ``torch.dtype`` (None: float32).
    Dequantising takes tens of seconds for a 135M model on two cores; a line every few seconds
    says it is running.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from reasontune.tracking import Heartbeat

    require_gguf_packages()
    path = Path(path).expanduser().resolve()
    with Heartbeat(f"reading {path.name} and dequantising its weights", every_s=10.0):
        try:
            # float32 whatever ``dtype`` is: the copy below casts once, from the exact dequantised values.
            quantised = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=str(path),
                                                             dtype=torch.float32, **_dequantising_options())
        except (ValueError, KeyError) as error:  # an architecture or tensor type transformers cannot read
            raise OSError(f"transformers cannot read {path.name}: {str(error).splitlines()[0]}") from error
    return plain_model_like(quantised, dtype or torch.float32, attn_implementation)


def plain_model_like(loaded, dtype: Any, attn_implementation: str = "sdpa"):
    """Returns a model of ``loaded``'s architecture without its quantisation marks, holding a copy of its weights in ``dtype``."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._attn_implementation = attn_implementation
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Copied into the new parameters (not assigned): tied embeddings stay one parameter of the new model.
    model.load_state_dict(loaded.state_dict(), strict=True)
    if getattr(loaded, "generation_config", None) is not None:
        model.generation_config = copy.deepcopy(loaded.generation_config)
    return model
