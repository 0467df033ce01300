"""`OrtCausalLM`: an exported decode step that generates, with transformers' `generate()` over a ManifoldCache.

The host bookkeeping stays the cache's: each forward asks it to place the new tokens (blocks, copy-on-write,
tables, write slots), feeds the file the mapping and the pools (`CacheStep`'s inputs), which the file updates in
place, and commits the forward; a forward that fails rolls back like any other. So greedy search, sampling, beam
search (through `reorder_cache`) and the cache's edits between calls (delete, splice of a prefilled chunk,
set_window streaming) work as with the torch model. Chunks to splice are prefilled with the torch model
(`cache.prefill`), since the file has no entry for a detached forward. The CPU provider by default, with IO
binding: the inputs are read in place and each layer's pool output is bound to the pool itself, so the step's
one ScatterND per pool writes the new tokens' rows and nothing else (no pool is copied, inside onnxruntime or
out; `in_place.py`). The rows a failed step wrote lie in the slots its rollback frees, as in the torch path's
in-place writes. With `fused=True` the gauge nodes run the native kernel (`fused.py`) instead of their
standard-op function.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from transformers import GenerationConfig, GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..cache import ManifoldCache
from .cache_step import require_float_pools
from .in_place import in_place_pool_outputs
from .runtime import checked_feeds

__all__ = ["OrtCausalLM"]

_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


class OrtCausalLM(GenerationMixin):
    """A causal LM whose forward is an exported `CacheStep` run by onnxruntime over a `ManifoldCache`.

    `OrtCausalLM(path, config)` loads a file written by `export_onnx(model, (ids,), path,
    kwargs={"past_key_values": cache})` (or `from_model`); `generate(input_ids, past_key_values=cache, ...)`
    then works as transformers' own.  `config` is the model's config (the cache and generation read it).
    `fused=True` binds the `ai.gauge` nodes to the project's native kernel through onnxruntime-extensions
    (`gaugecompile.onnx.fused`) instead of running their portable function.
    """

    main_input_name = "input_ids"
    _is_stateful = False

    def __init__(self, path: str | os.PathLike[str], config, providers: Sequence[str] | None = None, *,
                 fused: bool = False) -> None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"path: no ONNX file at {path!r}")
        self.config = config
        self.generation_config = GenerationConfig.from_model_config(config)
        if fused:  # the gauge nodes run the project's kernel (onnxruntime-extensions), not their function
            from .fused import fused_copy, fused_session

            path = os.fspath(fused_copy(path))
            self.session = fused_session(path, providers)
        else:
            self.session = ort.InferenceSession(path, providers=list(providers or ["CPUExecutionProvider"]))
        self.path = path  # the file the session runs
        self._check_in_place(path)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        pool = next((i for i in self.session.get_inputs() if i.name.startswith("k_pool")), None)
        if pool is None or len(pool.shape) != 4 or not all(isinstance(d, int) for d in pool.shape[2:]):
            raise ValueError(f"path: expected an exported CacheStep with k_pools inputs [blocks, block_size, kv_heads, "
                             f"head_dim], got {pool.shape if pool is not None else 'none'}")
        self._pool_shape = tuple(pool.shape[2:])  # (kv_heads, head_dim): sizes a fresh cache's pools

    def _check_in_place(self, path: str) -> None:
        """ValueError unless every pool output of the file is its pool input updated by one ScatterND that nothing
        else reads before (what `_run`'s binding of each output to its input's buffer needs)."""
        graph = onnx.load(path, load_external_data=False).graph
        pools = [i.name for i in self.session.get_inputs() if i.name.startswith(("k_pools", "v_pools"))]
        outputs = [o.name for o in self.session.get_outputs()][1:]
        if len(outputs) != len(pools):
            raise ValueError(f"path: expected one pool output per pool input ({len(pools)}), got {len(outputs)}")
        unsafe = sorted(set(pools) - set(in_place_pool_outputs(graph, pools, outputs)))
        if unsafe:
            raise ValueError(f"path: pools {unsafe} are not updated by one ScatterND into their outputs (a file "
                             "export_onnx did not write, or of an older version): export it again")

    @classmethod
    def from_model(cls, model: torch.nn.Module, path: str | os.PathLike[str], *, block_size: int = 16,
                   providers: Sequence[str] | None = None, fused: bool = False) -> OrtCausalLM:
        """Export `model`'s decode step over a ManifoldCache to `path` (two rows and two new tokens, so the file
        serves every batch and query length) and load it."""
        from .export import export_onnx

        example = ManifoldCache(model.config, max_batch_size=2, max_tokens=8 * block_size, block_size=block_size)
        example.new_sequences(2)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            model(input_ids=torch.randint(0, model.config.vocab_size, (2, 3), generator=gen),
                  past_key_values=example, use_cache=True)
        export_onnx(model, (torch.randint(0, model.config.vocab_size, (2, 2), generator=gen),), path,
                    kwargs={"past_key_values": example})
        return cls(path, model.config, providers, fused=fused)

    @classmethod
    def can_generate(cls) -> bool:
        return True

    def is_remote_code(self) -> bool:  # generate() asks: the step is ours, not hub code
        return False

    def get_experts_implementation(self) -> dict:  # generate() asks: no mixture-of-experts kernels to switch
        return {}

    def __call__(self, *args, **kwargs) -> CausalLMOutputWithPast:
        return self.forward(*args, **kwargs)

    def forward(self, input_ids: torch.Tensor, past_key_values: ManifoldCache | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                use_cache: bool = True, **kwargs) -> CausalLMOutputWithPast:
        """One step: the cache places `input_ids` ([rows, q]) after its views, the file runs, the pools it
        returns replace the cache's, the forward commits.  `attention_mask` and `position_ids` are named so that
        generate() builds and slices them as for any causal LM (it feeds only the tokens the cache lacks); the
        step takes its positions and causal mask from the cache (unpadded rows)."""
        cache = past_key_values
        if not isinstance(cache, ManifoldCache):
            raise TypeError(f"past_key_values: expected a gaugecompile ManifoldCache, got {type(cache).__name__}")
        require_float_pools(cache, "past_key_values")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids: expected [rows, q_len], got {got}")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("attention_mask: the exported step runs unpadded rows (each row is a sequence of the "
                             "cache, its causal mask implied); got a mask with padding")
        rows, q = input_ids.shape
        # commits when every pool is written, else rolls back; a fresh cache's pools take the file's shape
        with cache.external_step(rows, q, *self._pool_shape) as step:
            positions = torch.arange(step.length - q, step.length).expand(rows, q)
            inputs = [input_ids, positions, step.block_table, step.block_delta, step.block_lens,
                      step.slots.view(rows, q), torch.empty(0, step.length, dtype=torch.int64), *cache.k_pools,
                      *cache.v_pools]
            feeds = checked_feeds(self.session, [t.detach().cpu() for t in inputs])  # numpy views of the tensors
            logits = self._run(feeds, cache)
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)

    def _run(self, feeds: dict[str, np.ndarray], cache: ManifoldCache) -> torch.Tensor:
        """Run the step with IO binding: inputs read in place, each layer's pool output bound to the cache's pool
        (the feed is a view of it), so the pools are updated in place; returns the logits."""
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        outputs = [o.name for o in self.session.get_outputs()]
        binding.bind_output(outputs[0])
        for name, pool in zip(outputs[1:], [*cache.storage.k_pools, *cache.storage.v_pools], strict=True):
            binding.bind_output(name, "cpu", 0, _NUMPY[pool.dtype], list(pool.shape), pool.data_ptr())
        self.session.run_with_iobinding(binding)
        return torch.from_numpy(binding.get_outputs()[0].numpy())
