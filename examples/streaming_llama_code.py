"""StreamingLLM written as the original Llama reference code would (no transformers), compiled with backend="gauge".

Shows: a cache laid out [batch, max_len, kv_heads, head_dim] whose keys are stored rotated at their write slot;
every step keeps the attention sinks and the recent window with `index_select` and re-rotates each kept key to its
place in the window in complex form (`view_as_complex(k) * freqs_cis`, one shift per token), as position-shifting
StreamingLLM code does.  The gauge passes turn that into one `gauge::rotated_query_attention` reading the cache in
place as blocks of one token, each with its token's shift: no gather and no re-rotation, as `gaugecompile.explain`
shows; compiled equals eager.  Run: `python examples/streaming_llama_code.py [--inner eager]`.
"""

import argparse

import torch

import gaugecompile

H, HKV, D, HIDDEN = 4, 2, 16, 64  # heads, KV heads, head dim, hidden size
SINKS, WINDOW, STEPS = 4, 12, 40  # kept sink tokens, recent window, tokens decoded (the cache holds all of them)
INV_FREQ = 1.0 / 10000.0 ** (torch.arange(0, D, 2).float() / D)
W_QKV = torch.randn(HIDDEN, (H + 2 * HKV) * D, generator=torch.Generator().manual_seed(0)) / HIDDEN**0.5


def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The original Llama code's RoPE: x [b, n, h, d] times freqs_cis = polar(1, positions * inv_freq), one
    position per token (a shift, for keys already rotated)."""
    angles = torch.outer(positions.float(), INV_FREQ)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs_cis).flatten(3).type_as(x)


class SinkWindowAttention(torch.nn.Module):
    def forward(self, x, cache_k, cache_v, slot, keep, shift, query_pos):
        b = x.shape[0]
        q, k, v = (x @ W_QKV).view(b, 1, -1, D).split([H, HKV, HKV], dim=2)
        cache_k.index_copy_(1, slot, rotate(k, slot))  # stored rotated at its write slot, never touched again
        cache_v.index_copy_(1, slot, v)
        keys = rotate(cache_k.index_select(1, keep), shift)  # each kept key moved to its place in the window
        values = cache_v.index_select(1, keep)
        q = rotate(q, query_pos).transpose(1, 2)
        keys, values = (t.transpose(1, 2).repeat_interleave(H // HKV, dim=1) for t in (keys, values))
        scores = torch.softmax(q @ keys.transpose(2, 3) / D**0.5, dim=-1)
        return (scores @ values).transpose(1, 2).reshape(b, 1, H * D)


def step_inputs(t: int) -> tuple[torch.Tensor, ...]:
    """Slot t written; the sinks and the last WINDOW tokens (t included) kept, each shifted to its window place."""
    if t < SINKS + WINDOW:
        keep = torch.arange(t + 1)
    else:
        keep = torch.cat([torch.arange(SINKS), torch.arange(t - WINDOW + 1, t + 1)])
    place = torch.arange(len(keep))  # logical positions in the streamed view: sinks first, then the window
    return torch.tensor([t]), keep, place - keep, place[-1:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inner", choices=("inductor", "eager"), default="inductor", help="default inductor")
    parser.add_argument("--random", "--model", help="ignored: this example defines its own layer, no model to load")
    args = parser.parse_args(argv)
    model = SinkWindowAttention()
    compiled = torch.compile(model, backend="gauge", options={"inner": args.inner}, dynamic=False)
    xs = torch.randn(STEPS, 1, 1, HIDDEN, generator=torch.Generator().manual_seed(1))
    eager_cache, cache = ([torch.zeros(1, STEPS, HKV, D) for _ in range(2)] for _ in range(2))
    worst = 0.0
    with torch.no_grad():
        for t in range(STEPS):
            want = model(xs[t], *eager_cache, *step_inputs(t))
            # the window fills up for SINKS + WINDOW steps (shapes change: eager), then slides at one shape
            got = (compiled if t >= SINKS + WINDOW else model)(xs[t], *cache, *step_inputs(t))
            worst = max(worst, (got - want).abs().max().item())
        probe = [t.clone() for t in cache]
        report = gaugecompile.explain(model, xs[-1], *probe, *step_inputs(STEPS - 1), inner=args.inner)
    print(report, *(line for line in report.graphs_after[0].splitlines() if "gauge" in line), sep="\n")
    ok = len(report.rewritten) == 1 and not report.refused and worst <= 1e-5
    print(f"{STEPS} steps, {SINKS} sinks + {WINDOW}-token window; compiled vs eager: max |difference| {worst:.1e}; "
          + ("OK" if ok else "FAIL: expected one rewritten site and outputs equal to eager"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
