"""Transactions over a cache's `HostState`, and the forward in progress: a transaction that spans calls.

Every operation runs inside `transaction()`: the allocator records a journal and the host state is snapshotted,
so one that raises -- also a KeyboardInterrupt -- leaves the cache exactly as it was.  A forward begins at
`begin_forward` (placement and tables, `forward.py`), each attention layer reports with `layer_written`, and it
commits when the last one has (a window is applied then, as part of it).  A forward that fails in between is
rolled back by the next `settle()`, which every cache operation and accessor calls first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch

from .forward import StepMapping, padded_tables, place, tables
from .host import HostSnapshot, HostState, size_carrier
from .padding import ForwardInputs

__all__ = ["Transactions", "Saved", "Forward"]


class Saved(NamedTuple):
    """What a failed operation or forward restores: the host state and the last forward's mapping."""

    host: HostSnapshot
    last_step: StepMapping | None


class Forward(NamedTuple):
    """A forward in progress: what its layers read (tables, the pool slots of the new tokens, the view length
    after it as the size of `sizes`, shape [0, length], so that a compiled graph gets a SymInt, the rows and
    query length it was planned for) and the state to restore if it never reaches its last layer."""

    block_table: torch.Tensor
    block_delta: torch.Tensor
    block_lens: torch.Tensor
    slots: torch.Tensor
    sizes: torch.Tensor
    rows: int
    q: int
    saved: Saved
    inputs: ForwardInputs | None  # the model's mask and positions for it (a replan reads them again)


