"""A hand-written attention layer (no transformers) over its own block-pool KV cache, compiled with backend="gauge".

Shows: keys read back through `gaugecompile.materialize_kv` (gather blocks, re-rotate each by its delta; an eviction
only edits deltas) into `scaled_dot_product_attention` become one `gauge::rotated_query_attention`, as
`gaugecompile.explain` shows; compiled equals eager. Run: `python examples/custom_model.py [--inner eager]`.
"""

import argparse

import torch

import gaugecompile

H, HKV, D, HIDDEN, BLOCK = 4, 2, 16, 64, 4  # heads, KV heads, head dim, hidden size, tokens per block
ROPE = gaugecompile.RopeSpec.from_base(10000.0, D)
W_QKV = torch.randn(HIDDEN, (H + 2 * HKV) * D, generator=torch.Generator().manual_seed(0)) / HIDDEN**0.5


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # rotate-half, x [b, h, n, d], positions [b, n]
    angles = torch.cat([positions[..., None].float() * ROPE.inv_freq.float()] * 2, -1)[:, None]
    return x * angles.cos() + torch.cat((-x[..., D // 2:], x[..., : D // 2]), dim=-1) * angles.sin()


class BlockPoolCache:
    """One sequence's K/V in blocks of BLOCK tokens; a key stored at position p acts at p + its block's delta."""
    def __init__(self, num_blocks: int = 16) -> None:
        self.k_pool, self.v_pool = (torch.zeros(num_blocks, BLOCK, HKV, D) for _ in range(2))
        self.free, self.blocks, self.deltas, self.length = list(range(num_blocks)), [], [], 0

    def step_args(self, x: torch.Tensor) -> tuple:  # host bookkeeping: place x's tokens, return the layer's inputs
        while len(self.blocks) * BLOCK < self.length + x.shape[1]:  # every block but the last is full
            self.blocks, self.deltas = [*self.blocks, self.free.pop(0)], [*self.deltas, 0]
        pos = torch.arange(self.length, self.length + x.shape[1])  # logical positions of the new tokens
        table, delta = torch.tensor([self.blocks]), torch.tensor([self.deltas])
        slots, stored = table[0, pos // BLOCK] * BLOCK + pos % BLOCK, pos - delta[0, pos // BLOCK]
        self.length += x.shape[1]
        return x, pos[None], stored[None], slots, self.k_pool, self.v_pool, table, delta, self.length

    def evict(self, index: int) -> None:  # drop a full block: later tokens move down BLOCK positions, as a delta
        self.free.append(self.blocks.pop(index))
        self.deltas = self.deltas[:index] + [d - BLOCK for d in self.deltas[index + 1:]]
        self.length -= BLOCK


class PagedAttention(torch.nn.Module):
    def forward(self, x, positions, stored, slots, k_pool, v_pool, table, delta, length: int) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (x @ W_QKV).view(b, s, -1, D).split([H, HKV, HKV], dim=2)
        q, k = rope(q.transpose(1, 2), positions), rope(k.transpose(1, 2), stored).transpose(1, 2)
        k_pool.view(-1, HKV, D).index_copy_(0, slots, k.reshape(-1, HKV, D))  # write the new tokens' K/V
        v_pool.view(-1, HKV, D).index_copy_(0, slots, v.reshape(-1, HKV, D))
        keys, values = gaugecompile.materialize_kv(k_pool, v_pool, table, delta, ROPE, length)  # gather + re-rotate
        mask = torch.arange(length)[None, :] <= torch.arange(length - s, length)[:, None] if s > 1 else None  # causal
        return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inner", choices=("inductor", "eager"), default="inductor", help="default inductor")
    parser.add_argument("--random", "--model", help="ignored: this example defines its own layer, no model to load")
    args = parser.parse_args(argv)
    model, x, worst = PagedAttention(), torch.randn(1, 14, HIDDEN, generator=torch.Generator().manual_seed(1)), 0.0
    compiled = torch.compile(model, backend="gauge", options={"inner": args.inner})
    eager_cache, cache = BlockPoolCache(), BlockPoolCache()  # the same cache for each: eager, compiled
    with torch.no_grad():
        for step, xs in enumerate(x[:, :13].split([10, 1, 1, 1], dim=1)):  # a 10-token prompt, then 3 decode steps
            worst = max(worst, (compiled(*cache.step_args(xs)) - model(*eager_cache.step_args(xs))).abs().max().item())
            if step == 0:  # evict tokens 4..7: the blocks after them get delta -4
                eager_cache.evict(1), cache.evict(1)
        report = gaugecompile.explain(model, *cache.step_args(x[:, 13:]), inner=args.inner)  # one more step
    print(report, *(line for line in report.graphs_after[0].splitlines() if "gauge" in line), sep="\n")
    ok = len(report.rewritten) == 1 and not report.refused and worst <= 1e-5
    print(f"blocks {cache.blocks}, deltas {cache.deltas}; compiled vs eager: max |difference| {worst:.1e}; "
          + ("OK" if ok else "FAIL: expected one rewritten site and outputs equal to eager"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
