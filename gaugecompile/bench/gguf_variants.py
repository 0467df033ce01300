"""GGUF files of the benchmark model at the precisions llama.cpp users pick: F16 written from the checkpoint,
Q8_0 and Q4_0 quantized from it by llama.cpp itself, beside the shipped Q4_1 file.

The F16 file is the transformers checkpoint (`model.safetensors`) written in llama.cpp's Llama layout: the shipped
GGUF's metadata (tokenizer, RoPE, norms) copied as it is, each tensor renamed to its GGUF name, 2-D weights in
float16 and norms in float32, and the query and key projections' rows reordered from transformers' rotate-half
pairs (dims i and i + d/2) to llama.cpp's adjacent pairs (dims 2i and 2i + 1), per head, as llama.cpp's own
converter does.  Q8_0 and Q4_0 come from that file through `llama_model_quantize`, so every variant holds the same
weights up to its own rounding.  Files are written once into the user cache and reused.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch

__all__ = ["LAYER_TENSORS", "adjacent_pairs", "gguf_variants", "weight_type", "write_f16"]

#: transformers' per-layer parameter -> llama.cpp's tensor name (under `blk.N.`).
LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_FTYPES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def adjacent_pairs(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q/k projection [heads * d, in] from rotate-half order to adjacent pairs, per head."""
    d = weight.shape[0] // heads
    return weight.reshape(heads, 2, d // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _gguf_name(name: str) -> str:
    """The GGUF name of a transformers Llama parameter (ValueError for one this layout does not know)."""
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")
    if parts[:2] == ["model", "layers"] and parts[-1] == "weight" and ".".join(parts[3:-1]) in LAYER_TENSORS:
        return f"blk.{parts[2]}.{LAYER_TENSORS['.'.join(parts[3:-1])]}.weight"
    raise ValueError(f"checkpoint: no GGUF name for the parameter {name!r} (a Llama-layout model is expected)")


def write_f16(checkpoint: Path, shipped: Path, out: Path) -> Path:
    """Write `out`: the checkpoint's weights in F16 (norms F32) with the metadata of the `shipped` GGUF."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from safetensors.torch import load_file

    reader = GGUFReader(str(shipped))
    arch = reader.fields["general.architecture"].contents()
    heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv_heads = int(reader.fields[f"{arch}.attention.head_count_kv"].contents())
    writer = GGUFWriter(str(out), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            writer.add_key_value(key, 1, GGUFValueType.UINT32)  # mostly F16
            continue
        sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    weights = load_file(str(checkpoint / "model.safetensors"))
    for name, tensor in weights.items():
        array = tensor.to(torch.float32).numpy()
        if name.endswith("q_proj.weight"):
            array = adjacent_pairs(array, heads)
        elif name.endswith("k_proj.weight"):
            array = adjacent_pairs(array, kv_heads)
        writer.add_tensor(_gguf_name(name), array.astype(np.float16 if array.ndim == 2 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _quantize(source: Path, out: Path, kind: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _FTYPES[kind])
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize: {source.name} -> {kind} failed with status {status}")
    return out


def weight_type(gguf: Path) -> str:
    """The weight type a GGUF file is named with, `NAME.TYPE.gguf` (as the shipped file and these are)."""
    return gguf.name.rsplit(".", 2)[-2]


def gguf_variants(checkpoint: Path, shipped: Path, directory: Path) -> list[Path]:
    """The F16, Q8_0 and Q4_0 files of `shipped`'s model (written into `directory` where missing), and `shipped`."""
    stem = shipped.name.rsplit(".", 2)[0]
    f16 = directory / f"{stem}.F16.gguf"
    if not f16.exists():
        write_f16(checkpoint, shipped, f16.with_suffix(".tmp")).rename(f16)
    files = [f16]
    for kind in _FTYPES:
        files.append(directory / f"{stem}.{kind}.gguf")
        if not files[-1].exists():
            _quantize(f16, files[-1].with_suffix(".tmp"), kind).rename(files[-1])
    return [*files, shipped]