class Transactions:
    """The transactions of one cache over `host`, whose forwards write `attention_layers` in order."""

    def __init__(self, host: HostState, attention_layers: tuple[int, ...]) -> None:
        self.host = host
        self.attention_layers = attention_layers
        self.forward: Forward | None = None
        self.layers_written = 0  # layers of the forward whose update() ran (all: it has committed)
        self.inputs: ForwardInputs | None = None  # what the model's pre-hook handed over for the next forward
        #: The mapping the most recent forward used (block table, deltas, pool slots written, view length).
        self.last_step: StepMapping | None = None

    @property
    def complete(self) -> bool:
        """Whether the forward in progress has written its last attention layer."""
        return self.layers_written == len(self.attention_layers)

    def save(self) -> Saved:
        return Saved(self.host.save(), self.last_step)

    def restore(self, saved: Saved) -> None:
        self.host.restore(saved.host)
        self.last_step = saved.last_step
        self.forward, self.layers_written = None, 0

    @contextmanager
    def transaction(self) -> Iterator[Saved]:
        """Run a block as one change: on any exception (KeyboardInterrupt too) restore the state before it.

        Nested transactions record into the outer one's journal and restore their own part."""
        self.settle()
        allocator = self.host.allocator
        own = allocator.journal is None
        if own:
            allocator.journal = []
        saved = self.save()
        try:
            yield saved
        except BaseException:
            self.restore(saved)
            raise
        finally:
            if own:
                allocator.journal = None

    def settle(self) -> None:
        """Outside a forward: forget a committed forward, roll back a pending one (it failed or was interrupted).

        A hybrid model's forward has committed once its last attention layer is written and every state layer was
        reached (`LayerStates.complete`); its states become the batch's histories here, outside any graph.  (A
        failure inside the model's last layer, when that is a state layer that updates its states in place, after
        it read them, is not visible to the cache: like one in the final norm, it leaves a completed forward.)"""
        self.inputs = None  # inputs handed over for a forward that never began (it failed before its bookkeeping)
        if self.forward is None:
            return
        host, states = self.host, self.host.states
        live = set(host.seqs)
        if self.complete and (states is None or states.complete(host.batch, live)):
            if states is not None:
                states.commit(host.batch, live)
            self.forward, self.layers_written = None, 0
        else:
            self.restore(self.forward.saved)

    @torch.compiler.disable
    def begin_forward(self, rows: int, q: int, replan: bool = False) -> Forward:
        """Once per forward: place the new tokens (copy-on-write of shared/misaligned last blocks) and build tables.

        Called again by update() (`replan`) when the forward turns out to have other rows than `get_mask_sizes`
        assumed (the first step of beams over a prefilled prompt): the plan made then is rolled back first; the
        states that a hybrid model's layers before it wrote for rows starting their histories are kept.
        """
        host = self.host
        if isinstance(q, bool) or not isinstance(q, int) or q < 1:
            raise ValueError(f"input: a forward needs at least one new token per row, got q_len={q!r}")
        if rows > host.max_batch_size:
            raise ValueError(f"batch: {rows} rows exceed max_batch_size={host.max_batch_size}")
        carried = host.states.fresh_pending() if replan and host.states is not None else None
        inputs = self.forward.inputs if replan else self.inputs
        with self.transaction() as saved:
            slots, layouts, frames = place(host, rows, q, inputs)
            if host.states is not None:
                host.states.begin(host.batch, carried)
            if layouts is None:
                table, delta, lens = tables(host)
                length = host.common_length()
            else:
                table, delta, lens = padded_tables(host, layouts, frames)
                length = sum(n for _, n in layouts[0].runs)
            host.padded = layouts is not None
            self.forward = Forward(table, delta, lens, slots, size_carrier(length), rows, q, saved, inputs)
            self.last_step = StepMapping(table, delta, lens, slots, length)
        self.layers_written = 0
        return self.forward

    def forward_for(self, layer_idx: int, rows: int, q: int) -> Forward:
        """The forward attention layer `layer_idx` writes `rows` x `q` new tokens into: the first attention layer
        begins one (or replans the one `get_mask_sizes` planned, when its rows or length differ); a later layer
        must be the next one the forward expects, with the same rows and length.  Otherwise the forward is settled
        (rolled back) and the error names what was expected."""
        fwd, attention, written = self.forward, self.attention_layers, self.layers_written
        if layer_idx == attention[0] and (fwd is None or written or rows != fwd.rows or q != fwd.q):
            return self.begin_forward(rows, q, replan=fwd is not None and not written)
        if fwd is None or self.complete or layer_idx != attention[written]:
            expected = attention[written if fwd is not None and not self.complete else 0]
            self.settle()
            raise RuntimeError(
                f"layer_idx: update() of layer {layer_idx}, but the forward in progress expects layer {expected} "
                f"(attention layers {list(attention)} run in order; a cache operation or accessor between layers "
                "ends the forward)"
            )
        if rows != fwd.rows or q != fwd.q:
            self.settle()
            raise ValueError(f"key_states: layer {layer_idx} got {rows} rows x {q} tokens, but the forward was "
                             f"planned for {fwd.rows} x {fwd.q} (its first attention layer's input)")
        return fwd

    def check_open(self, layer_idx: int, what: str) -> None:
        """Refuse a state layer's call (`what`) outside a forward's bookkeeping."""
        if self.forward is None or (self.complete and layer_idx < self.attention_layers[-1]):
            raise RuntimeError(f"layer_idx: {what}() of layer {layer_idx} outside a forward's bookkeeping (a forward "
                               "starts with get_mask_sizes, which transformers' masks call before the first layer)")

    def layer_written(self) -> None:
        """An attention layer of the forward has written its tokens; the last one commits it."""
        self.layers_written += 1
        if self.complete:
            self.commit()

    def commit(self) -> None:
        """Commit the forward whose every layer is written: the view takes its length (traced inline under
        torch.compile), or with a window on, `_end_forward` applies it."""
        self.layers_written = len(self.attention_layers)
        if self.host.window is not None:
            self._end_forward()
        else:
            self.host.view_sizes = self.forward.sizes

    @torch.compiler.disable
    def _end_forward(self) -> None:
        """The last layer's commit with a window: apply it as part of the forward (a failure undoes both)."""
        saved, host = self.forward.saved, self.host
        outer = host.allocator.journal
        host.allocator.journal = saved.host.journal
        try:
            for seq in host.batch:
                host.apply_window(seq)
            host.touch()
        except BaseException:
            self.restore(saved)
            raise
        finally:
            host.allocator.journal = outer
