"""`gauge::rotated_query_attention_masked`: equals masked attention over the materialised view (from its key
`first` on, scores soft-capped or not, with sink logits or not) for every mask, and takes the rotated-query path
(no gather) exactly when the mask is the bottom-right causal one, narrowed to a sliding window or not."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gaugecompile as gc
from gaugecompile.block_tables import full_block_lens, view_tokens
from gaugecompile.ops import masked_attention
from gaugecompile.ops.masked_attention import sliding_window_of
from gaugecompile.ops.reference import rerotate

OP = torch.ops.gauge.rotated_query_attention_masked.default


def _causal(q_len, length, *, additive, shape=()):
    visible = torch.arange(length)[None, :] <= torch.arange(length - q_len, length)[:, None]
    visible = visible.expand(*shape, q_len, length)
    if not additive:
        return visible
    return torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, torch.finfo(torch.float64).min)


def _reference(q, kp, vp, table, delta, lens, rope, scale, mask, first=0, softcap=0.0, sinks=None):
    """Gather + re-rotate in float64, keep the keys from `first` on, repeat heads, add the mask, softmax, weigh the
    values; and the log-sum-exp of the masked scores (without the sinks)."""
    views = [view_tokens(table[b], delta[b], lens[b], kp.shape[1]) for b in range(table.shape[0])]
    k = torch.stack([rerotate(kp.double().flatten(0, 1)[s], d, rope.inv_freq, rope.rotary_dim, rope.interleaved)
                     for s, d in views]).permute(0, 2, 1, 3)
    v = torch.stack([vp.double().flatten(0, 1)[s] for s, _ in views]).permute(0, 2, 1, 3)
    k, v = k[:, :, first:], v[:, :, first:]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q.double() @ k.transpose(-1, -2) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    lse = torch.logsumexp(scores, -1)
    if sinks is not None:  # one more logit per row, its weight on no value
        scores = torch.cat([scores, sinks.double().expand(*scores.shape[:-1], 1)], -1)
        return torch.softmax(scores, -1)[..., :-1] @ v, lse
    return torch.softmax(scores, -1) @ v, lse


@st.composite
def cases(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    bs, hkv, groups, d = draw(st.sampled_from([1, 4, 16])), draw(st.sampled_from([1, 2])), draw(st.sampled_from(
        [1, 2])), draw(st.sampled_from([16, 32]))
    batch, q_len = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    kind = draw(st.sampled_from(["causal-bool", "causal-additive", "padding", "window", "sliced-window",
                                 "wide-slice", "bias", "none"]))
    length = draw(st.integers(q_len + (3 if kind in ("padding", "window", "sliced-window", "wide-slice") else 0),
                              40))  # something to hide
    blocks = -(-length // bs)
    if draw(st.booleans()):  # every block full but the last
        lens = full_block_lens(torch.full((batch,), length), blocks, bs)
    else:  # entries of any size, empty ones too (what edits off block boundaries leave)
        rows = [draw(ragged_counts(length, bs)) for _ in range(batch)]
        blocks = max(map(len, rows))
        lens = torch.tensor([row + [0] * (blocks - len(row)) for row in rows])
    kp, vp = torch.randn(blocks * batch + 2, bs, hkv, d, generator=g), torch.randn(blocks * batch + 2, bs, hkv, d,
                                                                                    generator=g)
    table = torch.randperm(blocks * batch + 2, generator=g)[: batch * blocks].view(batch, blocks)
    delta = torch.randint(-(2**31), 2**31, (batch, blocks), generator=g)
    rope = gc.RopeSpec.from_base(10000.0, d, interleaved=draw(st.booleans()))
    q = torch.randn(batch, hkv * groups, q_len, d, generator=g)
    additive = kind != "causal-bool" and draw(st.booleans())
    mask = _causal(q_len, length, additive=additive, shape=(batch, 1))
    if kind == "padding":
        mask = mask.clone()
        mask[0, ..., : draw(st.integers(1, length - q_len))] = float("-inf") if additive else False
    elif kind in ("window", "sliced-window", "wide-slice"):  # each query sees its last 3 tokens
        far = torch.arange(length)[None, :] < torch.arange(length - q_len, length)[:, None] - 2
        mask = mask.masked_fill(far, float("-inf") if additive else False)
    elif kind == "bias":
        mask = mask.double() if additive else torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, -1e300)
        mask = mask + torch.rand(mask.shape, generator=g, dtype=torch.float64)
    elif kind == "none":
        mask = torch.ones(batch, 1, q_len, length, dtype=torch.bool)
    first = 0
    if kind == "sliced-window":  # keys before the first query's window cut off, as a sliding layer's cache does
        first = draw(st.integers(0, length - q_len - 2))
    elif kind == "wide-slice":  # keys the first query sees cut off as well: not the op's mask (but for one query)
        first = draw(st.integers(length - q_len - 1, length - q_len))
    # one query sees all its keys: a window of their number, however far the slice cuts; so is one row's padding
    causal = kind.startswith("causal") or kind in ("window", "sliced-window") or (
        kind in ("none", "wide-slice") and q_len == 1) or (kind == "padding" and q_len == 1 and batch == 1)
    softcap = draw(st.sampled_from([0.0, 0.0, 1.0]))
    sinks = torch.randn(batch, hkv * groups, q_len, 1, generator=g) * 3 if draw(st.booleans()) else None
    return (q, kp, vp, table, delta, lens, rope, length, d**-0.5, mask[..., first:], first, softcap, sinks), causal


@st.composite
def ragged_counts(draw, length: int, block_size: int) -> list[int]:
    """Token counts of entries (each in [0, block_size]) that sum to `length`."""
    counts, left = [], length
    while left:
        if draw(st.integers(0, 4)) == 0:
            counts.append(0)
        counts.append(draw(st.integers(1, min(block_size, left))))
        left -= counts[-1]
    return counts


@settings(max_examples=40, deadline=None)
@given(cases())
def test_masked_op_equals_masked_attention_and_skips_the_gather_iff_causal(case):
    (q, kp, vp, table, delta, lens, rope, length, scale, mask, first, softcap, sinks), causal = case
    calls = []
    original = masked_attention.materialize_views
    masked_attention.materialize_views = lambda *a: calls.append(1) or original(*a)
    try:
        got, lse = OP(q, kp, vp, table, delta, lens, rope.inv_freq, rope.rotary_dim, rope.interleaved, length, scale,
                      mask.float() if mask.dtype == torch.float64 else mask, first, softcap, sinks)
    finally:
        masked_attention.materialize_views = original
    want, want_lse = _reference(q, kp, vp, table, delta, lens, rope, scale, mask, first, softcap, sinks)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=2e-5)
    assert bool(calls) != causal  # the gather runs only for the masks the rotated-query op cannot express


def test_sliding_window_of_cases():
    assert sliding_window_of(_causal(3, 7, additive=False), 3, 7) == 0
    assert sliding_window_of(_causal(3, 7, additive=True, shape=(2, 1)).float(), 3, 7) == 0
    assert sliding_window_of(torch.zeros(1, 1, 1, 7), 1, 7) == 0  # one query: all visible
    assert sliding_window_of(torch.zeros(1, 1, 1, 4), 1, 7, first=3) == 4  # a decode step's window of 4, sliced
    assert sliding_window_of(_causal(3, 7, additive=False).tril(-2), 3, 7, first=0) is None  # hides its own token
    windowed = _causal(3, 7, additive=False) & (torch.arange(7)[None, :] > torch.arange(4, 7)[:, None] - 3)
    assert sliding_window_of(windowed, 3, 7) == 3
    assert sliding_window_of(windowed[:, 2:], 3, 7, first=2) == 3  # the keys no query sees cut off
    assert sliding_window_of(windowed[:, 3:], 3, 7, first=3) is None  # key 2, seen by query 0, cut off
    assert sliding_window_of(torch.ones(3, 7, dtype=torch.bool), 3, 7) is None  # not causal
    assert sliding_window_of(_causal(3, 7, additive=False).tril(), 3, 7) is None  # top-left aligned
    assert sliding_window_of(_causal(3, 7, additive=True) + 1.0, 3, 7) is None  # a bias on visible keys
    assert sliding_window_of(torch.full((1, 1, 1, 7), -1e4), 1, 7) is None  # "masked" too weakly to be exact zeros


@pytest.mark.parametrize("kind", ["causal", "padding"])
def test_opcheck(kind):
    g = torch.Generator().manual_seed(2)
    rope = gc.RopeSpec.from_base(10000.0, 16)
    kp, vp = torch.randn(6, 4, 2, 16, generator=g), torch.randn(6, 4, 2, 16, generator=g)
    table, delta = torch.tensor([[3, 0, 5], [1, 4, 2]]), torch.tensor([[7, -3, 2**30], [0, 100, -5]])
    q = torch.randn(2, 4, 2, 16, generator=g)
    mask = _causal(2, 11, additive=False, shape=(2, 1)).clone()
    if kind == "padding":
        mask[1, ..., :3] = False
    lens = torch.tensor([[4, 3, 4], [3, 4, 4]] if kind == "padding" else [[4, 4, 3]] * 2)
    args = (q, kp, vp, table, delta, lens, rope.inv_freq, 16, False, 11, 0.25, mask)
    result = torch.library.opcheck(OP, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@st.composite
def padded_cases(draw):
    """A padded batch's view as ManifoldCache lays it out: per row, runs of real entries and of entries on the pool's
    last block (its padding block), any mix of left, right and middle padding, and the mask transformers builds for
    it (causal over the columns, padding hidden): the op must give masked attention over that mask, where a query
    that sees no key gives 0."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    bs, hkv, groups, d = draw(st.sampled_from([1, 4])), draw(st.sampled_from([1, 2])), draw(st.sampled_from(
        [1, 3])), 16
    batch, q_len = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    num_blocks = 40
    pad = num_blocks - 1
    rows = []
    for _ in range(batch):
        row = []  # (block, count) entries
        for _ in range(draw(st.integers(1, 4))):
            real = draw(st.booleans())
            for n in draw(ragged_counts(draw(st.integers(1, 9)), bs)):
                row.append((pad if not real else int(torch.randint(0, pad, (1,), generator=g)), n))
        rows.append(row)
    length = max(sum(n for _, n in row) for row in rows)
    for row in rows:  # every row spans the same columns: pad the short ones on the left
        missing = length - sum(n for _, n in row)
        row[:0] = [(pad, min(bs, missing - i)) for i in range(0, missing, bs)]
    if length < q_len:
        q_len = length
    width = max(map(len, rows))
    table = torch.tensor([[b for b, _ in row] + [0] * (width - len(row)) for row in rows])
    lens = torch.tensor([[n for _, n in row] + [0] * (width - len(row)) for row in rows])
    delta = torch.randint(-(2**20), 2**20, table.shape, generator=g)
    kp, vp = torch.randn(num_blocks, bs, hkv, d, generator=g), torch.randn(num_blocks, bs, hkv, d, generator=g)
    kp[pad], vp[pad] = 0, 0
    real = torch.stack([torch.cat([torch.full((n,), b != pad) for b, n in row]) for row in rows])  # [B, L]
    mask = (_causal(q_len, length, additive=False, shape=(batch, 1)) & real[:, None, None, :])
    if draw(st.booleans()):
        mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, torch.finfo(torch.float64).min)
    rope = gc.RopeSpec.from_base(10000.0, d, interleaved=draw(st.booleans()))
    q = torch.randn(batch, hkv * groups, q_len, d, generator=g)
    sinks = torch.randn(batch, hkv * groups, q_len, 1, generator=g) if draw(st.booleans()) else None
    return q, kp, vp, table, delta, lens, rope, length, d**-0.5, mask, real, sinks


