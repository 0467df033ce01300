"""Decoding at the precision users run (scenario 10): the gauge backend over the same model in float32, cast to
bfloat16, and with torchao's int8 and int4 weight-only quantization, each beside transformers eager
(DynamicCache) on the same variant, and llama.cpp on GGUF files of the same weights (F16, Q8_0, Q4_0 and the
shipped Q4_1, `gguf_variants`) with f16 and q8_0 KV where llama-cpp-python is installed.

Every variant decodes the same text greedily after prompts of each length; the table gives the median decode step,
the bytes one step reads (weights as stored, tensor subclasses by their inner tensors, plus every layer's K and
V at that length), and how many greedy tokens agree with the float32 gauge run.  The bfloat16 variant is a cast
(`model.to(torch.bfloat16)`, which rounds the rotary buffer: the cache follows the model's basis); its pools are
bfloat16, the other variants' float32.  torchao's int4 weight-only config has no CPU path in 0.18, so the int4 row
is `IntxWeightOnlyConfig(int4)`, which stores int4 values in int8 (bytes as int8, values as int4).
"""

from __future__ import annotations

import copy
import importlib.util
import statistics
from collections.abc import Callable

import torch
from transformers import DynamicCache

from . import llama_cpp
from .decode_loops import gauge_forward, greedy, manifold_cache
from .gguf_variants import weight_type
from .measure import kv_elements, log, ratio, weight_bytes

__all__ = ["PEERS", "VARIANTS", "scenario_precision", "variant"]


def _int8():
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _int4():
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))


#: name -> (dtype the float32 model is cast to, torchao config factory or None)
VARIANTS: dict[str, tuple[torch.dtype, Callable | None]] = {
    "float32": (torch.float32, None),
    "bfloat16": (torch.bfloat16, None),
    "int8 weights": (torch.float32, _int8),
    "int8 weights, bfloat16": (torch.bfloat16, _int8),
    "int4 weights (intx, int8 storage)": (torch.float32, _int4),
}
#: llama.cpp weight type -> the gauge variant it is compared with (closest weight bytes and KV precision)
PEERS = {"F16": "bfloat16", "Q8_0": "int8 weights, bfloat16", "Q4_0": "int4 weights (intx, int8 storage)",
         "Q4_1": "int4 weights (intx, int8 storage)"}


def variant(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """A copy of the float32 `model` as the variant `name` (cast, or quantized with torchao as its users do)."""
    dtype, config = VARIANTS[name]
    copied = copy.deepcopy(model).to(dtype)
    if config is not None:
        from torchao.quantization import quantize_

        quantize_(copied, config())
    return copied.eval()


def _decode(forward, prefill, cache, ids, warm: int, steps: int) -> tuple[float, list[int]]:
    tokens, times = greedy(forward, ids, cache, warm + steps, prefill=prefill)
    return statistics.median(times[1 + warm:]), tokens


def scenario_precision(model, text: Callable[[int], torch.Tensor], ggufs: list | str, quick: bool) -> dict:
    """Scenario 10: `text(n)` gives n token ids of the same text for every variant and length; `ggufs` lists GGUF
    files of the same model (`gguf_variants`; each named `NAME.TYPE.gguf`), or says why llama.cpp cannot run."""
    lengths, steps, warm = ((64,) if quick else (512, 4096)), (4 if quick else 12), 3
    names = [n for n in VARIANTS if VARIANTS[n][1] is None or importlib.util.find_spec("torchao")]
    rows, reference = [], {}
    for name in names:
        log(f"precision: {name}")
        m = variant(model, name)
        eager = m.__class__.forward.__get__(m)
        forward = gauge_forward(m)
        weights, element = weight_bytes(m), m.dtype.itemsize
        for n in lengths:
            ids = text(n)
            with torch.no_grad():
                g_s, g_tok = _decode(forward, eager, manifold_cache(m, max_tokens=n + 64), ids, warm, steps)
                e_s, e_tok = _decode(eager, eager, DynamicCache(config=m.config), ids, warm, steps)
            reference.setdefault(n, g_tok)
            agree = sum(a == b for a, b in zip(g_tok, reference[n], strict=True))
            rows.append(dict(measure=f"decode step, {name}", baseline="transformers eager, same variant", tokens=n,
                             gauge_s=g_s, baseline_s=e_s, ratio=ratio(e_s, g_s),
                             reads_MB=(weights + element * kv_elements(m.config, n)) / 1e6,
                             tokens_as_float32=f"{agree}/{len(g_tok)}", tokens_equal=g_tok == e_tok))
        del m, forward
    if isinstance(ggufs, str):
        log(f"precision: llama.cpp skipped ({ggufs})")
        ggufs = []
    threads = torch.get_num_threads()
    for path in ggufs:
        weights_type = weight_type(path)
        peer_name = PEERS.get(weights_type)
        for kv in llama_cpp.KV_TYPES:
            cpp = llama_cpp.LlamaCppModel(path, n_ctx=max(lengths) + warm + steps + 64, threads=threads, kv=kv)
            for n in lengths:
                log(f"precision: llama.cpp {path.name}, {kv} KV, {n} tokens")
                tokens, times = cpp.decode(text(n)[0].tolist(), warm + steps)
                s = statistics.median(times[warm:])
                peer = next((r["gauge_s"] for r in rows if r["measure"] == f"decode step, {peer_name}"
                             and r["tokens"] == n), None)
                agree = sum(a == b for a, b in zip(tokens, reference[n], strict=True))
                rows.append(dict(measure=f"decode step, llama.cpp {weights_type} weights, {kv} KV",
                                 baseline=f"gauge {peer_name} (ratio: llama.cpp s / gauge s)", tokens=n,
                                 gauge_s=peer, baseline_s=s, ratio=ratio(s, peer) if peer else None,
                                 reads_MB=llama_cpp.bytes_per_token(path, model, n, kv=kv)["llama_cpp"] / 1e6,
                                 tokens_as_float32=f"{agree}/{len(tokens)}", tokens_equal=None))
            del cpp
    return dict(title=f"decode step at the precision users run, after {', '.join(map(str, lengths))} tokens "
                      f"({steps} steps after {warm})", baseline="transformers eager per variant; llama.cpp", rows=rows)
