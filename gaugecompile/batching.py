"""Continuous batching over a ManifoldCache: requests join a running batch and leave it when done, in the call
shape of transformers' `model.generate_batch(inputs, generation_config)`.

transformers' own continuous batching (`generate_batch`) builds its paged cache and attention itself, so it cannot
run over a ManifoldCache; this scheduler drives the model's ordinary forward instead.  Each step prefills the
requests that joined, each alone (`cache.set_batch`: a padded prefill would run the whole model on every padding
token, 2.75x the tokens for prompts of 64 to 2048), then runs one decode step of every active row, the rows
left-padded to the longest (the cache stores no padding: `cache/padding.py`, and the compiled step runs the
rotated-query kernel over each row's own tokens).  A finished row frees its blocks at once.

Shared prefixes are found automatically: a request whose prompt starts with tokens a live row holds, or a finished
row's prompt kept as a chunk (as vLLM keeps freed blocks cached; the oldest are freed when a request needs room),
takes those tokens' blocks by reference (`cache.chunk` + `cache.splice`: the blocks are shared, the partial last one
copied on its first write) and prefills only the rest.  A request that shares its start with one joining in the
same step waits one step, so the shared part is prefilled once.  Prefixes are exact
to reuse (a prefix's keys and values depend on the prefix alone); text shared at other offsets is not, so it is not
reused here (`ManifoldCache.splice` and `recompute` do that on request, see examples/document_reuse.py).

Shapes change every step (rows join and leave, prompts differ): Dynamo's automatic dynamic shapes recompile once
when a dimension first changes and then treat it as dynamic, so a compiled model settles after its first few
steps (the tests count the recompiles).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig
from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus

from .cache import ManifoldCache
from .cache.chunk import KVChunk

__all__ = ["generate_batch", "BatchStats"]


@dataclass
class BatchStats:
    """What a `generate_batch` run did: steps, prompt tokens prefilled and reused from shared prefixes, the peak of
    blocks in use and their bytes, and each request's time to first token (seconds from the run's start)."""

    steps: int = 0
    prefilled_tokens: int = 0
    reused_tokens: int = 0
    peak_blocks: int = 0
    peak_bytes: int = 0
    ttft: dict[str, float] = field(default_factory=dict)


@dataclass
class _Row:
    request: str
    prompt: list[int]
    out: GenerationOutput
    seq: int
    held: int = 0  # prompt tokens in the cache


def _blocks(cache: ManifoldCache, prompt: int, new_tokens: int) -> int:
    """Blocks a request may need at most: its prompt and new tokens, and a partial block copied on write."""
    return -(-(prompt + new_tokens) // cache.block_size) + 1


def _first_tokens(model, cache: ManifoldCache, rows: list[_Row], feed: list[list[int]], config: GenerationConfig
                  ) -> list[int]:
    """One forward over `rows` (made the cache's batch), each fed its `feed` tokens after what it holds, left-padded
    to the longest; returns the token each row picks next."""
    cache.set_batch([r.seq for r in rows])
    q = max(len(f) for f in feed)
    past = max(cache.seq_len(r.seq) for r in rows)
    ids = torch.zeros(len(rows), q, dtype=torch.long)
    mask = torch.zeros(len(rows), past + q, dtype=torch.long)
    positions = torch.zeros(len(rows), q, dtype=torch.long)
    for i, (row, tokens) in enumerate(zip(rows, feed, strict=True)):
        n, held = len(tokens), cache.seq_len(row.seq)
        ids[i, q - n:] = torch.tensor(tokens)
        mask[i, past - held:past] = 1
        mask[i, past + q - n:] = 1
        positions[i, q - n:] = held + torch.arange(n)
    for t in (ids, mask, positions):  # rows, new tokens and width change from step to step: traced as sizes
        for dim in range(2):
            if t.shape[dim] > 1:  # (a size of 1 is specialised: a decode step keeps its own graph)
                torch._dynamo.maybe_mark_dynamic(t, dim)
    device = cache.storage.device
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
    if config.do_sample:
        probs = torch.softmax(logits / (config.temperature or 1.0), -1)
        return torch.multinomial(probs, 1)[:, 0].tolist()
    return logits.argmax(-1).tolist()


def _common(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many leading tokens `a` and `b` share, at most `limit`."""
    n = min(limit, len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class _Prefixes:
    """Prompts whose tokens' blocks can be shared: live rows' and finished rows' kept as chunks (oldest first)."""

    def __init__(self, cache: ManifoldCache, min_tokens: int) -> None:
        self.cache, self.min_tokens = cache, min_tokens
        self.kept: OrderedDict[tuple[int, ...], KVChunk] = OrderedDict()

    def longest(self, prompt: list[int], live: list[_Row]) -> tuple[int, _Row | KVChunk | None]:
        """The longest prefix of `prompt` (all but its last token, which must be fed) that a source holds."""
        best, source = 0, None
        candidates = [(r.prompt[:r.held], r) for r in live] + [(k, c) for k, c in self.kept.items()]
        for tokens, src in candidates:
            same = _common(tokens, prompt, len(prompt) - 1)
            if same > best:
                best, source = same, src
        return (best, source) if best >= self.min_tokens else (0, None)

    def shares_with(self, prompt: list[int], joining: list[_Row]) -> bool:
        """Whether `prompt` starts like a request joining now (it had better wait one step and share it)."""
        return any(_common(r.prompt, prompt, len(prompt) - 1) - r.held >= self.min_tokens for r in joining)

    def share(self, row: _Row, n: int, source: _Row | KVChunk) -> None:
        """Give `row` the first `n` tokens of `source` by reference (table edits: a splice, and a delete of what a
        kept prompt holds beyond them)."""
        if isinstance(source, _Row):
            chunk = self.cache.chunk(source.seq, 0, n)
            try:
                self.cache.splice(row.seq, chunk, 0)
            finally:
                chunk.free()
        else:
            self.kept.move_to_end(next(k for k, c in self.kept.items() if c is source))
            self.cache.splice(row.seq, source, 0)
            self.cache.delete(row.seq, n, source.span)
        row.held = n

    def keep(self, row: _Row) -> None:
        """Keep a finishing row's prompt as a chunk (before its row is freed)."""
        key = tuple(row.prompt)
        if len(key) >= self.min_tokens and key not in self.kept:
            self.kept[key] = self.cache.chunk(row.seq, 0, len(key))

    def evict(self) -> bool:
        """Free the oldest kept prompt's blocks; False when none is kept."""
        if not self.kept:
            return False
        self.kept.popitem(last=False)[1].free()
        return True

    def release(self) -> None:
        """Free every kept prompt's blocks (the rows that shared them hold their own references)."""
        while self.evict():
            pass


def generate_batch(
    model: torch.nn.Module, inputs: Sequence[Sequence[int]], generation_config: GenerationConfig | None = None, *,
    cache: ManifoldCache | None = None, max_batch_size: int = 8, max_new_tokens: int | None = None,
    arrivals: Sequence[float] | None = None, share_prefixes: bool = True, min_shared_tokens: int = 16,
    progress_bar: bool = False, stats: BatchStats | None = None,
) -> dict[str, GenerationOutput]:
    """Generate for every prompt of `inputs` with continuous batching over a ManifoldCache; the outputs by request
    id (`req_0`, ... in input order), as transformers' `generate_batch` returns them.

    `generation_config` gives `max_new_tokens`, `eos_token_id` and greedy or sampling (`do_sample`, `temperature`);
    `cache` (default: one built from the model, holding `max_batch_size` rows of the longest request) is reused
    across calls if given.  `arrivals` (seconds from the call, one per request, non-decreasing) admits each request
    no earlier than that, as a stream of requests would arrive.  `stats` is filled with what the run did.
    """
    config = generation_config or getattr(model, "generation_config", None) or GenerationConfig()
    new_tokens = max_new_tokens if max_new_tokens is not None else config.max_new_tokens or 20
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {new_tokens!r}")
    prompts = [list(map(int, p)) for p in inputs]
    if not prompts or any(not p for p in prompts):
        raise ValueError("inputs: expected a non-empty list of non-empty token id lists")
    if arrivals is not None and (len(arrivals) != len(prompts)
                                 or any(b < a for a, b in zip(arrivals[:-1], arrivals[1:], strict=True))):
        raise ValueError(f"arrivals: expected {len(prompts)} non-decreasing times, got {list(arrivals)}")
    eos = config.eos_token_id
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    if cache is None:
        longest = max(map(len, prompts)) + new_tokens
        cache = ManifoldCache(model, max_batch_size=max_batch_size, max_tokens=max_batch_size * longest)
    stats = stats if stats is not None else BatchStats()
    prefixes = _Prefixes(cache, min_shared_tokens) if share_prefixes else None
    pending = deque(enumerate(prompts))
    active: list[_Row] = []
    results: dict[str, GenerationOutput] = {}
    start, before = time.perf_counter(), set(cache.sequences)
    try:
        _run(model, cache, config, new_tokens, eos, max_batch_size, pending, active, results, prefixes, arrivals,
             start, stats, progress_bar, len(prompts))
    finally:  # also on an error: the rows it opened (joining or active) and the prefixes it kept are freed
        for seq in set(cache.sequences) - before:
            cache.free(seq)
        if prefixes is not None:
            prefixes.release()
    stats.peak_bytes = stats.peak_blocks * cache.bytes_per_block
    return {f"req_{i}": results[f"req_{i}"] for i in range(len(prompts))}


def _run(model, cache: ManifoldCache, config: GenerationConfig, new_tokens: int, eos: set[int], max_batch_size: int,
         pending: deque, active: list[_Row], results: dict[str, GenerationOutput], prefixes: _Prefixes | None,
         arrivals: Sequence[float] | None, start: float, stats: BatchStats, progress_bar: bool, total: int) -> None:
    """The scheduling loop of `generate_batch`: admit, prefill the joiners, decode the active rows, retire."""
    while pending or active:
        now = time.perf_counter() - start
        joiners, room = [], cache.free_blocks - sum(_blocks(cache, len(r.prompt), new_tokens) for r in active)
        while (pending and len(active) + len(joiners) < max_batch_size
               and (arrivals is None or arrivals[pending[0][0]] <= now)):
            i, prompt = pending[0]
            if prefixes is not None and prefixes.shares_with(prompt, joiners):
                break  # it joins next step and shares what this step prefills
            need = _blocks(cache, len(prompt), new_tokens)
            while need > room and prefixes is not None and prefixes.evict():
                room = cache.free_blocks - sum(_blocks(cache, len(r.prompt), new_tokens) for r in active + joiners)
            if need > room:
                if active or joiners:
                    break  # it joins when rows that finish have freed their blocks
                raise ValueError(f"inputs: request {i} needs {need} blocks of {cache.block_size} tokens (its prompt "
                                 f"and max_new_tokens), the cache has {room} free; build it with a larger max_tokens")
            room -= need
            pending.popleft()
            rid = f"req_{i}"
            out = GenerationOutput(request_id=rid, prompt_ids=prompt, status=RequestStatus.DECODING)
            row = _Row(rid, prompt, out, cache.new_sequences(1)[0])
            if prefixes is not None:
                n, source = prefixes.longest(prompt, active + joiners)
                if n:
                    prefixes.share(row, n, source)
                    stats.reused_tokens += n
            joiners.append(row)
        if not active and not joiners:  # the next request has not arrived yet
            time.sleep(max(0.0, min(arrivals[pending[0][0]] - now, 0.05)))
            continue
        for row in joiners:  # each prompt alone: a padded prefill would run the model on every padding token
            feed = row.prompt[row.held:]
            stats.prefilled_tokens += len(feed)
            (token,) = _first_tokens(model, cache, [row], [feed], config)
            row.held = len(row.prompt)
            row.out.generated_tokens.append(token)
            stats.ttft[row.request] = time.perf_counter() - start
        active.extend(joiners)
        done = [r for r in active if len(r.out.generated_tokens) >= new_tokens or r.out.generated_tokens[-1] in eos]
        decoding = [r for r in active if r not in done]
        if decoding:
            feed = [[r.out.generated_tokens[-1]] for r in decoding]
            for row, token in zip(decoding, _first_tokens(model, cache, decoding, feed, config), strict=True):
                row.out.generated_tokens.append(token)
            done += [r for r in decoding if len(r.out.generated_tokens) >= new_tokens
                     or r.out.generated_tokens[-1] in eos]
        stats.steps += 1
        stats.peak_blocks = max(stats.peak_blocks, cache.blocks_in_use)
        for row in done:
            row.out.status = RequestStatus.FINISHED
            row.out.lifespan = (row.out.created_time, time.perf_counter())
            results[row.request] = row.out
            if prefixes is not None:
                prefixes.keep(row)
            cache.free(row.seq)
            active.remove(row)
        if progress_bar:
            print(f"\rgenerate_batch: {len(results)}/{total} done, {len(active)} active", end="", flush=True)
    if progress_bar:
        print()
