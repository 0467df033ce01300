"""llama.cpp beside the gauge backend on the same GGUF file: a decode step at 4k and a StreamingLLM context shift.

llama.cpp (`llama-cpp-python`, in the `bench` extra; it builds llama.cpp from source on install) is what a CPU
user would pick instead. It runs the file's quantised weights and an f16 KV cache; the gauge side runs the same
checkpoint dequantised to float32 (what `gaugecompile demo` loads), so the two read different bytes per token,
and `bytes_per_token` says how many. Its context shift is `llama_memory_seq_rm` of the oldest tokens after the
kept ones and `llama_memory_seq_add` of minus that count to the rest, which re-ropes every cached key at the next
decode; ManifoldCache's is a `set_window` table edit. Both stream the same text with the same policy: the first
block of 16 tokens kept, the oldest 16-token block evicted when the window is full.
"""

from __future__ import annotations

import importlib.util
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .measure import kv_elements, weight_bytes

__all__ = ["unavailable", "LlamaCppModel", "bytes_per_token", "median_plain_and_shift", "KV_TYPES"]

#: KV cache types llama.cpp is run with (`-ctk/-ctv`) -> llama-cpp-python's ggml type constant.
KV_TYPES = {"f16": "GGML_TYPE_F16", "q8_0": "GGML_TYPE_Q8_0"}
#: Bytes per element of each KV type (q8_0: blocks of 32 int8 values and one f16 scale).
KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32}


# Load the file and decode a few tokens: a build whose kernels do not run on this CPU crashes the process.
_PROBE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, verbose=False)
llm.eval([1, 2, 3, 4])
"""


def unavailable(gguf: Path) -> str | None:
    """Why llama.cpp cannot run `gguf` here (None when it can), asked of a child process first."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install -e \".[bench]\" builds it, minutes on 2 cores)"
    probe = subprocess.run([sys.executable, "-c", _PROBE, str(gguf)], capture_output=True, text=True, timeout=600)
    if probe.returncode == 0:
        return None
    how = f"signal {signal.Signals(-probe.returncode).name}" if probe.returncode < 0 else f"exit {probe.returncode}"
    tail = probe.stderr.strip().splitlines()[-1:] or [""]
    return (f"llama.cpp failed a probe decode of {gguf.name} ({how}{': ' + tail[0] if tail[0] else ''}); rebuild "
            "llama-cpp-python for this CPU (README: 'llama.cpp beside the gauge backend')")


class LlamaCppModel:
    """One llama.cpp context over a GGUF file, driven token by token with its own KV cache (sequence 0)."""

    def __init__(self, gguf: Path, n_ctx: int, threads: int, kv: str = "f16") -> None:
        import llama_cpp

        if kv not in KV_TYPES:
            raise ValueError(f"kv: expected one of {sorted(KV_TYPES)}, got {kv!r}")
        self._lib = llama_cpp
        self.version: str = llama_cpp.__version__
        kv_type = getattr(llama_cpp, KV_TYPES[kv])
        # a quantized V cache needs flash attention in llama.cpp; f16 keeps the default path
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                                   n_threads_batch=threads, logits_all=False, verbose=False, type_k=kv_type,
                                   type_v=kv_type, flash_attn=kv != "f16")
        self.n_vocab = self.llm.n_vocab()
        self._memory = llama_cpp.llama_get_memory(self.llm.ctx)

    def prefill(self, ids: list[int]) -> None:
        """Empty the cache and evaluate `ids` from position 0."""
        self.llm.reset()
        self.llm.eval(ids)

    def step(self, token: int) -> int:
        """Evaluate one token at the next position; the argmax of its logits."""
        self.llm.eval([token])
        logits = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def shift(self, keep: int, discard: int) -> None:
        """Context shift: drop positions [keep, keep + discard) and move the later ones back by `discard` (their
        keys are re-roped at the next decode), as llama.cpp's own context shift does."""
        end = self.llm.n_tokens
        if not 0 <= keep <= keep + discard <= end:
            raise ValueError(f"discard: expected keep + discard <= {end} cached tokens, got keep={keep}, "
                             f"discard={discard}")
        self._lib.llama_memory_seq_rm(self._memory, 0, keep, keep + discard)
        self._lib.llama_memory_seq_add(self._memory, 0, keep + discard, end, -discard)
        self.llm.n_tokens = end - discard

    def decode(self, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
        """Greedy: prefill `ids[:-1]`, then `steps` one-token steps from `ids[-1]`; tokens and seconds per step."""
        self.prefill(ids[:-1])
        token, tokens, times = ids[-1], [], []
        for _ in range(steps):
            start = time.perf_counter()
            token = self.step(token)
            times.append(time.perf_counter() - start)
            tokens.append(token)
        return tokens, times

    def stream(self, ids: list[int], *, keep: int, window: int, block: int) -> tuple[list[float], list[bool]]:
        """Teacher-forced streaming over `ids`: the first `keep + window` tokens prefilled, then one step per token;
        when the cache holds `keep + window + block` tokens, the oldest `block` after the kept ones are shifted
        out before the step. Seconds per step (shift included) and whether each step shifted."""
        self.prefill(ids[: keep + window])
        times, shifted = [], []
        for token in ids[keep + window:]:
            start = time.perf_counter()
            full = self.llm.n_tokens >= keep + window + block
            if full:
                self.shift(keep, block)
            self.step(token)
            times.append(time.perf_counter() - start)
            shifted.append(full)
        return times, shifted


def bytes_per_token(gguf: Path, model: torch.nn.Module, tokens: int, kv: str = "f16") -> dict[str, int]:
    """What one decode step reads at `tokens` of context, each side: weights (llama.cpp: the GGUF's tensors as
    stored; gauge: the parameters as stored, the tied embedding counted once) plus K and V of every layer
    (llama.cpp: `kv`, f16 or q8_0; gauge: the model's dtype)."""
    from gguf import GGUFReader

    elements = kv_elements(model.config, tokens)
    gguf_weights = sum(int(t.n_bytes) for t in GGUFReader(str(gguf)).tensors)
    return dict(llama_cpp=gguf_weights + int(KV_BYTES[kv] * elements),
                gauge=weight_bytes(model) + model.dtype.itemsize * elements)


def median_plain_and_shift(times: list[float], shifted: list[bool]) -> tuple[float, float]:
    """Median seconds of the steps without a shift and of those with one."""
    plain = [t for t, s in zip(times, shifted, strict=True) if not s]
    shifts = [t for t, s in zip(times, shifted, strict=True) if s]
    return statistics.median(plain), statistics.median(shifts) if shifts else float("nan")
