"""Which tokens of a spliced chunk `ManifoldCache.recompute` recomputes: the selection policies.

A chunk prefilled on its own never attended to the context it is spliced into, so its KV differs from a
re-prefill's.  Recomputing a few of its tokens in the new context closes most of that gap:
- "first" (EPIC, ICML'25): the first tokens of the chunk, where attention to the missing context matters
  most (they carry the chunk's attention sinks);
- "deviation" (CacheBlend, EuroSys'25): the tokens whose KV changes most when one cheap probe layer is
  recomputed for every token of the chunk (the layers below it recomputed too), measured there and ranked.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .host import check_int
from .layers import AttentionLayer
from .mapping import SeqMap, plain_copy, seq_pieces, split_at
from .model_basis import check_same_layout

if TYPE_CHECKING:
    from .manifold import ManifoldCache

__all__ = ["POLICIES", "ProbeDone", "RecomputeForward", "check_request", "choose_tokens", "recompute_tokens"]


class ProbeDone(Exception):  # noqa: N818 -- a signal, not an error: the probe forward stops here
    """Raised by a probing recompute forward at its probe layer, with each chosen token's KV deviation there
    (the squared change of its key and value, summed over heads and dims); its transaction undoes the rest."""

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__("probe layer reached")
        self.scores = scores


@dataclass
class RecomputeForward:
    """A recompute forward in progress (`ManifoldCache.recompute`): the row's tables and view length, the pool
    slots of the chosen tokens, each one's block delta in the query's frame (its new key is rotated by minus it
    into its block's frame), the layer at which a probe stops (None: every layer is written), and how many layers
    were written."""

    block_table: torch.Tensor
    block_delta: torch.Tensor
    block_lens: torch.Tensor
    length: int
    slots: torch.Tensor
    token_delta: torch.Tensor
    probe: int | None
    layers_written: int = 0

    def update(self, layer: AttentionLayer, key_states: torch.Tensor, value_states: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """update() during a recompute: the chosen tokens' new K/V, rotated to their blocks' frame, replace the
        cached ones; the row's whole view comes back (a probe stops at its layer with the deviations)."""
        if layer.index != self.layers_written:
            raise RuntimeError(f"layer_idx: update() of layer {layer.index} during a recompute that expects layer "
                               f"{self.layers_written}")
        if key_states.shape[0] != 1 or key_states.shape[2] != self.slots.numel():
            raise ValueError(f"key_states: a recompute of {self.slots.numel()} tokens of one row got "
                             f"{key_states.shape[0]} rows x {key_states.shape[2]} tokens")
        keys, values = layer.stored(key_states, value_states, self.token_delta)
        if layer.index == self.probe:
            k_pool, v_pool = layer.pools
            old_k = k_pool.view(-1, *k_pool.shape[2:])[self.slots]
            old_v = v_pool.view(-1, *v_pool.shape[2:])[self.slots]
            raise ProbeDone(((keys - old_k).double() ** 2).sum((1, 2)) + ((values - old_v).double() ** 2).sum((1, 2)))
        layer.overwrite((keys, None), (values, None), slots=self.slots)
        self.layers_written = layer.index + 1
        k, v = layer.view(self.block_table, self.block_delta, self.block_lens, self.length, key_states.shape[2],
                          key_states.dtype)
        return layer.unpack(k, v, key_states, value_states)

POLICIES = ("first", "deviation")


def check_request(cache: ManifoldCache, model: torch.nn.Module, spans) -> None:
    """Refuse a recompute this code does not do (latent or sliding layers) or malformed `spans`, naming why."""
    if latent := cache.shape.latent_layers:
        raise ValueError(f"model: layers {list(latent)} cache multi-head latent attention; recompute rewrites "
                         "keys and values in place, which it does not do for a latent (not supported yet)")
    if cache.kv_format.scaled:
        raise ValueError(f"cache: its kv_dtype {cache.kv_format.name!r} is quantized once, when a token is written; "
                         "recompute rewrites cached keys and values in place, which it does for float formats only")
    if sliding := cache.shape.sliding_layers:
        raise ValueError(f"model: layers {sliding} have sliding windows; recompute runs its tokens under one "
                         "explicit mask, which would not bound them (not supported yet)")
    if isinstance(spans, tuple) or not isinstance(spans, Sequence) or not spans:
        raise ValueError(f"spans: expected a non-empty list of (start, input_ids) pairs, got {type(spans).__name__}")
    for k, span in enumerate(spans):
        ids = span[1] if isinstance(span, tuple) and len(span) == 2 else None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1 or ids.is_floating_point():
            raise ValueError(f"spans[{k}]: expected a (start, input_ids [1, n] integer tensor) pair")
    if getattr(model, "config", None) is not None:
        check_same_layout(model, cache.shape, cache.layer_ropes)


def choose_tokens(cache: ManifoldCache, model: torch.nn.Module, seq: int, spans, fraction: float, policy: str,
                  probe_layer: int) -> list[list[int]]:
    """Per span, the indices (increasing) of the round(fraction * n) of its n tokens to recompute."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction: expected a number in [0, 1], got {fraction!r}")
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
    layers = cache.shape.num_layers
    if isinstance(probe_layer, bool) or not isinstance(probe_layer, int) or not 0 <= probe_layer < layers:
        raise ValueError(f"probe_layer: expected an int in [0, {layers}), got {probe_layer!r}")
    sizes = [ids.shape[1] for _, ids in spans]
    budgets = [round(fraction * n) for n in sizes]
    if policy == "first" or all(k in (0, n) for k, n in zip(budgets, sizes, strict=True)):
        return [list(range(k)) for k in budgets]
    try:
        recompute_tokens(cache, model, seq, spans, [list(range(n)) for n in sizes], probe=probe_layer)
    except ProbeDone as probe:  # the probe's transaction has undone its writes
        total = probe.scores  # this rank's heads; under tensor parallelism the sum over every rank's heads
        if cache.tensor_parallel is not None:
            total = cache.tensor_parallel.sum(total)
        scores = torch.split(total, sizes)
        return [sorted(torch.topk(s, k).indices.tolist()) for s, k in zip(scores, budgets, strict=True)]
    raise RuntimeError(f"model: its forward did not reach the probe layer {probe_layer}")


def recompute_tokens(cache: ManifoldCache, model: torch.nn.Module, seq: int, spans: Sequence[tuple[int, torch.Tensor]],
                     chosen: list[list[int]], probe: int | None = None) -> None:
    """Run `model` on the chosen tokens of the spans of `seq` at their positions, each seeing the view up to
    itself, writing their new KV into copies of their blocks (`probe`: stop at that layer), as one transaction."""
    host = cache.host
    bs, stored = host.block_size, host.storage.stored
    with cache.transaction():
        m = host.get(seq)
        view, frame = m.length, m.next_logical - m.length
        idx, logical, ids = [], [], []
        for k, ((start, span_ids), picks) in enumerate(zip(spans, chosen, strict=True)):
            check_int(f"spans[{k}] start", start, 0, host.max_position)
            n = span_ids.shape[1]
            before, rest = split_at(seq_pieces(m), start, stored)
            inside, _ = split_at(rest, start + n, stored)
            if inside.tokens != n:
                raise ValueError(f"spans[{k}]: sequence {seq} holds {inside.tokens} of the {n} logical positions "
                                 f"[{start}, {start + n}); expected all of them")
            picks = np.asarray(picks, dtype=np.int64)
            idx.append(before.tokens + picks)  # view index of each chosen token
            logical.append(start + picks)
            ids.append(span_ids[0, picks])
        idx, logical, ids = np.concatenate(idx), np.concatenate(logical), torch.cat(ids)
        if np.unique(idx).size != idx.size:
            raise ValueError("spans: expected spans that do not overlap")
        entry_start = np.cumsum(m.counts) - m.counts
        entry = np.searchsorted(entry_start, idx, side="right") - 1
        affected = np.unique(entry)
        host.allocator.require(len(affected), f"recompute(seq={seq})")
        fresh = host.allocator.allocate(len(affected))
        entries = list(seq_pieces(m))  # one piece per entry
        host.storage.copy_blocks([(int(f), plain_copy(entries[e])) for f, e in zip(fresh, affected, strict=True)])
        blocks = m.blocks.copy()
        blocks[affected] = fresh
        host.allocator.decref(m.blocks[affected])
        host.seqs[seq] = SeqMap(blocks, m.delta, m.counts, m.length, m.next_logical)
        device = host.storage.device
        slots = torch.from_numpy(blocks[entry] * bs + idx - entry_start[entry]).to(device)
        # the model rotates a chosen token at logical L by L - frame; its block stores it at L - delta
        token_delta = torch.from_numpy(m.delta[entry] - frame).to(device)
        table, delta, lens = (torch.from_numpy(t[None]).to(device) for t in (blocks, m.delta - frame, m.counts))
        run = RecomputeForward(table, delta, lens, view, slots, token_delta, probe)
        dtype = model.dtype if isinstance(getattr(model, "dtype", None), torch.dtype) else torch.float32
        visible = torch.arange(view, device=device)[None, :] <= torch.from_numpy(idx).to(device)[:, None]
        mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)
        # only the KV is wanted: skip the head's logits over the chosen tokens where the model allows it
        keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        with cache.recomputing(run), torch.no_grad():
            model(input_ids=ids[None].to(device), position_ids=torch.from_numpy(logical - frame)[None].to(device),
                  attention_mask=mask[None, None], past_key_values=cache, use_cache=True, **keep)
        if run.layers_written != cache.shape.num_layers:
            raise RuntimeError(f"model: its forward did not reach layer {cache.shape.num_layers - 1} "
                               "(the config's last layer)")
