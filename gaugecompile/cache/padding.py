"""Padded batches: which new tokens of a forward are padding, read from the model's inputs, so none is stored.

transformers batches prompts of unequal length by padding them (`tokenizer(prompts, padding=True)`): the forward
gets a 2D `attention_mask` [rows, past + q] (1 = a real token) and, from `generate()`, `position_ids` that count
each row's real tokens.  A cache sees neither, so `watch_inputs(model)` registers a forward pre-hook that hands
them to the `ManifoldCache` in `past_key_values` before transformers asks it for the mask sizes, which is where
a forward places its tokens (`ManifoldCache` does this for a model it is built from).

Each row then stores its real tokens only, at the positions the model rotated them: its view, positions and frame
are those of the row run alone.  The mask keeps its padded columns (transformers builds the 4D mask from it), so a
forward's tables are laid out in those columns: a run of padding is a run of entries on the pools' padding block,
which is all zeros and never written (`BlockStorage.pad_block`); the rewritten attention drops those entries and
runs the rotated-query kernel on each row's real tokens (`ops.masked_attention`).

A row's new tokens are `[pads] real [pads]` (left padding, right padding, a decode step, a row joining a running
batch): padding between two real tokens of one forward is refused, as are real tokens rotated at positions that are
not consecutive.  A real run that follows padding starts a table entry of its own, so padding always falls between
entries.
"""

from __future__ import annotations

import functools
import gc
import warnings
import weakref
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["RowLayout", "row_layouts", "watch_inputs", "ForwardInputs"]


class ForwardInputs(NamedTuple):
    """What the pre-hook read from a forward's arguments: its rows (so that the bookkeeping before the first layer
    plans them), its 2D `attention_mask` and `position_ids` (None where the model got none)."""

    rows: int | None
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None


class RowLayout(NamedTuple):
    """One row of a forward: its real new tokens (indices [start, start + count) among the q new ones), the position
    the model rotated the first at, whether they start a table entry of their own (padding precedes them), and the
    padded view after the forward as (real, tokens) runs."""

    start: int
    count: int
    position: int
    fresh: bool
    runs: tuple[tuple[bool, int], ...]


def _runs(row: np.ndarray) -> tuple[tuple[bool, int], ...]:
    """Run-length form of a boolean row: ((value, length), ...)."""
    if not row.size:
        return ()
    cuts = np.flatnonzero(row[1:] != row[:-1]) + 1
    starts = np.r_[0, cuts]
    lengths = np.diff(np.r_[starts, row.size])
    return tuple((bool(row[s]), int(n)) for s, n in zip(starts, lengths, strict=True))


def row_layouts(inputs: ForwardInputs, lengths: list[int], view: int, q: int) -> list[RowLayout] | None:
    """Each row's layout in a forward of `q` new tokens per row over a batch whose rows hold `lengths` real tokens,
    or None when the forward has no padding (no 2D mask, or one that marks every column, which holds only where
    every row holds all the columns before the new tokens: checked).

    The mask's columns before the new ones may lay each row's tokens out anew (a scheduler left-pads every step to
    its longest row), as long as each row marks exactly the tokens it holds.  Without `position_ids` the model
    rotates new token i at the cache's `view` length + i, as transformers' models do.  Raises ValueError naming the
    argument when the mask does not fit the cache (its shape, a row's real tokens before the forward, padding between
    a forward's real tokens) or the real tokens' positions are not consecutive.
    """
    mask = inputs.attention_mask
    if mask is None or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    rows = len(lengths)
    if mask.shape[0] != rows or mask.shape[1] < q:
        raise ValueError(f"attention_mask: expected [rows, past + q] with {rows} rows and q = {q}, got "
                         f"{list(mask.shape)}")
    past = mask.shape[1] - q
    real = mask.detach().to("cpu", torch.bool).numpy()
    positions = inputs.position_ids
    if positions is not None and positions.dim() == 2:
        positions = positions.detach().to("cpu", torch.int64).expand(rows, q).numpy()
    else:  # none given (the model rotates at past + i), or a multi-axis form whose rotation is not one position
        positions = None
    layouts = []
    for r, n in enumerate(lengths):
        held = int(real[r, :past].sum())
        if held != n:
            raise ValueError(f"attention_mask: row {r} marks {held} of its first {past} columns as tokens, but the "
                             f"cache holds {n} for it (the mask must keep every earlier column of the batch)")
        new = real[r, past:]
        idx = np.flatnonzero(new)
        start, count = (int(idx[0]), len(idx)) if len(idx) else (0, 0)
        if count and int(idx[-1]) - start + 1 != count:
            raise ValueError(f"attention_mask: row {r} has padding between its new tokens (columns {past + start} to "
                             f"{past + int(idx[-1])}); a forward's new tokens must be [padding] tokens [padding]")
        where = positions[r, start:start + count] if positions is not None else view + np.arange(start, start + count)
        first = int(where[0]) if count else 0
        if count and not np.array_equal(where, first + np.arange(count)):
            raise ValueError(f"position_ids: row {r}'s tokens are rotated at {where.tolist()}; expected consecutive "
                             "positions (generate() passes attention_mask.cumsum(-1) - 1)")
        before = real[r, :past + start]
        fresh = bool(count) and before.size > 0 and not before[-1]
        layouts.append(RowLayout(start, count, first, fresh, _runs(real[r])))
    return None if real.all() else layouts


_WATCHED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
_LOOKED_FOR_WRAPPERS: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def _warn_if_wrapped(model: torch.nn.Module) -> None:
    """Once per model: warn when a `torch.compile` wrapper holds a model whose forward runs eagerly, which is what
    `torch.compile(model).generate(...)` does (generate() calls the model's own forward, not the wrapper's)."""
    if model in _LOOKED_FOR_WRAPPERS:
        return
    _LOOKED_FOR_WRAPPERS.add(model)
    from torch._dynamo.eval_frame import OptimizedModule

    # a wrapper holds the model in its `_modules` dict, which its instance dict holds: look two dicts up
    holders = [h for h in gc.get_referrers(model) if isinstance(h, dict)]
    holders += [o for h in holders for o in gc.get_referrers(h) if isinstance(o, dict)]
    if any(isinstance(o, OptimizedModule) and o._orig_mod is model for h in holders for o in gc.get_referrers(h)):
        warnings.warn(f"{type(model).__name__}: this forward runs uncompiled, though a torch.compile wrapper holds "
                      "the model: generate() on the wrapper calls the model's own forward.  Compile the model in "
                      "place, model.compile(backend='gauge'), for generate() to run compiled", stacklevel=3)


def _hand_inputs(cache_type: type, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: give a cache of `cache_type` in `past_key_values` the forward's mask and positions."""
    cache = kwargs.get("past_key_values")
    if isinstance(cache, cache_type):
        if not torch.compiler.is_compiling():
            _warn_if_wrapped(module)
        first = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        rows = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() >= 2 else None
        cache.expect_inputs(ForwardInputs(rows, kwargs.get("attention_mask"), kwargs.get("position_ids")))


def watch_inputs(model: torch.nn.Module, cache_type: type) -> None:
    """Register (once per model) the pre-hook that hands each forward's `attention_mask` and `position_ids` to the
    cache of `cache_type` (a ManifoldCache, whose `expect_inputs` takes them) it is called with, so padded batches
    store no padding; harmless with any other cache."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if model not in _WATCHED:
        model.register_forward_pre_hook(functools.partial(_hand_inputs, cache_type), with_kwargs=True)
        _WATCHED.add(model)
