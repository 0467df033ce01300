"""`ManifoldCache`: a transformers Cache whose reorganisations are O(blocks) edits of a block table.

This module is the cache's face: transformers' `Cache` API and the public edits.  The work is done by its parts:
`host.py` (the mapping: sequences of table entries, batch, view length, window, chunks), `edits.py` (edits as
changes of that mapping), `forward.py` and `transactions.py` (a forward's placement and tables; the transactions
every operation runs in), `layers.py` (per layer: how an update is checked, stored and read back), `states.py`,
`recompute.py`, `padding.py`, `tensor_parallel.py` (hybrid states, recompute, padded batches, agreed edits).

Positions.  `get_seq_length()` is the view length of the batch (tokens per row), as for any transformers cache, so
`generate()` continues after an edit with the ids of the view: the model rotates each new key at `view + i`, stored
at that position; each entry's `delta` brings its keys into the query's frame (`host.py`; 0 with no edits).

Under torch.compile.  `update()` returns `gaugecompile.materialize_kv(...)` of the untouched pools (gather +
re-rotate), so every attention implementation is exact eagerly; compiled with the gauge backend that node is
what the passes turn into one rotated-query attention over the pools.  The host bookkeeping of a forward is one
`torch.compiler.disable`d call made from `get_mask_sizes`, which transformers calls before the first layer, so
a compiled forward is: a small graph, the bookkeeping, one graph with every layer's `materialize_kv` feeding its
attention, a small graph.  Lengths reach the graph as tensor sizes (marked dynamic) and tables are padded to
power-of-two widths, so decode steps do not recompile.  A cache built from the model learns each forward's rows
and padding from the model's pre-hook (`padding.py`); one built from a config assumes one row, and a forward with
more rows redoes the bookkeeping in update(), inside the layer loop (`new_sequences(rows)` avoids that).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch
from torch.distributed.device_mesh import DeviceMesh
from transformers.cache_utils import Cache

from ..kv_format import kv_format
from ..rope import MAX_ABS_DELTA, RopeSpec
from . import edits
from .chunk import KVChunk
from .forward import StepMapping
from .host import HostState, check_int
from .layers import FLOATS, build_layers, window_offset
from .mapping import SeqMap, seq_pieces
from .model_basis import check_same_layout, follow_model
from .padding import ForwardInputs, watch_inputs
from .pool import BlockAllocator
from .recompute import RecomputeForward, check_request, choose_tokens, recompute_tokens
from .rope_config import read_layout, shared_rope
from .states import LayerStates
from .storage import BlockStorage
from .tensor_parallel import TensorParallelSync, agreed, local_edit
from .transactions import Saved, Transactions

__all__ = ["ManifoldCache", "StepMapping"]


class ManifoldCache(Cache):
    """Block-pool KV cache with fork/reorder/delete/chunk/splice/set_window as block-table edits.

    `max_tokens` is the total number of tokens all sequences and chunks may hold; the pool gets
    `ceil(max_tokens / block_size) + max_batch_size` blocks (room for one partial block per row).
    Rows of a forward are the sequences in `batch` (creation order; `fork` appends, `free` removes);
    a forward with k times as many rows as sequences forks each sequence k times first, so a prompt
    prefilled once is shared by all beams or samples of a later `generate`.

    `kv_dtype`: how the pools store keys and values, whatever the model's dtype (default: the model's): a float
    dtype, or "int8", "float8_e4m3fn", "int4" with scales beside the pools (`gaugecompile.kv_format`); a token is
    quantized once, when written, and no edit re-rotates or re-quantizes it.

    Logical positions stay below `max_position` (2^31 minus the pool's capacity in tokens), so that every
    block delta stays below the op's bound `gaugecompile.rope.MAX_ABS_DELTA` = 2^31, where angles are exact.

    Each layer's pools are sized by its first `update()`: the KV heads are the model's (a tensor-parallel
    rank's share), the head dim the config's.  Under tensor parallelism pass the group (or the model's
    `DeviceMesh`) as `group`: edits the user calls then take rank `src`'s arguments on every rank, so the
    mapping stays identical while each rank's pools keep its own heads (`tensor_parallel.py`); `check_sync()`
    verifies it.

    The parts: `host` (the mapping: sequences, batch, view length, window, chunks), `transactions` (over it, and
    the forward in progress), `kv_layers` (per layer: how its update is checked, stored and read back).
    """

    is_compileable = False  # generate() must not auto-compile this cache with the default backend

    def __init__(
        self, config, *, max_batch_size: int, max_tokens: int, block_size: int = 16,
        kv_dtype: str | torch.dtype | None = None, device: torch.device | str | None = None, group=None,
        src: int = 0,
    ) -> None:
        super().__init__(layers=[])
        model = config if isinstance(config, torch.nn.Module) else None
        if model is not None:  # a model: its config, its basis and dtype, and its forwards hand their masks over
            watch_inputs(model, ManifoldCache)
            config = model.config
        for name, value in (("max_batch_size", max_batch_size), ("max_tokens", max_tokens),
                            ("block_size", block_size)):
            check_int(name, value, 1)
        #: Each layer's RoPE basis, read from the model's rotary code: its layer type's, or no rotation for a NoPE
        #: layer (whose keys an edit never re-rotates).
        self.layer_ropes, self.shape = read_layout(config)
        if model is not None:  # a cast model rotates in its rounded frequencies (`model_basis`)
            self.layer_ropes = follow_model(model, self.layer_ropes)
        #: The layers whose keys and values the pools hold, in the order a forward updates them.
        self.attention_layers = self.shape.attention_layers
        #: A hybrid model's conv/recurrent states of its other layers, per sequence (None: every layer attends).
        self.states = LayerStates(self.shape.state_layers) if self.shape.state_layers else None
        if kv_dtype is None:  # the model's own (a cast leaves config.dtype as it was), else the config's
            kv_dtype = getattr(model, "dtype", None) if model is not None else getattr(config, "dtype", None)
            kv_dtype = kv_dtype if isinstance(kv_dtype, torch.dtype) and kv_dtype in FLOATS else torch.float32
        self.kv_format = kv_format(kv_dtype)  #: how the pools store keys and values (`gaugecompile.kv_format`)
        for i in self.shape.attention_layers:
            self.kv_format.check_head_dim(self.shape.head_dims[i], "kv_dtype")
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        num_blocks = -(-max_tokens // block_size) + max_batch_size
        #: Logical positions stay below this, so every delta (logical - stored - query frame) is below 2^31.
        self.max_position = MAX_ABS_DELTA - num_blocks * block_size
        if self.max_position < 1:
            raise ValueError(f"max_tokens: the pool's {num_blocks * block_size} slots exceed 2^31, got {max_tokens}")
        self.allocator = BlockAllocator(num_blocks)
        self.storage = BlockStorage(self.shape.num_layers, num_blocks, block_size, self.kv_format,
                                    torch.device(device or "cpu"))
        self.host = HostState(self.allocator, self.storage, self.states, block_size=block_size,
                              max_batch_size=max_batch_size, max_position=self.max_position)
        self.transactions = Transactions(self.host, self.attention_layers)
        self.kv_layers = build_layers(self.shape, self.layer_ropes, self.storage)
        self._recompute: RecomputeForward | None = None
        if isinstance(group, DeviceMesh):
            group = group.get_group()
        #: The tensor-parallel group this cache's edits are agreed in (None: a single process).
        self.tensor_parallel = TensorParallelSync(group, src) if group is not None else None

    # ----------------------------------------------------------------- accounting and views
    # Accessors settle first: a forward still pending when the user looks has failed (see the module doc).
    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def free_blocks(self) -> int:
        self.settle()
        return self.allocator.free_blocks

    @property
    def blocks_in_use(self) -> int:
        self.settle()
        return self.allocator.blocks_in_use

    @property
    def peak_blocks_in_use(self) -> int:
        """The most blocks in use at once since the cache was made."""
        return self.host.peak_blocks_in_use

    @property
    def bytes_per_block(self) -> int:
        return self.storage.bytes_per_block

    @property
    def sequences(self) -> tuple[int, ...]:
        """Ids of all live sequences."""
        self.settle()
        return tuple(self.host.seqs)

    @property
    def batch(self) -> tuple[int, ...]:
        """Sequence ids of the rows of the next forward, in row order."""
        self.settle()
        return tuple(self.host.batch)

    @property
    def window(self) -> tuple[int, int] | None:
        """The StreamingLLM policy (sink, window) applied after every forward, or None."""
        self.settle()
        return self.host.window

    @property
    def last_step(self) -> StepMapping | None:
        """The mapping the most recent forward used (block table, deltas, pool slots written, view length)."""
        return self.transactions.last_step

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
        chunk = self.host.chunks.get(chunk_id)
        return chunk if chunk is not None and not chunk.freed else None

    def seq_len(self, seq: int) -> int:
        """Tokens in the view of `seq`."""
        return self._get(seq).length

    def positions(self, seq: int) -> list[int]:
        """Logical position of every token in the view of `seq` (O(tokens); for inspection and tests)."""
        out: list[int] = []
        for p in seq_pieces(self._get(seq)):
            out.extend((self.storage.stored[p.phys, p.a:p.b] + p.delta).tolist())
        return out

    def next_position(self, seq: int) -> int:
        """Logical position the next token of `seq` will take."""
        return self._get(seq).next_logical

    def mapping(self, seq: int) -> tuple[list[int], list[int], list[int]]:
        """The table entries of `seq`: (physical blocks, per-entry delta in the frame of the next query, which sits
        at the view length, tokens each entry holds: slots [0, n) of its block)."""
        m = self._get(seq)
        return m.blocks.tolist(), (m.delta - (m.next_logical - m.length)).tolist(), m.counts.tolist()

    # ----------------------------------------------------------------- transactions
    def settle(self) -> None:
        """Outside a forward: forget a committed forward, roll back a pending one (`Transactions.settle`)."""
        self.transactions.settle()

    def transaction(self) -> AbstractContextManager[Saved]:
        """A block run as one change of this cache: on any exception the cache is restored as it was before it."""
        return self.transactions.transaction()

    @contextmanager
    def recomputing(self, run: RecomputeForward) -> Iterator[RecomputeForward]:
        """Route the layers' updates to a recompute forward (`recompute.py`) while the block runs."""
        self._recompute = run
        try:
            yield run
        finally:
            self._recompute = None

    # ----------------------------------------------------------------- transformers Cache API
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The view length of the batch: the tokens every row holds, where the model rotates the next token.

        Read from the size of a tensor, so that a compiled model sees a dynamic SymInt, not a constant; a
        pending forward does not count until its last layer commits it.
        """
        return self.host.view_sizes.shape[1]

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """(kv_length, kv_offset): the view after the forward, starting at its first key (offset 0); for a
        sliding-window layer, its last W - 1 tokens before the new ones and those (`layers.window_offset`).

        transformers asks this once per mask before any layer runs, so this is where a forward does its
        host bookkeeping (`Transactions.begin_forward`, assuming one row per sequence of the batch): the graph
        break of a compiled model then falls before the layers, and every layer's attention is traced in one
        graph with its `materialize_kv`.  The length comes from a tensor size (a SymInt).
        """
        book = self.transactions
        fwd = book.forward
        stale = self.states is not None and self.states.pending  # a forward that failed in a state layer
        if fwd is None or book.layers_written or fwd.q != query_length or stale:
            # The rows are the input's when the model's pre-hook handed it over (`padding.watch_inputs`).  Else a
            # fresh cache assumes one (generate() on one prompt), and a forward with more rows redoes the
            # bookkeeping in update(), inside the layer loop (compiled: per-layer graphs from then on).
            inputs = book.inputs
            rows = inputs.rows if inputs is not None and inputs.rows else len(self.host.batch) or 1
            fwd = book.begin_forward(rows, query_length)
        length = fwd.sizes.shape[1]
        offset = window_offset(self.shape.windows[layer_idx], length, query_length)
        return length - offset, offset

    def expect_inputs(self, inputs: ForwardInputs) -> None:
        """Take the next forward's rows, 2D attention mask and position ids (the model's forward pre-hook calls this,
        `padding.watch_inputs`): its bookkeeping plans that many rows, and stores no padding token."""
        self.transactions.inputs = inputs

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
        return len(self.host.batch) if self.host.batch else -1

    @local_edit
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.reorder(beam_idx)

    @local_edit
    def batch_repeat_interleave(self, repeats: int) -> None:
        with self.transaction():
            edits.repeat_interleave(self.host, repeats)

    @local_edit
    def batch_select_indices(self, indices: torch.Tensor) -> None:
        with self.transaction():
            edits.select_rows(self.host, [int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()])

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
        with self.transaction():
            edits.crop(self.host, n)

    @agreed
    def reset(self) -> None:
        """Free every sequence (chunks keep their blocks); a pending forward is dropped first."""
        with self.transaction():
            for seq in list(self.host.seqs):
                edits.free(self.host, seq)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new K/V ([batch, kv_heads, q, head_dim]) into the pools; return the materialised view."""
        book, layers = self.transactions, self.shape.num_layers
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < layers:
            error = ValueError(f"layer_idx: expected an int in [0, {layers}) (the config's layers), got {layer_idx!r}")
        else:
            layer = self.kv_layers[layer_idx]
            error = layer.check(key_states, value_states)
        if error is not None:  # the forward cannot go on: roll back what it placed, then say why
            if book.forward is not None and book.complete and layer_idx == layers:
                book.restore(book.forward.saved)  # the model has more layers than the config: undo its forward too
            self.settle()
            raise error
        if self._recompute is not None:
            return self._recompute.update(layer, key_states, value_states)
        q = key_states.shape[2]
        fwd = book.forward_for(layer_idx, key_states.shape[0], q)
        layer.write(*layer.pack(key_states, value_states), fwd.slots)
        k, v = layer.view(fwd.block_table, fwd.block_delta, fwd.block_lens, fwd.sizes.shape[1], q, key_states.dtype)
        book.layer_written()
        return layer.unpack(k, v, key_states, value_states)

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
        self.transactions.check_open(layer_idx, what)
        return self.states

    # ----------------------------------------------------------------- forwards outside the model's layers
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
        self._refuse_with_states("recompute")
        self.settle()
        check_request(self, model, spans)
        chosen = choose_tokens(self, model, seq, spans, fraction, policy, probe_layer)
        if any(chosen):
            recompute_tokens(self, model, seq, spans, chosen)
        return [start + i for (start, _), picks in zip(spans, chosen, strict=True) for i in picks]

    @agreed
    def prefill(self, model: torch.nn.Module, input_ids: torch.Tensor) -> KVChunk:
        """Run `model` on `input_ids` ([1, n]) alone, at positions 0..n-1, and return its KV as a chunk.

        The chunk attends only to itself; splice it anywhere, in any sequence of this cache.
        """
        self._refuse_with_states("prefill")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids: expected shape [1, n], got {got}")
        if getattr(model, "config", None) is not None:
            check_same_layout(model, self.shape, self.layer_ropes)
        host, book = self.host, self.transactions
        with self.transaction() as saved:
            host.batch, host.window, host.view_sizes, host.padded = [], None, torch.empty(0, 0), False
            with torch.no_grad():
                model(input_ids=input_ids, past_key_values=self, use_cache=True)
            if book.forward is not None and not book.complete:
                raise RuntimeError(
                    f"model: its forward did not reach layer {self.attention_layers[-1]} (the config's last "
                    "attention layer)"
                )
            (tmp,) = host.batch
            chunk = self.chunk(tmp, 0, host.seqs[tmp].next_logical)
            self.free(tmp)
            before = saved.host
            host.batch, host.window, host.view_sizes, host.padded = before.batch, before.window, before.view, \
                before.padded
        return chunk

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
        self.transactions.begin_forward(rows, q)
        try:
            for layer in self.attention_layers:
                if self.storage.k_pools[layer] is None:
                    self.storage.allocate(layer, kv_heads, head_dim)
            yield self.last_step
        except BaseException:
            self.settle()  # its layers never reported: the pending forward is rolled back
            raise
        self.transactions.commit()

    # ----------------------------------------------------------------- sequence operations
    @agreed
    def fork(self, seq: int, n: int) -> list[int]:
        """`n` new sequences sharing every block of `seq` (appended to the batch)."""
        with self.transaction():
            return edits.fork(self.host, seq, n)

    @agreed
    def new_sequences(self, n: int) -> list[int]:
        """`n` new empty sequences, appended to the batch.

        A forward on an empty batch learns its row count only in the first layer's update(), so a compiled
        model breaks its graph there (inside the layer loop, which makes Dynamo trace each layer on its
        own); opening the rows first moves that bookkeeping before the layers.
        """
        self.settle()
        return edits.new_sequences(self.host, n)

    @agreed
    def set_batch(self, seqs: Sequence[int]) -> None:
        """Choose which live sequences (in row order) the next forward runs; they must have equal view lengths."""
        self.settle()
        edits.set_batch(self.host, seqs)

    @agreed
    def reorder(self, beam_idx: torch.Tensor | Sequence[int]) -> None:
        """Row i of the batch takes the content of row `beam_idx[i]` (beam search); blocks are shared, not copied."""
        self.settle()
        batch = self.host.batch
        idx = [int(i) for i in torch.as_tensor(beam_idx).reshape(-1).tolist()]
        if len(idx) != len(batch) or any(not 0 <= i < len(batch) for i in idx):
            raise ValueError(f"beam_idx: expected {len(batch)} row indices in [0, {len(batch)}), got {idx}")
        self.reorder_ids([batch[i] for i in idx], rows=list(batch))

    @agreed
    def reorder_ids(self, sources: list[int], rows: list[int] | None = None) -> None:
        """Set sequence `rows[i]` (default: new sequences) to a shared copy of `sources[i]`; make `rows` the batch."""
        with self.transaction():
            edits.reorder_ids(self.host, sources, rows)

    @agreed
    def free(self, seq: int) -> None:
        """Drop `seq` and release its blocks."""
        with self.transaction():
            edits.free(self.host, seq)

    @agreed
    def delete(self, seq: int, start: int, end: int) -> None:
        """Remove logical tokens [start, end); later tokens move down by end - start (their data does not move)."""
        self._refuse_with_states("delete")
        with self.transaction():
            edits.delete(self.host, seq, start, end)

    @agreed
    def chunk(self, seq: int, start: int, end: int) -> KVChunk:
        """A shareable, reference-counted handle on the tokens of `seq` at logical [start, end)."""
        with self.transaction():
            return KVChunk(self, edits.span_pieces(self.host, seq, start, end), end - start)

    @agreed
    def free_chunk(self, chunk: KVChunk) -> None:
        """Release `chunk`'s block references (`KVChunk.free`; idempotent)."""
        self.settle()  # a failed forward's journal must stay the newest change to the pool
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
        with self.transaction():
            if not isinstance(chunk, KVChunk) or chunk.cache is not self or chunk.freed:
                raise ValueError("chunk: expected a live KVChunk of this cache")
            edits.splice(self.host, seq, chunk.pieces, chunk.span, at)

    @agreed
    def set_window(self, sink: int, window: int | None) -> None:
        """StreamingLLM: keep the blocks holding the first `sink` tokens and the fewest recent blocks holding at
        least `window` tokens; kept tokens take consecutive positions (sink from 0, window right after).

        Applied now to every sequence (all or none) and after every forward; `window=None` turns it off.
        """
        if window is not None:
            self._refuse_with_states("set_window")
        with self.transaction():
            edits.set_window(self.host, sink, window)

    # ----------------------------------------------------------------- internals
    def _get(self, seq: int) -> SeqMap:
        """The map of live sequence `seq`, after settling a pending forward."""
        self.settle()
        return self.host.get(seq)

    def _refuse_with_states(self, what: str) -> None:
        """Refuse an operation that rewrites the token sequence of a hybrid model's cache (before any change)."""
        if self.states is not None:
            raise ValueError(
                f"{what}: layers {list(self.states.layers)} of this model keep conv/recurrent states that summarise "
                "every earlier token in order; an edit of the token sequence (delete, splice, set_window, crop, "
                "recompute, a prefilled chunk) cannot be applied to them"
            )