@settings(max_examples=40, deadline=None)
@given(padded_cases())
def test_padded_views_take_the_rotated_query_path_where_the_mask_is_causal_over_real_tokens(case):
    q, kp, vp, table, delta, lens, rope, length, scale, mask, real, sinks = case
    calls = []
    original = masked_attention.materialize_views
    masked_attention.materialize_views = lambda *a: calls.append(1) or original(*a)
    try:
        got, lse = OP(q, kp, vp, table, delta, lens, rope.inv_freq, rope.rotary_dim, rope.interleaved, length, scale,
                      mask.float() if mask.dtype == torch.float64 else mask, 0, 0.0, sinks)
    finally:
        masked_attention.materialize_views = original
    visible = mask if mask.dtype == torch.bool else mask > -1e30
    seen = visible.any(-1)  # [B, 1, Q]
    want, want_lse = _reference(q, kp, vp, table, delta, lens, rope, scale, mask, 0, 0.0, sinks)
    want = torch.where(seen[..., None], want, 0)  # a query that sees no key: 0, as SDPA gives
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    seen = seen.expand(lse.shape)
    torch.testing.assert_close(lse.double()[seen], want_lse.expand(lse.shape)[seen], atol=2e-5, rtol=2e-5)
    # the rotated-query path runs wherever each row's real queries are its last ones (padding before them: left
    # padding, a decode step, a row's new tokens after its cached ones with padding between)
    new = real[:, length - q.shape[2]:]
    tail = new.flip(1).to(torch.int64).cumprod(1).sum(1)
    if bool((tail == new.sum(1)).all()):
        assert not calls
