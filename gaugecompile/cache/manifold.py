"""`ManifoldCache`: a transformers Cache whose reorganisations are O(blocks) edits of a block table.

Positions.  `get_seq_length()` is the view length of the batch (the tokens the cache holds per row), as
for any transformers cache, so `generate()` continues after an edit with the ids of the view: the model
rotates each new key at `view + i` and the cache stores it at that *stored* position.  Each sequence
keeps the logical position of its next token; its query "shift" is `sigma_q = next_logical - view`, and a
block whose tokens have `logical = stored + sigma_b` is re-rotated by `delta_b = sigma_b - sigma_q`: the
keys land in the query's frame, where relative positions are the logical ones.  With no edits every
delta is 0.

Transactions.  Every operation validates and plans before it changes anything, and runs inside a
journal (`BlockAllocator.journal`) plus a copy of the host state (tables, batch, view, window), so one
that raises -- also a KeyboardInterrupt -- leaves the cache exactly as it was.  A forward is a
transaction that spans calls: `get_mask_sizes` (or layer 0's `update`) places its tokens, and it commits
when the last layer's `update` returns (a model with more layers than the config undoes it at the first
extra layer; a failure after the last layer, in the final norm or head, leaves a completed forward).  A
forward that fails or is interrupted in between is rolled back by the next call that finds it pending:
any cache operation or accessor, or the next forward's `get_mask_sizes`/`update` (a forward whose
layers never ran is reused as is: it placed tokens only, at the positions the next one gets too).

Layers.  The pools hold the attention layers' keys and values (a multi-head latent attention layer's latent and
RoPE key packed in one row, `KVShape.latent_dims`); a hybrid model's other layers keep their conv/recurrent
states per sequence in `states` (`states.py`), which a forward commits with it (at `_settle`) and which refuses
every edit of the token sequence.

Eagerly `update()` returns `gaugecompile.materialize_kv(...)` of the untouched pools (gather +
re-rotate), so every attention implementation is exact; compiled with the gauge backend that node is
what the passes turn into one rotated-query attention over the pools.

Under torch.compile.  The host bookkeeping of a forward (allocation, copy-on-write, tables) is one
`torch.compiler.disable`d call made from `get_mask_sizes`, which transformers calls before the first
layer, so a compiled forward is: a small graph, the bookkeeping, one graph with every layer's
`materialize_kv` feeding its attention, a small graph.  Lengths reach the graph as tensor sizes (the
view length before and after the forward are the sizes of empty tensors, tables are padded to
power-of-two widths, all marked dynamic), so decode steps do not recompile.  A cache built from the model
learns each forward's rows there from the model's pre-hook (`padding.py`); one built from a config assumes one
row, and a forward with more rows redoes the bookkeeping in update(), inside the layer loop
(`new_sequences(rows)` avoids that).

Padded batches.  With the model's pre-hook, a forward's 2D `attention_mask` says which new tokens are padding:
none is stored, each row keeps its own tokens at the positions the model rotated them, and the forward's tables
are laid out in the mask's padded columns, padding on the pools' zero block (`padding.py`,
`BlockStorage.pad_block`).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
from torch.distributed.device_mesh import DeviceMesh
from transformers.cache_utils import Cache

from ..ops.materialize import materialize_kv
from ..rope import MAX_ABS_DELTA, RopeSpec, accumulation_dtype, delta_cos_sin, rotate
from .chunk import KVChunk
from .mapping import (
    NewBlock,
    Piece,
    Pieces,
    SeqMap,
    consecutive_runs,
    copy_source,
    plain_copy,
    repack,
    seq_pieces,
    split_at,
)
from .padding import ForwardInputs, RowLayout, row_layouts, watch_inputs
from .pool import BlockAllocator
from .rope_config import KVShape, kv_shape_from_config, layer_ropes_from_config, shared_rope
from .states import LayerStates, StatesSnapshot
from .storage import BlockStorage
from .tensor_parallel import TensorParallelSync, agreed, local_edit

__all__ = ["ManifoldCache", "StepMapping"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _Saved(NamedTuple):
    """The host state an operation or a forward restores when it fails (block arrays are never written in
    place, so the maps are copied shallowly; the pools' slots it wrote are unreachable once restored)."""

    seqs: dict[int, SeqMap]
    batch: list[int]
    next_id: int
    view: torch.Tensor
    window: tuple[int, int] | None
    last_step: StepMapping | None
    peak: int
    journal: list[tuple]
    mark: int
    pools: tuple[int, ...]  # the layers whose pools existed (a failed first forward drops the ones it made)
    next_chunk: int
    states: StatesSnapshot | None  # a hybrid model's conv/recurrent states
    padded: bool


class _Forward(NamedTuple):
    """A forward in progress: what its layers read (tables, the pool slots of the new tokens, the view length
    after it as the size of `sizes`, shape [0, length], so that a compiled graph gets a SymInt, the rows and
    query length it was planned for) and the state to restore if it never reaches its last layer."""

    table: torch.Tensor
    delta: torch.Tensor
    lens: torch.Tensor
    slots: torch.Tensor
    sizes: torch.Tensor
    rows: int
    q: int
    saved: _Saved
    inputs: ForwardInputs | None  # the model's mask and positions for it (a replan reads them again)


class _Recompute(NamedTuple):
    """A recompute forward in progress (`ManifoldCache.recompute`): the row's tables and view length, the pool
    slots of the chosen tokens, the rotation (in positions) taking their new keys from the query frame to their
    blocks' frame, and the layer at which a probe stops (None: every layer is written)."""

    table: torch.Tensor
    delta: torch.Tensor
    lens: torch.Tensor
    length: int
    slots: torch.Tensor
    shift: torch.Tensor
    probe: int | None


class ProbeDone(Exception):  # noqa: N818 -- a signal, not an error: the probe forward stops here
    """Raised by a probing recompute forward at its probe layer, with each chosen token's KV deviation there
    (the squared change of its key and value, summed over heads and dims); its transaction undoes the rest."""

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__("probe layer reached")
        self.scores = scores


class StepMapping(NamedTuple):
    """The mapping one forward used (`ManifoldCache.last_step`): what an exported step takes as inputs."""

    block_table: torch.Tensor
    block_delta: torch.Tensor
    block_lens: torch.Tensor
    slots: torch.Tensor
    length: int


def _size_carrier(n: int) -> torch.Tensor:
    """An empty tensor of shape [0, n], marked dynamic in dim 1: a length Dynamo traces as a SymInt."""
    t = torch.empty(0, n)
    torch._dynamo.maybe_mark_dynamic(t, 1)
    return t


def _check_int(name: str, value, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value >= hi):
        kind = {0: "a non-negative int", 1: "a positive int"}.get(lo, f"an int >= {lo}")
        bound = f" below {hi}" if hi is not None else ""
        raise ValueError(f"{name}: expected {kind}{bound}, got {value!r}")


def _empty_tables(rows: int, entries: int) -> np.ndarray:
    """Zeroed [3, rows, width] block table, deltas and counts, the width a power of two >= 2 holding `entries` (a
    table grows by doubling, so decode steps reuse one compiled shape)."""
    return np.zeros((3, rows, 1 << max(1, (entries - 1).bit_length())), dtype=np.int64)


def _largest_rotation(plan, next_logical: int) -> int:
    """The largest |offset| a repacked sequence rotates by: its entries' deltas in the frame of a query at the
    view length (copies keep their sigma, so they rotate nothing)."""
    if not len(plan.sigma):
        return 0
    return int(np.abs(plan.sigma - (next_logical - plan.length)).max())


def _layout(config) -> tuple[tuple[RopeSpec, ...], KVShape]:
    """Per-layer RoPE bases and KV shape of `config`; a config whose structure this code does not understand
    (an attribute it lacks, a per-layer attribute it has) is refused with a ValueError naming it."""
    try:
        return layer_ropes_from_config(config), kv_shape_from_config(config)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 -- any other failure to read the layout is a refusal with its reason
        kind = getattr(config, "model_type", type(config).__name__)
        raise ValueError(f"config: cannot read the KV layout and RoPE of {kind!r} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc


class ManifoldCache(Cache):
    """Block-pool KV cache with fork/reorder/delete/chunk/splice/set_window as block-table edits.

    `max_tokens` is the total number of tokens all sequences and chunks may hold; the pool gets
    `ceil(max_tokens / block_size) + max_batch_size` blocks (room for one partial block per row).
    Rows of a forward are the sequences in `batch` (creation order; `fork` appends, `free` removes);
    a forward with k times as many rows as sequences forks each sequence k times first, so a prompt
    prefilled once is shared by all beams or samples of a later `generate`.

    Logical positions stay below `max_position` (2^31 minus the pool's capacity in tokens), so that every
    block delta stays below the op's bound `gaugecompile.rope.MAX_ABS_DELTA` = 2^31, where angles are exact.

    Each layer's pools are sized by its first `update()`: the KV heads are the model's (a tensor-parallel
    rank's share), the head dim the config's.  Under tensor parallelism pass the group (or the model's
    `DeviceMesh`) as `group`: edits the user calls then take rank `src`'s arguments on every rank, so the
    mapping stays identical while each rank's pools keep its own heads (`tensor_parallel.py`); `check_sync()`
    verifies it.
    """

    is_compileable = False  # generate() must not auto-compile this cache with the default backend

    def __init__(
        self, config, *, max_batch_size: int, max_tokens: int, block_size: int = 16,
        dtype: torch.dtype | None = None, device: torch.device | str | None = None, group=None, src: int = 0,
    ) -> None:
        super().__init__(layers=[])
        if isinstance(config, torch.nn.Module):  # a model: its config, and its forwards hand their masks over
            watch_inputs(config)
            config = config.config
        for name, value in (("max_batch_size", max_batch_size), ("max_tokens", max_tokens),
                            ("block_size", block_size)):
            _check_int(name, value, 1)
        #: Each layer's RoPE basis, read from the model's rotary code: its layer type's, or no rotation for a NoPE
        #: layer (whose keys an edit never re-rotates).
        self.layer_ropes, self.shape = _layout(config)
        #: The layers whose keys and values the pools hold, in the order a forward updates them.
        self.attention_layers = self.shape.attention_layers
        #: A hybrid model's conv/recurrent states of its other layers, per sequence (None: every layer attends).
        self.states = LayerStates(self.shape.state_layers) if self.shape.state_layers else None
        if dtype is None:
            dtype = getattr(config, "dtype", None)
            dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
        if dtype not in _FLOATS:
            raise TypeError(f"dtype: expected a floating dtype {_FLOATS} (keys are rotated in place), got {dtype}")
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        num_blocks = -(-max_tokens // block_size) + max_batch_size
        #: Logical positions stay below this, so every delta (logical - stored - query shift) is below 2^31.
        self.max_position = MAX_ABS_DELTA - num_blocks * block_size
        if self.max_position < 1:
            raise ValueError(f"max_tokens: the pool's {num_blocks * block_size} slots exceed 2^31, got {max_tokens}")
        self.allocator = BlockAllocator(num_blocks)
        self.storage = BlockStorage(
            self.layer_ropes, num_blocks, block_size, dtype, torch.device(device or "cpu"),
        )
        self._seqs: dict[int, SeqMap] = {}
        self._batch: list[int] = []
        self._next_id = 0
        self._view_sizes = torch.empty(0, 0)
        self._padded = False  # the batch's rows sit in a padded view (`padding.py`): its width is kept
        self._inputs: ForwardInputs | None = None  # what the model's pre-hook handed over for the next forward
        self._window: tuple[int, int] | None = None
        self.peak_blocks_in_use = 0
        self._fwd: _Forward | None = None
        self._layers_written = 0  # layers of the forward whose update() ran (all: it has committed)
        self._recomputing: _Recompute | None = None
        self._chunks: weakref.WeakValueDictionary[int, KVChunk] = weakref.WeakValueDictionary()
        self._next_chunk = 0
        if isinstance(group, DeviceMesh):
            group = group.get_group()
        #: The tensor-parallel group this cache's edits are agreed in (None: a single process).
        self.tensor_parallel = TensorParallelSync(group, src) if group is not None else None
        #: The mapping the most recent forward used (block table, deltas, pool slots written, view length).
        self.last_step: StepMapping | None = None

    # ----------------------------------------------------------------- accounting and views
    # Accessors settle first: a forward still pending when the user looks has failed (see the module doc).
    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def free_blocks(self) -> int:
        self._settle()
        return self.allocator.free_blocks

    @property
    def blocks_in_use(self) -> int:
        self._settle()
        return self.allocator.blocks_in_use

    @property
    def bytes_per_block(self) -> int:
        return self.storage.bytes_per_block

    @property
    def sequences(self) -> tuple[int, ...]:
        """Ids of all live sequences."""
        self._settle()
        return tuple(self._seqs)

    @property
    def batch(self) -> tuple[int, ...]:
        """Sequence ids of the rows of the next forward, in row order."""
        self._settle()
        return tuple(self._batch)

    @property
    def window(self) -> tuple[int, int] | None:
        """The StreamingLLM policy (sink, window) applied after every forward, or None."""
        self._settle()
        return self._window

    @property
    def k_pools(self) -> list[torch.Tensor | None]:
        """Per-layer key pools [num_blocks, block_size, kv_heads, head_dim], sized by each layer's first update()
        (None before it): the heads are the model's, e.g. a tensor-parallel rank's share."""
        return self.storage.k_pools

    @property
    def v_pools(self) -> list[torch.Tensor | None]:
        """Per-layer value pools, shaped like `k_pools`."""
        return self.storage.v_pools

    @property
    def rope(self) -> RopeSpec:
        """The RoPE basis every rotating layer shares (what an exported step takes); ValueError for a model whose
        layer types have their own bases (see `layer_ropes`)."""
        return shared_rope(self.layer_ropes)

    def check_sync(self) -> None:
        """Under tensor parallelism: raise RuntimeError if any rank's mapping differs from this one's, naming the
        first sequence (or chunk, or the batch, or the refcounts) that differs; a collective (every rank calls
        it).  One all-reduce of 16 bytes when they agree.  A no-op in a single process."""
        if self.tensor_parallel is not None:
            self.tensor_parallel.check(self)

    def live_chunk(self, chunk_id: int) -> KVChunk | None:
        """The live chunk numbered `chunk_id` (chunks are numbered in creation order, alike on every rank)."""
        chunk = self._chunks.get(chunk_id)
        return chunk if chunk is not None and not chunk.freed else None

    def seq_len(self, seq: int) -> int:
        """Tokens in the view of `seq`."""
        return self._get(seq).length

    def positions(self, seq: int) -> list[int]:
        """Logical position of every token in the view of `seq` (O(tokens); for inspection and tests)."""
        m = self._get(seq)
        out: list[int] = []
        for p in seq_pieces(m):
            out.extend((self.storage.stored[p.phys, p.a:p.b] + p.shift).tolist())
        return out

    def next_position(self, seq: int) -> int:
        """Logical position the next token of `seq` will take."""
        return self._get(seq).next_logical

    def mapping(self, seq: int) -> tuple[list[int], list[int], list[int]]:
        """The table entries of `seq`: (physical blocks, per-entry delta in the frame of the next query, which sits
        at the view length, tokens each entry holds: slots [0, n) of its block)."""
        m = self._get(seq)
        return m.blocks.tolist(), (m.sigma - (m.next_logical - m.length)).tolist(), m.counts.tolist()

    # ----------------------------------------------------------------- transformers Cache API
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The view length of the batch: the tokens every row holds, where the model rotates the next token.

        Read from the size of a tensor, so that a compiled model sees a dynamic SymInt, not a constant; a
        pending forward does not count until its last layer commits it.
        """
        return self._view_sizes.shape[1]

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """(kv_length, kv_offset): the view after the forward, starting at its first key (offset 0); for a
        sliding-window layer, its last W - 1 tokens before the new ones and those (`_window_offset`).

        transformers asks this once per mask before any layer runs, so this is where a forward does its
        host bookkeeping (`_begin_forward`, assuming one row per sequence of the batch): the graph break of
        a compiled model then falls before the layers, and every layer's attention is traced in one graph
        with its `materialize_kv`.  The length comes from a tensor size (a SymInt).
        """
        fwd = self._fwd
        stale = self.states is not None and self.states.pending  # a forward that failed in a state layer
        if fwd is None or self._layers_written or fwd.q != query_length or stale:
            # The rows are the input's when the model's pre-hook handed it over (`padding.watch_inputs`).  Else a
            # fresh cache assumes one (generate() on one prompt), and a forward with more rows redoes the
            # bookkeeping in update(), inside the layer loop (compiled: per-layer graphs from then on).
            inputs = self._inputs
            rows = inputs.rows if inputs is not None and inputs.rows else len(self._batch) or 1
            self._begin_forward(rows, query_length)
        length = self._fwd.sizes.shape[1]
        offset = self._window_offset(layer_idx, length, query_length)
        return length - offset, offset

    def expect_inputs(self, inputs: ForwardInputs) -> None:
        """Take the next forward's rows, 2D attention mask and position ids (the model's forward pre-hook calls this,
        `padding.watch_inputs`): its bookkeeping plans that many rows, and stores no padding token."""
        self._inputs = inputs

    def _window_offset(self, layer_idx: int, length, q) -> int:
        """How many of the first view tokens a sliding layer does not see in a forward of `q` new tokens that ends
        at `length`: it keeps the W - 1 tokens before the new ones, as transformers' sliding-window cache does
        (which also fixes what a model whose mask has no window attends to).  0 for a full-attention layer."""
        window = self.shape.windows[layer_idx]
        return 0 if window is None else max(length - q - window + 1, 0)

    @property
    def is_initialized(self) -> bool:
        return True

    @property
    def is_sliding(self) -> list[bool]:
        """Per layer, whether it has a sliding window (transformers picks each mask's layer from these)."""
        return [w is not None for w in self.shape.windows]

    @property
    def is_linear(self) -> list[bool]:
        """Per layer, whether it keeps only a conv/recurrent state (transformers' linear-attention layers)."""
        return [k == "state" for k in self.shape.kinds]

    @property
    def is_dummy(self) -> list[bool]:
        return [k == "none" for k in self.shape.kinds]

    @property
    def is_croppable(self) -> bool:
        """Whether `crop` can roll tokens back: not through a recurrent state, which keeps no past."""
        return self.states is None

    @property
    def batch_size(self) -> int:
        return len(self._batch) if self._batch else -1

    @local_edit
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.reorder(beam_idx)

    @local_edit
    def batch_repeat_interleave(self, repeats: int) -> None:
        with self._transaction():
            self._repeat_interleave(repeats)

    @local_edit
    def batch_select_indices(self, indices: torch.Tensor) -> None:
        rows = [int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()]
        with self._transaction():
            old = list(self._batch)
            if any(not 0 <= i < len(old) for i in rows):
                raise ValueError(f"indices: expected row indices in [0, {len(old)}), got {rows}")
            self.reorder_ids([old[i] for i in rows])
            for seq in old:
                self.free(seq)

    @local_edit
    def crop(self, tokens_to_remove: int) -> None:
        """Roll back the last `-tokens_to_remove` tokens of every row (transformers' convention: <= 0)."""
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int) or tokens_to_remove > 0:
            raise ValueError(
                f"tokens_to_remove: expected an int <= 0 (minus the tokens to drop), got {tokens_to_remove!r}"
            )
        n = -tokens_to_remove
        if n:
            self._refuse_with_states("crop")
        with self._transaction():
            for seq in self._batch:
                if n > self._seqs[seq].length:
                    raise ValueError(f"tokens_to_remove: sequence {seq} has only {self._seqs[seq].length} tokens")
            for seq in self._batch if n else ():
                m = self._seqs[seq]
                self.delete(seq, self.positions(seq)[m.length - n], m.next_logical)

    @agreed
    def reset(self) -> None:
        """Free every sequence (chunks keep their blocks); a pending forward is dropped first."""
        with self._transaction():
            for seq in list(self._seqs):
                self.free(seq)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new K/V ([batch, kv_heads, q, head_dim]) into the pools; return the materialised view."""
        error = self._kv_error(key_states, value_states, layer_idx)
        if error is not None:  # the forward cannot go on: roll back what it placed, then say why
            if (self._fwd is not None and self._layers_written == len(self.attention_layers)
                    and layer_idx == self.shape.num_layers):
                self._restore(self._fwd.saved)  # the model has more layers than the config: undo its forward too
            self._settle()
            raise error
        if self._recomputing is not None:
            return self._recompute_update(key_states, value_states, layer_idx)
        fwd, attention = self._fwd, self.attention_layers
        if layer_idx == attention[0] and (fwd is None or self._layers_written or key_states.shape[0] != fwd.rows
                                          or key_states.shape[2] != fwd.q):
            replan = fwd is not None and not self._layers_written
            self._begin_forward(key_states.shape[0], key_states.shape[2], replan=replan)
            fwd = self._fwd
        elif fwd is None or self._layers_written == len(attention) or layer_idx != attention[self._layers_written]:
            expected = attention[self._layers_written if fwd is not None and self._layers_written < len(attention)
                                 else 0]
            self._settle()
            raise RuntimeError(
                f"layer_idx: update() of layer {layer_idx}, but the forward in progress expects layer {expected} "
                f"(attention layers {list(attention)} run in order; a cache operation or accessor between layers "
                "ends the forward)"
            )
        elif key_states.shape[0] != fwd.rows or key_states.shape[2] != fwd.q:
            self._settle()
            raise ValueError(
                f"key_states: layer {layer_idx} got {key_states.shape[0]} rows x {key_states.shape[2]} tokens, but "
                f"the forward was planned for {fwd.rows} x {fwd.q} (its first attention layer's input)"
            )
        table, delta, lens, slots, sizes = fwd.table, fwd.delta, fwd.lens, fwd.slots, fwd.sizes
        latent = self.shape.latent_dims[layer_idx]
        if latent is not None:  # one packed row [k_rot | latent] per token: the rotation on the leading rope dims
            key_states, value_states = (torch.cat([value_states, key_states.to(value_states.dtype)], -1),) * 2
        if self.storage.k_pools[layer_idx] is None:
            self._allocate(layer_idx, key_states)
        k_pool, v_pool = self.storage.k_pools[layer_idx], self.storage.v_pools[layer_idx]
        k_flat, v_flat = k_pool.view(-1, *k_pool.shape[2:]), v_pool.view(-1, *v_pool.shape[2:])
        k_flat.index_copy_(0, slots, key_states.transpose(1, 2).reshape(-1, *k_pool.shape[2:]).to(k_pool.dtype))
        if v_pool is not k_pool:
            v_flat.index_copy_(0, slots, value_states.transpose(1, 2).reshape(-1, *v_pool.shape[2:]).to(v_pool.dtype))
        k, v = materialize_kv(k_pool, v_pool, table, delta, self.layer_ropes[layer_idx], sizes.shape[1], lens)
        if offset := self._window_offset(layer_idx, sizes.shape[1], key_states.shape[2]):
            k, v = k[:, :, offset:], v[:, :, offset:]
        self._layers_written += 1
        if layer_idx == attention[-1]:
            self._commit_forward()
        if latent is not None:  # the view's latent (never rotated) and its re-rotated RoPE keys, as the model wrote
            rope_dim = latent[0]
            return k[..., rope_dim:].to(key_states.dtype), k[..., :rope_dim].to(value_states.dtype)
        return k.to(key_states.dtype), v.to(value_states.dtype)

    # ----------------------------------------------------------------- a hybrid model's states (transformers' API)
    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        """The batch's conv state of state layer `layer_idx`, or None for rows starting their histories."""
        return self._forward_states(layer_idx, "get_conv_state").get(layer_idx, "conv", state_idx)

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                          **kwargs) -> torch.Tensor:
        """Cache the new conv columns ([rows, channels, q]); return the previous ones followed by them."""
        states = self._forward_states(layer_idx, "update_conv_state")
        return states.update_conv(layer_idx, conv_states, state_idx, kwargs.get("conv_kernel_size"))

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        """The batch's recurrent state of state layer `layer_idx`, or None for rows starting their histories."""
        return self._forward_states(layer_idx, "get_recurrent_state").get(layer_idx, "recurrent", state_idx)

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                               **kwargs) -> torch.Tensor:
        """Cache the new recurrent state ([rows, ...]) of state layer `layer_idx`."""
        return self._forward_states(layer_idx, "update_recurrent_state").update_recurrent(
            layer_idx, recurrent_states, state_idx)

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        """Whether the forward's rows of state layer `layer_idx` (default: the last one) continue a history."""
        if layer_idx is None and self.states is not None:
            layer_idx = self.states.layers[-1]
        states = self._forward_states(layer_idx, "has_previous_state")
        return states.has_previous(layer_idx, state_idx)

    def is_recording_past(self, layer_idx: int) -> bool:
        """Never: a state keeps no past tokens here (`crop` of a hybrid model is refused)."""
        return False

    def activate_past_recording(self) -> None:
        """Refused for a hybrid model (assisted generation rolls tokens back, which a recurrent state cannot)."""
        self._refuse_with_states("activate_past_recording")

    def _forward_states(self, layer_idx, what: str) -> LayerStates:
        """The states a state layer's call of the forward in progress works on (checks the call)."""
        if self.states is None:
            raise ValueError(f"layer_idx: {what}() on a cache whose model has no state layers (every layer attends)")
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx not in self.states.layers:
            raise ValueError(f"layer_idx: expected a state layer {list(self.states.layers)} (linear attention, SSM "
                             f"or convolution), got {layer_idx!r}")
        done = self._fwd is not None and self._layers_written == len(self.attention_layers)
        if self._fwd is None or (done and layer_idx < self.attention_layers[-1]):
            raise RuntimeError(f"layer_idx: {what}() of layer {layer_idx} outside a forward's bookkeeping (a forward "
                               "starts with get_mask_sizes, which transformers' masks call before the first layer)")
        return self.states

    @agreed
    def recompute(self, model: torch.nn.Module, seq: int, spans: Sequence[tuple[int, torch.Tensor]],
                  fraction: float = 1.0, policy: str = "first", probe_layer: int = 1) -> list[int]:
        """Recompute in their current context the KV of a part of the tokens of `seq` and write it in place of the
        cached KV; return the logical positions recomputed.

        `spans`: (start, input_ids [1, n]) pairs, the tokens at logical [start, start + n) and their ids (e.g.
        the chunks just spliced there).  `fraction` of each span's tokens are chosen by `policy`: "first", its
        first tokens (EPIC), or "deviation", the tokens whose KV changes most when layer `probe_layer` is
        recomputed for every token of the spans (CacheBlend's selection; the probe costs probe_layer + 1 layers).
        All chosen tokens run in one forward; each attends, layer by layer, to every token before it in the view
        (recomputed ones with their new KV), as in a prefill of the whole view, and the others keep their KV.  So
        `fraction=1.0` over the tokens from some position to the end of the view is a prefill of them in their
        context, and `fraction=0` changes nothing.  Blocks holding chosen tokens are copied first (shared
        blocks and chunks' stay as they were): the cost is one forward of the chosen tokens plus O(their
        blocks) copies.  Like every operation it is a transaction.
        """
        from .recompute import choose_tokens

        self._refuse_with_states("recompute")
        if latent := self.shape.latent_layers:
            raise ValueError(f"model: layers {list(latent)} cache multi-head latent attention; recompute rewrites "
                             "keys and values in place, which it does not do for a latent (not supported yet)")
        self._settle()
        if sliding := self.shape.sliding_layers:
            raise ValueError(f"model: layers {sliding} have sliding windows; recompute runs its tokens under one "
                             "explicit mask, which would not bound them (not supported yet)")
        if isinstance(spans, tuple) or not isinstance(spans, Sequence) or not spans:
            raise ValueError(f"spans: expected a non-empty list of (start, input_ids) pairs, got "
                             f"{type(spans).__name__}")
        for k, span in enumerate(spans):
            ids = span[1] if isinstance(span, tuple) and len(span) == 2 else None
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1 or ids.is_floating_point():
                raise ValueError(f"spans[{k}]: expected a (start, input_ids [1, n] integer tensor) pair")
        if getattr(model, "config", None) is not None:
            self._check_model_config(model.config)
        chosen = choose_tokens(self, model, seq, spans, fraction, policy, probe_layer)
        if any(chosen):
            self._recompute_tokens(model, seq, spans, chosen)
        return [start + i for (start, _), picks in zip(spans, chosen, strict=True) for i in picks]

    def _recompute_tokens(self, model: torch.nn.Module, seq: int, spans: Sequence[tuple[int, torch.Tensor]],
                          chosen: list[list[int]], probe: int | None = None) -> None:
        """Run `model` on the chosen tokens of the spans of `seq` at their positions, each seeing the view up to
        itself, writing their new KV into copies of their blocks (`probe`: stop at that layer)."""
        bs = self.block_size
        with self._transaction():
            m = self._get(seq)
            view, sq = m.length, m.next_logical - m.length
            idx, logical, ids = [], [], []
            for k, ((start, span_ids), picks) in enumerate(zip(spans, chosen, strict=True)):
                _check_int(f"spans[{k}] start", start, 0, self.max_position)
                n = span_ids.shape[1]
                before, rest = split_at(seq_pieces(m), start, self.storage.stored)
                inside, _ = split_at(rest, start + n, self.storage.stored)
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
            self.allocator.require(len(affected), f"recompute(seq={seq})")
            fresh = self.allocator.allocate(len(affected))
            entries = list(seq_pieces(m))  # one piece per entry
            self.storage.copy_blocks([(int(f), plain_copy(entries[e])) for f, e in zip(fresh, affected, strict=True)])
            blocks = m.blocks.copy()
            blocks[affected] = fresh
            self.allocator.decref(m.blocks[affected])
            self._seqs[seq] = SeqMap(blocks, m.sigma, m.counts, m.length, m.next_logical)
            device = self.storage.device
            slots = torch.from_numpy(blocks[entry] * bs + idx - entry_start[entry]).to(device)
            # the model rotates a chosen token at logical L by L - sq; its block stores it at L - sigma
            shift = torch.from_numpy(sq - m.sigma[entry]).to(device)
            table, delta, lens = (torch.from_numpy(t[None]).to(device) for t in (blocks, m.sigma - sq, m.counts))
            self._recomputing = _Recompute(table, delta, lens, view, slots, shift, probe)
            self._layers_written = 0
            dtype = model.dtype if isinstance(getattr(model, "dtype", None), torch.dtype) else torch.float32
            visible = torch.arange(view, device=device)[None, :] <= torch.from_numpy(idx).to(device)[:, None]
            mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)
            # only the KV is wanted: skip the head's logits over the chosen tokens where the model allows it
            keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
            try:
                with torch.no_grad():
                    model(input_ids=ids[None].to(device), position_ids=torch.from_numpy(logical - sq)[None].to(device),
                          attention_mask=mask[None, None], past_key_values=self, use_cache=True, **keep)
                if self._layers_written != self.shape.num_layers:
                    raise RuntimeError(f"model: its forward did not reach layer {self.shape.num_layers - 1} "
                                       "(the config's last layer)")
            finally:
                self._recomputing, self._layers_written = None, 0

    def _recompute_update(self, key_states: torch.Tensor, value_states: torch.Tensor,
                          layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """update() during a recompute: the chosen tokens' new K/V, rotated to their blocks' frame, replace
        the cached ones; the row's whole view comes back (a probe stops at its layer with the deviations)."""
        r = self._recomputing
        if layer_idx != self._layers_written:
            raise RuntimeError(f"layer_idx: update() of layer {layer_idx} during a recompute that expects layer "
                               f"{self._layers_written}")
        if key_states.shape[0] != 1 or key_states.shape[2] != r.slots.numel():
            raise ValueError(f"key_states: a recompute of {r.slots.numel()} tokens of one row got "
                             f"{key_states.shape[0]} rows x {key_states.shape[2]} tokens")
        k_pool, v_pool = self.storage.k_pools[layer_idx], self.storage.v_pools[layer_idx]
        k_flat, v_flat = k_pool.view(-1, *k_pool.shape[2:]), v_pool.view(-1, *v_pool.shape[2:])
        rope = self.layer_ropes[layer_idx]
        keys = key_states[0].transpose(0, 1)  # [k, Hkv, D]
        if not rope.is_identity:  # a NoPE layer's keys are stored as the model wrote them
            cos, sin = delta_cos_sin(r.shift, rope.inv_freq, accumulation_dtype(k_pool.dtype))
            keys = rotate(keys.to(cos.dtype), cos[:, None], sin[:, None], rope.rotary_dim, rope.interleaved)
        keys = keys.to(k_pool.dtype)
        values = value_states[0].transpose(0, 1).to(v_pool.dtype)
        if layer_idx == r.probe:
            old_k, old_v = k_flat[r.slots], v_flat[r.slots]
            raise ProbeDone(((keys - old_k).double() ** 2).sum((1, 2)) + ((values - old_v).double() ** 2).sum((1, 2)))
        k_flat.index_copy_(0, r.slots, keys)
        v_flat.index_copy_(0, r.slots, values)
        self._layers_written = layer_idx + 1
        k, v = materialize_kv(k_pool, v_pool, r.table, r.delta, rope, r.length, r.lens)
        return k.to(key_states.dtype), v.to(value_states.dtype)

    def _kv_error(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int) -> Exception | None:
        """Why K/V do not fit the pools, or None (static checks: guards, not run-time work, under torch.compile)."""
        layers = self.shape.num_layers
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < layers:
            return ValueError(f"layer_idx: expected an int in [0, {layers}) (the config's layers), got {layer_idx!r}")
        dim = self.shape.head_dims[layer_idx]
        if (latent := self.shape.latent_dims[layer_idx]) is not None:
            return self._latent_error(key_states, value_states, layer_idx, latent)
        if "attention" not in self.shape.kinds[layer_idx]:
            return ValueError(f"layer_idx: layer {layer_idx} is a {self.shape.kinds[layer_idx]} layer (no keys and "
                              f"values); the attention layers are {list(self.attention_layers)}")
        pool = self.storage.k_pools[layer_idx]
        if pool is None:  # its first update sizes the pools: any number of heads, the head dim the basis has
            heads, where = "kv_heads", "the head dim the cache's RoPE basis was read with"
        else:
            heads, where = pool.shape[2], f"layer {layer_idx}'s pools, sized by its first update"
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if (not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[3] != dim or t.shape[1] < 1
                    or (pool is not None and t.shape[1] != heads)):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                return ValueError(f"{name}: expected [batch, {heads}, q_len, head_dim={dim}] ({where}), got {got}")
            if (error := self._storage_error(name, t)) is not None:
                return error
        if value_states.shape != key_states.shape:
            return ValueError(
                f"value_states: expected key_states' shape {tuple(key_states.shape)}, got {tuple(value_states.shape)}"
            )
        return None

    def _latent_error(self, latent_states, rope_states, layer_idx: int, dims: tuple[int, int]) -> Exception | None:
        """Why a latent layer's update(latent [batch, 1, q, R], k_rot [batch, 1, q, r]) does not fit, or None."""
        rope_dim, rank = dims
        for name, t, width, what in (("key_states", latent_states, rank, "latent"),
                                     ("value_states", rope_states, rope_dim, "RoPE key")):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != 1 or t.shape[3] != width:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                return ValueError(f"{name}: layer {layer_idx} caches multi-head latent attention, expected [batch, 1, "
                                  f"q_len, {width}] (the {what}), got {got}")
            if (error := self._storage_error(name, t)) is not None:
                return error
        if latent_states.shape[:3] != rope_states.shape[:3]:
            return ValueError(f"value_states: expected key_states' batch and length {tuple(latent_states.shape[:3])}, "
                              f"got {tuple(rope_states.shape[:3])}")
        return None

    def _storage_error(self, name: str, t: torch.Tensor) -> Exception | None:
        """Why `t` cannot be stored in the pools (its dtype or device), or None."""
        if t.dtype not in _FLOATS:
            return TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
        if t.device != self.storage.device:
            return ValueError(f"{name}: expected device {self.storage.device} (the pools'), got {t.device}")
        return None

    # ----------------------------------------------------------------- transactions
    def _save(self) -> _Saved:
        journal = self.allocator.journal
        return _Saved(
            {s: SeqMap(m.blocks, m.sigma, m.counts, m.length, m.next_logical) for s, m in self._seqs.items()},
            list(self._batch), self._next_id, self._view_sizes, self._window, self.last_step,
            self.peak_blocks_in_use, journal, len(journal), self.storage.allocated, self._next_chunk,
            self.states.save() if self.states is not None else None, self._padded,
        )

    def _restore(self, saved: _Saved) -> None:
        self.allocator.undo(saved.journal[saved.mark:])
        del saved.journal[saved.mark:]
        self._seqs, self._batch, self._next_id = saved.seqs, saved.batch, saved.next_id
        self._view_sizes, self._window, self.last_step = saved.view, saved.window, saved.last_step
        self.peak_blocks_in_use, self._next_chunk, self._padded = saved.peak, saved.next_chunk, saved.padded
        self.storage.release(tuple(i for i in self.storage.allocated if i not in saved.pools))
        if self.states is not None:
            self.states.restore(saved.states)
        self._fwd, self._layers_written = None, 0

    @contextmanager
    def _transaction(self) -> Iterator[_Saved]:
        """Run a block as one change: on any exception (KeyboardInterrupt too) restore the state before it.

        Nested transactions record into the outer one's journal and restore their own part."""
        self._settle()
        own = self.allocator.journal is None
        if own:
            self.allocator.journal = []
        saved = self._save()
        try:
            yield saved
        except BaseException:
            self._restore(saved)
            raise
        finally:
            if own:
                self.allocator.journal = None

    def _settle(self) -> None:
        """Outside a forward: forget a committed forward, roll back a pending one (it failed or was interrupted).

        A hybrid model's forward has committed once its last attention layer is written and every state layer was
        reached (`LayerStates.complete`); its states become the batch's histories here, outside any graph.  (A
        failure inside the model's last layer, when that is a state layer that updates its states in place, after
        it read them, is not visible to the cache: like one in the final norm, it leaves a completed forward.)"""
        self._inputs = None  # inputs handed over for a forward that never began (it failed before its bookkeeping)
        if self._fwd is None:
            return
        states, live = self.states, set(self._seqs)
        if self._layers_written == len(self.attention_layers) and (
                states is None or states.complete(self._batch, live)):
            if states is not None:
                states.commit(self._batch, live)
            self._fwd, self._layers_written = None, 0
        else:
            self._restore(self._fwd.saved)

    # ----------------------------------------------------------------- forward bookkeeping (host)
    @torch.compiler.disable
    def _begin_forward(self, rows: int, q: int, replan: bool = False) -> None:
        """Once per forward: place the new tokens (copy-on-write of shared/misaligned last blocks) and build tables.

        Called again by update() (`replan`) when the forward turns out to have other rows than `get_mask_sizes`
        assumed (the first step of beams over a prefilled prompt): the plan made then is rolled back first; the
        states that a hybrid model's layers before it wrote for rows starting their histories are kept.
        """
        if isinstance(q, bool) or not isinstance(q, int) or q < 1:
            raise ValueError(f"input: a forward needs at least one new token per row, got q_len={q!r}")
        if rows > self.max_batch_size:
            raise ValueError(f"batch: {rows} rows exceed max_batch_size={self.max_batch_size}")
        carried = self.states.fresh_pending() if replan and self.states is not None else None
        inputs = self._fwd.inputs if replan else self._inputs
        with self._transaction() as saved:
            slots, layouts, frames = self._place(rows, q, inputs)
            if self.states is not None:
                self.states.begin(self._batch, carried)
            if layouts is None:
                table, delta, lens = self._tables()
                length = self._common_length()
            else:
                table, delta, lens = self._padded_tables(layouts, frames)
                length = sum(n for _, n in layouts[0].runs)
            self._padded = layouts is not None
            self._fwd = _Forward(table, delta, lens, slots, _size_carrier(length), rows, q, saved, inputs)
            self.last_step = StepMapping(table, delta, lens, slots, length)
        self._layers_written = 0

    def _place(self, rows: int, q: int, inputs: ForwardInputs | None
               ) -> tuple[torch.Tensor, list[RowLayout] | None, list[int]]:
        """Open the rows, allocate (and copy-on-write) the blocks the new tokens of each row go to, grow the
        views; return the flat pool slots of the q new tokens of each row, row-major (a padding token's is a slot
        of the trash block), each row's layout (None: no padding) and its query frame (logical - rotated position).

        New tokens fill the free slots of a row's last block when only that entry refers to it, its sigma is the
        new tokens' and no padding lies between them (else its tokens are copied to a fresh block first, or the
        new ones start a fresh block), then fresh blocks."""
        if not self._batch:
            self._batch = [self._new_seq(SeqMap()) for _ in range(rows)]
        elif rows != len(self._batch):
            if rows % len(self._batch):
                raise ValueError(
                    f"batch: the forward has {rows} rows but the cache has {len(self._batch)} sequences in its batch "
                    "(expected the same number or a multiple of it)"
                )
            self._repeat_interleave(rows // len(self._batch))
        layouts = None
        if inputs is not None:
            lengths = [self._seqs[s].length for s in self._batch]
            layouts = row_layouts(inputs, lengths, self._view_sizes.shape[1], q)
        if layouts is None:
            if self._padded and (inputs is None or inputs.attention_mask is None):
                raise ValueError("attention_mask: the batch's rows are padded (a view of "
                                 f"{self._view_sizes.shape[1]} columns); expected the 2D mask that pads them")
            view = self._common_length()
            layouts = [RowLayout(0, q, view, False, ()) for _ in self._batch]
            padded = None
        else:
            if self._window is not None:
                raise ValueError("attention_mask: a padded batch under set_window (the window keeps each row's "
                                 "blocks by its own tokens, the mask's columns would no longer match)")
            padded = layouts
        bs = self.block_size
        plans, needed, frames = [], 0, []
        for seq, lay in zip(self._batch, layouts, strict=True):
            m, k = self._seqs[seq], lay.count
            if m.next_logical + k > self.max_position:
                raise ValueError(f"input: sequence {seq} would pass logical position max_position={self.max_position}")
            sq = m.next_logical - lay.position if k else m.next_logical - m.length
            frames.append(sq)
            r = int(m.counts[-1]) % bs if len(m.counts) and not lay.fresh else 0  # a last block with room left
            cow = r > 0 and (self.allocator.refcount[m.blocks[-1]] > 1 or m.sigma[-1] != sq)
            fresh = -(-(r + k) // bs) - (1 if r else 0)
            plans.append((seq, m, sq, r, cow, fresh, lay))
            needed += fresh + cow
        self.allocator.require(needed, f"appending {q} tokens to {rows} sequences")

        copies: list[tuple[int, NewBlock]] = []
        released: list[int] = []  # released after the copies read them
        slots: list[np.ndarray] = []
        trash = self.storage.trash_block * bs
        for seq, m, sq, r, cow, fresh, lay in plans:
            q_row = lay.count
            blocks, sigma, counts = m.blocks, m.sigma, m.counts  # new arrays below: never written in place
            if cow:
                old = int(blocks[-1])
                (new,) = self.allocator.allocate(1)
                copies.append((new, NewBlock(None, sq, r, (Piece(old, 0, r, int(sigma[-1])),))))
                blocks, sigma = np.append(blocks[:-1], new), np.append(sigma[:-1], sq)
                released.append(old)
            if fresh:
                blocks = np.concatenate((blocks, self.allocator.allocate(fresh)))
                sigma = np.concatenate((sigma, np.full(fresh, sq, dtype=np.int64)))
            row_slots = np.full(q, trash, dtype=np.int64)  # padding tokens go to the trash block
            if q_row:  # the new tokens continue the last block (from slot r) and fill the fresh ones
                first = len(counts) - (1 if r else 0)
                pos = r + np.arange(q_row)
                phys, offset = blocks[first + pos // bs], pos % bs
                filled = np.bincount(pos // bs)  # new tokens per entry they go to
                filled[0] += r
                counts = np.concatenate((counts[:first], filled))
                row_slots[lay.start:lay.start + q_row] = phys * bs + offset
                self.storage.stored[phys, offset] = lay.position + np.arange(q_row)
            slots.append(row_slots)
            self._seqs[seq] = SeqMap(blocks, sigma, counts, m.length + q_row, m.next_logical + q_row)
        self.storage.copy_blocks(copies)
        self.allocator.decref(released)
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.allocator.blocks_in_use)
        return torch.from_numpy(np.concatenate(slots)).to(self.storage.device), padded, frames

    def _allocate(self, layer_idx: int, key_states: torch.Tensor) -> None:
        """A layer's first update: its pools take the heads of the keys the model hands it.  Traced inline under
        torch.compile (Dynamo replays the store after the graph): a graph break here would split the layer's
        rotated query from its attention, and the site could not be rewritten."""
        self.storage.allocate(layer_idx, key_states.shape[1], key_states.shape[3],
                              packed=self.shape.latent_dims[layer_idx] is not None)

    @contextmanager
    def external_step(self, rows: int, q: int, kv_heads: int, head_dim: int) -> Iterator[StepMapping]:
        """A forward run outside this process's layers (an exported step in onnxruntime): place `q` new tokens
        per row and yield the mapping they use; the caller writes every layer's pools, and the forward commits
        when the block exits, or rolls back if it raises.  Layers not sized yet get pools of `kv_heads` x
        `head_dim` (the step's, as the file declares them)."""
        self._refuse_with_states("external_step")
        if latent := self.shape.latent_layers:
            raise ValueError(f"external_step: layers {list(latent)} cache multi-head latent attention in packed "
                             "pools, which an exported step does not write")
        self._begin_forward(rows, q)
        try:
            for layer in self.attention_layers:
                if self.storage.k_pools[layer] is None:
                    self.storage.allocate(layer, kv_heads, head_dim)
            yield self.last_step
        except BaseException:
            self._settle()  # its layers never reported: the pending forward is rolled back
            raise
        self._layers_written = len(self.attention_layers)
        self._commit_forward()

    def _commit_forward(self) -> None:
        """The forward commits once its last layer is written: the view takes its length (traced inline under
        torch.compile), or with a window on, `_end_forward` applies it."""
        if self._window is not None:
            self._end_forward()
        else:
            self._view_sizes = self._fwd.sizes

    @torch.compiler.disable
    def _end_forward(self) -> None:
        """The last layer's commit with a window: apply it as part of the forward (a failure undoes both)."""
        saved = self._fwd.saved
        outer = self.allocator.journal
        self.allocator.journal = saved.journal
        try:
            for seq in self._batch:
                self._apply_window(seq)
            self._touch()
        except BaseException:
            self._restore(saved)
            raise
        finally:
            self.allocator.journal = outer

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block table, deltas and token counts of the batch's entries, padded to a power-of-two width >= 2 with
        empty entries (marked dynamic)."""
        tables = _empty_tables(len(self._batch), max(len(self._seqs[s].blocks) for s in self._batch))
        view = self._common_length()
        for row, seq in enumerate(self._batch):
            m = self._seqs[seq]
            n = len(m.blocks)
            tables[:, row, :n] = m.blocks, m.sigma - (m.next_logical - view), m.counts
        return self._table_tensors(tables)

    def _table_tensors(self, tables: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[3, rows, width] host tables as the forward's tensors on the pools' device, width marked dynamic."""
        out = tuple(torch.from_numpy(t).to(self.storage.device) for t in tables)
        for t in out:
            torch._dynamo.maybe_mark_dynamic(t, 1)
        return out

    def _padded_tables(self, layouts: list[RowLayout], frames: list[int]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tables of a padded forward, in the mask's columns: each row's entries (deltas in its own query frame
        `frames[row]`), with every run of padding a run of entries of up to a block's tokens on the pad block.

        A run of real tokens must consist of whole entries (padding falls between entries, as `_place` keeps it);
        a mask whose padding cuts an entry is refused, naming it."""
        bs, pad = self.block_size, self.storage.pad_block
        rows = []
        for row, (seq, lay, sq) in enumerate(zip(self._batch, layouts, frames, strict=True)):
            m = self._seqs[seq]
            ends = np.cumsum(m.counts)
            parts, used, entry = [], 0, 0
            for real, n in lay.runs:
                if not real:
                    counts = np.full(-(-n // bs), bs, dtype=np.int64)
                    counts[-1] = n - bs * (len(counts) - 1)
                    parts.append(np.stack([np.full_like(counts, pad), np.zeros_like(counts), counts]))
                    continue
                stop = int(np.searchsorted(ends, used + n)) + 1
                if stop > len(ends) or ends[stop - 1] != used + n:
                    raise ValueError(f"attention_mask: row {row}'s padding cuts its cached tokens after token "
                                     f"{used + n}, inside a table entry (padding must keep the columns it had)")
                parts.append(np.stack([m.blocks[entry:stop], m.sigma[entry:stop] - sq, m.counts[entry:stop]]))
                used, entry = used + n, stop
            rows.append(np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), dtype=np.int64))
        tables = _empty_tables(len(rows), max(r.shape[1] for r in rows))
        for row, t in enumerate(rows):
            tables[:, row, :t.shape[1]] = t
        return self._table_tensors(tables)

    def _common_length(self) -> int:
        lengths = [self._seqs[s].length for s in self._batch]
        if len(set(lengths)) > 1:
            raise ValueError(
                f"batch: every sequence of a forward must have the same view length, got lengths {lengths} "
                f"for sequences {self._batch}"
            )
        return lengths[0] if lengths else 0

    # ----------------------------------------------------------------- sequence operations
    @agreed
    def fork(self, seq: int, n: int) -> list[int]:
        """`n` new sequences sharing every block of `seq` (appended to the batch)."""
        with self._transaction():
            m = self._get(seq)
            _check_int("n", n, 0)
            ids = []
            for _ in range(n):
                self.allocator.incref(m.blocks)
                ids.append(self._new_seq(m.copy()))
            if self.states is not None:
                self.states.alias(ids, [seq] * n)
            self._batch.extend(ids)
            self._touch()
            return ids

    @agreed
    def new_sequences(self, n: int) -> list[int]:
        """`n` new empty sequences, appended to the batch.

        A forward on an empty batch learns its row count only in the first layer's update(), so a compiled
        model breaks its graph there (inside the layer loop, which makes Dynamo trace each layer on its
        own); opening the rows first moves that bookkeeping before the layers.
        """
        self._settle()
        _check_int("n", n, 1)
        if len(self._batch) + n > self.max_batch_size:
            raise ValueError(f"n: {len(self._batch)} + {n} rows exceed max_batch_size={self.max_batch_size}")
        ids = [self._new_seq(SeqMap()) for _ in range(n)]
        self._batch.extend(ids)
        self._touch()
        return ids

    @agreed
    def set_batch(self, seqs: Sequence[int]) -> None:
        """Choose which live sequences (in row order) the next forward runs; they must have equal view lengths."""
        self._settle()
        seqs = [int(s) for s in seqs]
        for s in seqs:
            self._get(s)
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"seqs: expected distinct sequence ids, got {seqs}")
        if len(seqs) > self.max_batch_size:
            raise ValueError(f"seqs: {len(seqs)} rows exceed max_batch_size={self.max_batch_size}")
        self._batch = seqs
        self._touch()

    @agreed
    def reorder(self, beam_idx: torch.Tensor | Sequence[int]) -> None:
        """Row i of the batch takes the content of row `beam_idx[i]` (beam search); blocks are shared, not copied."""
        self._settle()
        idx = [int(i) for i in torch.as_tensor(beam_idx).reshape(-1).tolist()]
        if len(idx) != len(self._batch) or any(not 0 <= i < len(self._batch) for i in idx):
            raise ValueError(f"beam_idx: expected {len(self._batch)} row indices in [0, {len(self._batch)}), got {idx}")
        self.reorder_ids([self._batch[i] for i in idx], rows=list(self._batch))

    @agreed
    def reorder_ids(self, sources: list[int], rows: list[int] | None = None) -> None:
        """Set sequence `rows[i]` (default: new sequences) to a shared copy of `sources[i]`; make `rows` the batch."""
        with self._transaction():
            new = [self._get(s).copy() for s in sources]
            if rows is not None:
                for seq in rows:
                    self._get(seq)
                if len(rows) != len(new) or len(set(rows)) != len(rows):
                    raise ValueError(f"rows: expected {len(new)} distinct live sequences, got {rows}")
            if len(new) > self.max_batch_size:
                raise ValueError(f"sources: {len(new)} rows exceed max_batch_size={self.max_batch_size}")
            for m in new:
                self.allocator.incref(m.blocks)
            if rows is None:
                rows = [self._new_seq(m) for m in new]
            else:
                for seq, m in zip(rows, new, strict=True):
                    self.allocator.decref(self._seqs[seq].blocks)
                    self._seqs[seq] = m
            if self.states is not None:
                self.states.alias(list(rows), [int(s) for s in sources])
            self._batch = list(rows)
            self._touch()

    @agreed
    def free(self, seq: int) -> None:
        """Drop `seq` and release its blocks."""
        with self._transaction():
            m = self._get(seq)
            self.allocator.decref(m.blocks)
            del self._seqs[seq]
            if self.states is not None:
                self.states.drop(seq)
            if seq in self._batch:
                self._batch.remove(seq)
            self._touch()

    @agreed
    def delete(self, seq: int, start: int, end: int) -> None:
        """Remove logical tokens [start, end); later tokens move down by end - start (their data does not move)."""
        self._refuse_with_states("delete")
        with self._transaction():
            self._check_range(start, end)
            m = self._get(seq)
            before, rest = split_at(seq_pieces(m), start, self.storage.stored)
            _, after = split_at(rest, end, self.storage.stored)
            nxt = m.next_logical - (end - start) if m.next_logical >= end else min(m.next_logical, start)
            self._commit(seq, before + after.shifted(start - end), nxt, f"delete({seq}, {start}, {end})")

    @agreed
    def chunk(self, seq: int, start: int, end: int) -> KVChunk:
        """A shareable, reference-counted handle on the tokens of `seq` at logical [start, end)."""
        with self._transaction():
            self._check_range(start, end)
            m = self._get(seq)
            _, rest = split_at(seq_pieces(m), start, self.storage.stored)
            inside, _ = split_at(rest, end, self.storage.stored)
            return KVChunk(self, inside.shifted(-start), end - start)

    @agreed
    def free_chunk(self, chunk: KVChunk) -> None:
        """Release `chunk`'s block references (`KVChunk.free`; idempotent)."""
        self._settle()  # a failed forward's journal must stay the newest change to the pool
        if not isinstance(chunk, KVChunk) or chunk.cache is not self:
            raise ValueError("chunk: expected a KVChunk of this cache")
        if not chunk.freed:
            self.allocator.decref(chunk.pieces.phys)
            chunk.freed = True

    @agreed
    def splice(self, seq: int, chunk: KVChunk, at: int) -> None:
        """Place `chunk` at logical `at`; tokens at or after `at` move up by its span.

        `at` beyond the end leaves a gap: that attaches a stream at offset `at` (below `max_position`).
        """
        self._refuse_with_states("splice")
        with self._transaction():
            if not isinstance(chunk, KVChunk) or chunk.cache is not self or chunk.freed:
                raise ValueError("chunk: expected a live KVChunk of this cache")
            _check_int("at", at, 0, self.max_position)
            m = self._get(seq)
            before, after = split_at(seq_pieces(m), at, self.storage.stored)
            pieces = before + chunk.pieces.shifted(at) + after.shifted(chunk.span)
            nxt = at + chunk.span if at >= m.next_logical else m.next_logical + chunk.span
            self._commit(seq, pieces, nxt, f"splice({seq}, chunk, at={at})")

    @agreed
    def set_window(self, sink: int, window: int | None) -> None:
        """StreamingLLM: keep the blocks holding the first `sink` tokens and the fewest recent blocks holding at
        least `window` tokens; kept tokens take consecutive positions (sink from 0, window right after).

        Applied now to every sequence (all or none) and after every forward; `window=None` turns it off.
        """
        if window is not None:
            self._refuse_with_states("set_window")
        with self._transaction():
            if window is None:
                self._window = None
                return
            _check_int("sink", sink, 0)
            _check_int("window", window, 1)
            self._window = (sink, window)
            for seq in list(self._seqs):
                self._apply_window(seq)
            self._touch()

    @agreed
    def prefill(self, model: torch.nn.Module, input_ids: torch.Tensor) -> KVChunk:
        """Run `model` on `input_ids` ([1, n]) alone, at positions 0..n-1, and return its KV as a chunk.

        The chunk attends only to itself; splice it anywhere, in any sequence of this cache.
        """
        self._refuse_with_states("prefill")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids: expected shape [1, n], got {got}")
        config = getattr(model, "config", None)
        if config is not None:
            self._check_model_config(config)
        with self._transaction() as saved:
            self._batch, self._window, self._view_sizes, self._padded = [], None, torch.empty(0, 0), False
            with torch.no_grad():
                model(input_ids=input_ids, past_key_values=self, use_cache=True)
            if self._fwd is not None and self._layers_written < len(self.attention_layers):
                raise RuntimeError(
                    f"model: its forward did not reach layer {self.attention_layers[-1]} (the config's last "
                    "attention layer)"
                )
            (tmp,) = self._batch
            chunk = self.chunk(tmp, 0, self._seqs[tmp].next_logical)
            self.free(tmp)
            self._batch, self._window, self._view_sizes = saved.batch, saved.window, saved.view
            self._padded = saved.padded
        return chunk

    def _check_model_config(self, config) -> None:
        """Refuse a model whose RoPE basis or KV geometry differs from the cache's config."""
        if (shape := kv_shape_from_config(config)) != self.shape:
            raise ValueError(f"model: its KV shape {shape} differs from the cache's {self.shape}")
        ropes = layer_ropes_from_config(config)
        differ = [i for i, (a, b) in enumerate(zip(ropes, self.layer_ropes, strict=True)) if a != b]
        if differ:
            i = differ[0]
            raise ValueError(
                f"model: its RoPE basis (rope theta/scaling, rotary dim or pair layout) differs from the cache's "
                f"config at layers {differ}: layer {i} inv_freq[:3] {ropes[i].inv_freq[:3].tolist()} vs "
                f"{self.layer_ropes[i].inv_freq[:3].tolist()}"
            )

    # ----------------------------------------------------------------- internals
    def _get(self, seq: int) -> SeqMap:
        self._settle()
        if isinstance(seq, bool) or not isinstance(seq, int) or seq not in self._seqs:
            raise ValueError(f"seq: no live sequence {seq!r} (live: {sorted(self._seqs)})")
        return self._seqs[seq]

    def _refuse_with_states(self, what: str) -> None:
        """Refuse an operation that rewrites the token sequence of a hybrid model's cache (before any change)."""
        if self.states is not None:
            raise ValueError(
                f"{what}: layers {list(self.states.layers)} of this model keep conv/recurrent states that summarise "
                "every earlier token in order; an edit of the token sequence (delete, splice, set_window, crop, "
                "recompute, a prefilled chunk) cannot be applied to them"
            )

    def _check_range(self, start: int, end: int) -> None:
        ok = all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end))
        if not (ok and 0 <= start <= end <= self.max_position):
            raise ValueError(
                f"start/end: expected ints with 0 <= start <= end <= max_position={self.max_position}, "
                f"got {start!r}, {end!r}"
            )

    def _new_seq(self, m: SeqMap) -> int:
        seq = self._next_id
        self._next_id += 1
        self._seqs[seq] = m
        return seq

    def _touch(self) -> None:
        """After any change: the view length of the batch (what get_seq_length reports: a padded batch keeps its
        mask's width while it has rows), the peak."""
        n = max((self._seqs[s].length for s in self._batch), default=0)
        self._padded = self._padded and bool(self._batch)
        if self._padded:
            n = max(n, self._view_sizes.shape[1])
        if n != self._view_sizes.shape[1]:
            self._view_sizes = _size_carrier(n)
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.allocator.blocks_in_use)

    def _repeat_interleave(self, repeats: int) -> None:
        _check_int("repeats", repeats, 1)
        if len(self._batch) * repeats > self.max_batch_size:
            raise ValueError(
                f"repeats: {len(self._batch)} x {repeats} rows exceed max_batch_size={self.max_batch_size}"
            )
        order = []
        for seq in list(self._batch):
            order.append(seq)
            order.extend(self.fork(seq, repeats - 1))
        self._batch = order

    def _commit(self, seq: int, pieces: Pieces, next_logical: int, what: str) -> None:
        """Repack `pieces` as the new mapping of `seq`: check bounds and pool, then copy, then swap refs.

        A piece that starts inside its block (an edit split it) is copied to a fresh block; the rest are shared.
        """
        if next_logical > self.max_position:
            raise ValueError(f"{what}: the next position {next_logical} would pass max_position={self.max_position}")
        plan = repack(pieces)
        copy_at = plan.copies
        offset = _largest_rotation(plan, next_logical)
        if offset >= MAX_ABS_DELTA:
            raise ValueError(f"{what}: a key would be rotated by {offset} positions; offsets stay below 2^31")
        self.allocator.require(int(copy_at.size), what)
        blocks = plan.phys.copy()
        self.allocator.incref(blocks[blocks >= 0])
        fresh = self.allocator.allocate(int(copy_at.size))
        blocks[copy_at] = fresh
        self.storage.copy_blocks([(phys, copy_source(plan, int(j))) for phys, j in zip(fresh, copy_at, strict=True)])
        old = self._seqs[seq]
        self.allocator.decref(old.blocks)
        self._seqs[seq] = SeqMap(blocks, plan.sigma, plan.counts, plan.length, next_logical)
        self._padded = False  # an edit of the tokens: the rows' views are their tokens again, unpadded
        self._touch()

    def _apply_window(self, seq: int) -> None:
        sink, window = self._window
        m = self._seqs[seq]
        held = np.cumsum(m.counts)  # tokens in the first j + 1 entries
        sink_blocks = min(int(np.searchsorted(held, sink, side="left")) + 1 if sink else 0, len(m.blocks))
        after = m.length - held + m.counts  # tokens in entries j.. (the recent part keeps a suffix of them)
        keep_from = sink_blocks + int(np.count_nonzero(after[sink_blocks:] - m.counts[sink_blocks:] >= window))
        current = seq_pieces(m)
        kept = current.take(np.r_[0:sink_blocks, keep_from:len(current)])
        stored = self.storage.stored
        first, last = stored[kept.phys, kept.a], stored[kept.phys, kept.b - 1]
        broken = np.flatnonzero(last - first != kept.b - kept.a - 1)  # stored positions not stepping by 1
        if broken.size:  # rare (blocks made by copies): split those pieces into consecutive runs
            split = set(broken.tolist())
            runs = []
            for i, p in enumerate(kept):
                spans = consecutive_runs(p.phys, p.a, p.b, stored) if i in split else [(p.a, p.b)]
                runs.extend(Piece(p.phys, a, b, p.shift) for a, b in spans)
            kept = Pieces.of(runs)
            first = stored[kept.phys, kept.a]
        n = kept.b - kept.a
        index = np.cumsum(n) - n  # kept tokens take consecutive positions from 0
        pieces = Pieces(kept.phys, kept.a, kept.b, index - first)
        total = int(n.sum())
        if pieces == current and m.next_logical == total:
            return
        self._commit(seq, pieces, total, f"set_window({sink}, {window}) on sequence {seq}")
