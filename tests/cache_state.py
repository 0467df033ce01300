"""Cache state helpers shared by the transaction tests of several layers (cache, onnx): a snapshot of everything
an operation may change, the StreamingLLM policy written out on token lists, and a spy on the window's layout."""


from gaugecompile.cache import ManifoldCache


def snapshot(cache: ManifoldCache):
    """Everything an operation may change, as plain values (read without settling a pending forward)."""
    return (
        {s: (m.blocks.tolist(), m.delta.tolist(), m.counts.tolist(), m.length, m.next_logical)
         for s, m in cache.host.seqs.items()},
        cache.allocator.refcount.tolist(), cache.allocator.free_list, tuple(cache.host.batch), cache.get_seq_length(),
        cache.host.window, cache.host.next_id, cache.peak_blocks_in_use, cache.host.next_chunk,
        tuple(None if k is None else tuple(k.shape) for k in (*cache.k_pools, *cache.v_pools)),  # sized pools
    )


def windowed(toks: list[tuple[int, int]], sink: int, window: int, counts: list[int]) -> list[tuple[int, int]]:
    """The StreamingLLM policy on a token list laid out in entries of `counts` tokens (the cache's layout when it
    applied the policy): the entries holding the first `sink` tokens, then the fewest recent entries holding at
    least `window` tokens, renumbered from 0."""
    assert sum(counts) == len(toks)
    starts = [sum(counts[:j]) for j in range(len(counts) + 1)]  # token index where each entry starts (and the end)
    sink_end = next((j for j in range(len(counts) + 1) if starts[j] >= sink), len(counts))
    keep_from = sink_end
    while keep_from < len(counts) and len(toks) - starts[keep_from + 1] >= window:
        keep_from += 1
    kept = toks[: starts[sink_end]] + toks[starts[keep_from]:]
    return [(t, i) for i, (t, _) in enumerate(kept)]


class WindowSpy:
    """Records the entry counts of each sequence when the cache applies its window (the layout `windowed` needs)."""

    def __init__(self, cache: ManifoldCache) -> None:
        self.counts: dict[int, list[int]] = {}
        apply = cache.host.apply_window

        def spy(seq: int) -> None:
            self.counts[seq] = cache.host.seqs[seq].counts.tolist()
            apply(seq)

        cache.host.apply_window = spy
