"""The conv and recurrent states of a hybrid model's non-attention layers, kept per sequence beside the block pools.

A linear-attention, SSM or convolution layer summarises every earlier token in a fixed-size state, read and
written once per forward through transformers' Cache API (`get_conv_state`, `update_conv_state`,
`get_recurrent_state`, `update_recurrent_state`), with the semantics of transformers' `LinearAttentionLayer`:
the first forward of a row has no previous state (the getters return None) and its conv input is left-padded
to the kernel width; later ones concatenate the cached conv columns before the new ones and keep the last
kernel-width columns.

Sequences, not rows.  Each state tensor has one row per distinct history; `row_of` maps every live sequence
with a history to its row, so `fork`, `reorder` and beam search alias rows (O(1), no copy) and a forward gathers
its batch's rows.  Committed tensors are never written in place: a forward works on copies (the getters hand
out its batch's rows, which the model may update in place, as transformers' kernels do in a decode step), and
`commit` makes them the new rows.  A snapshot is therefore a copy of two dicts, which is how a failed forward
or edit is undone.

A forward's rows either all continue a history or all start one (a batch that mixes them is refused: the
model runs one code path, prefill or decode, for every row).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812 -- torch's own spelling

__all__ = ["LayerStates", "StatesSnapshot"]

_Key = tuple[int, str, int]  # (layer, "conv" or "recurrent", state index)


class StatesSnapshot(NamedTuple):
    stored: dict
    row_of: dict
    kernel: dict


class LayerStates:
    """Conv/recurrent states of `layers`, per sequence; a forward's working copies between `begin` and `commit`."""

    def __init__(self, layers: tuple[int, ...]) -> None:
        self.layers = layers
        self.stored: dict[_Key, torch.Tensor] = {}  # committed: one row per history
        self.row_of: dict[int, int] = {}  # live sequence -> its row of every stored tensor
        self.kernel: dict[tuple[int, int], int] = {}  # conv kernel width of (layer, state index), from its first write
        self._gather: torch.Tensor | None = None  # the forward's rows (None: the stored order is the batch's)
        self._fresh = True  # the forward's rows start their histories
        self._rows = 0
        self.pending: dict[_Key, torch.Tensor] = {}  # the forward's states, one row per batch row
        self._updated: set[_Key] = set()

    # ----------------------------------------------------------------- snapshots and sequences
    def save(self) -> StatesSnapshot:
        return StatesSnapshot(dict(self.stored), dict(self.row_of), dict(self.kernel))

    def restore(self, saved: StatesSnapshot) -> None:
        self.stored, self.row_of, self.kernel = dict(saved.stored), dict(saved.row_of), dict(saved.kernel)
        self.pending, self._updated = {}, set()

    def alias(self, targets: list[int], sources: list[int]) -> None:
        """Sequence `targets[i]` takes the history of `sources[i]` (fork, reorder): their rows are shared."""
        rows = [self.row_of.get(s) for s in sources]
        for t, r in zip(targets, rows, strict=True):
            if r is None:
                self.row_of.pop(t, None)
            else:
                self.row_of[t] = r

    def drop(self, seq: int) -> None:
        """`seq` is freed (its row goes at the next commit if nothing else refers to it)."""
        self.row_of.pop(seq, None)

    # ----------------------------------------------------------------- a forward
    def begin(self, batch: list[int], carried: dict[_Key, torch.Tensor] | None = None) -> None:
        """Start a forward over the sequences `batch` (row order); ValueError if some have a history and others
        not.  `carried`: the states a fresh forward already wrote before it was re-planned with more rows."""
        with_history = [s for s in batch if s in self.row_of]
        if with_history and len(with_history) != len(batch):
            raise ValueError(
                f"batch: sequences {with_history} continue a recurrent state and "
                f"{[s for s in batch if s not in self.row_of]} start one; a hybrid model runs one path (prefill or "
                "decode) for every row, so a forward's rows must all continue or all start"
            )
        self._fresh, self._rows = not with_history, len(batch)
        rows = [self.row_of[s] for s in with_history]
        identity = rows == list(range(len(rows))) and all(t.shape[0] == len(rows) for t in self.stored.values())
        self._gather = None if self._fresh or identity else torch.tensor(rows, dtype=torch.long)
        self.pending = dict(carried) if carried and self._fresh else {}
        self._updated = set(self.pending)

    def fresh_pending(self) -> dict[_Key, torch.Tensor] | None:
        """What a fresh forward wrote so far (kept when it is re-planned with other rows), or None."""
        return dict(self.pending) if self._fresh and self.pending else None

    def get(self, layer: int, kind: str, index: int) -> torch.Tensor | None:
        """The forward's state (a copy of the batch's rows, which the model may update in place), or None where
        the rows have no previous state."""
        key = (layer, kind, index)
        if key in self.pending:
            return self.pending[key]
        if self._fresh or key not in self.stored:
            return None
        stored = self.stored[key]
        state = stored.clone() if self._gather is None else stored.index_select(0, self._gather.to(stored.device))
        self.pending[key] = state
        return state

    def has_previous(self, layer: int, index: int | None) -> bool:
        """Whether the forward's rows of `layer` have a previous state (its `index`, or any)."""
        keys = set(self.pending) | (set() if self._fresh else set(self.stored))
        return any(k[0] == layer and (index is None or k[2] == index) for k in keys)

    def update_conv(self, layer: int, conv: torch.Tensor, index: int, kernel: int | None) -> torch.Tensor:
        """Cache the last kernel-width columns of the previous conv state followed by `conv` ([rows, ch, q]); return
        the columns the causal convolution needs (transformers' `LinearAttentionLayer.update_conv_state`)."""
        key = (layer, "conv", index)
        self._check_rows("conv_states", conv)
        width = self.kernel.setdefault((layer, index), int(kernel if kernel is not None else conv.shape[-1]))
        previous = self.get(layer, "conv", index)
        if previous is None:
            full = F.pad(conv, (width - conv.shape[-1], 0)) if conv.shape[-1] < width else conv
        else:
            full = torch.cat([previous, conv.to(previous.dtype)], dim=-1)
        self.pending[key] = full[..., -width:].clone()
        self._updated.add(key)
        return full

    def update_recurrent(self, layer: int, state: torch.Tensor, index: int) -> torch.Tensor:
        """Cache a copy of the model's new recurrent state ([rows, ...]) and return it."""
        key = (layer, "recurrent", index)
        self._check_rows("recurrent_states", state)
        self.pending[key] = state.clone()
        self._updated.add(key)
        return self.pending[key]

    def _check_rows(self, name: str, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.dim() < 2:
            raise ValueError(f"{name}: expected a tensor [rows, ...], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not self._fresh and t.shape[0] != self._rows:
            raise ValueError(
                f"{name}: the forward has {t.shape[0]} rows but the cache's batch has {self._rows} sequences with "
                "recurrent states; on a hybrid model open the rows first (fork, reorder_ids or "
                "batch_repeat_interleave), since a state read before the first attention layer has the batch's rows"
            )

    def complete(self, batch: list[int], live: set[int]) -> bool:
        """Whether the forward reached every state with the batch's rows: each stored one read or written (a
        decode step may update a read state in place) or, for rows starting their histories, every layer wrote
        one; and, where other live sequences keep rows, the same states as theirs."""
        if any(t.shape[0] != self._rows for t in self.pending.values()) or self._rows != len(batch):
            return False
        if self._fresh and {k[0] for k in self._updated} != set(self.layers):
            return False
        others = any(s in self.row_of and s not in batch for s in live)
        return set(self.stored) == set(self.pending) if others else set(self.stored) <= set(self.pending)

    def commit(self, batch: list[int], live: set[int]) -> None:
        """Make the forward's states the histories of `batch`; rows of other live sequences are kept, the rest
        dropped."""
        others = sorted({self.row_of[s] for s in live if s in self.row_of and s not in batch})
        keep = torch.tensor(others, dtype=torch.long)
        stored = {}
        for key, state in self.pending.items():
            old = self.stored.get(key)
            stored[key] = state if not others else torch.cat([state, old.index_select(0, keep.to(old.device))])
        remap = {r: len(batch) + i for i, r in enumerate(others)}
        self.row_of = {s: remap[r] for s, r in self.row_of.items() if s in live and s not in batch and r in remap}
        self.row_of.update({s: i for i, s in enumerate(batch)})
        self.stored, self.pending, self._updated = stored, {}, set()
