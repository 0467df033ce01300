"""The Bayesian wind tunnel (`gaugecompile.research.wind_tunnel`): the closed-form posterior against brute-force
enumeration of every bijection consistent with the pairs seen, the sampler's invariants, the evaluation against a
model that is the posterior, and a short training run that lowers the loss."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gaugecompile.research.geometry import probe_geometry
from gaugecompile.research.wind_tunnel import (
    BijectionTask,
    build_model,
    evaluate,
    posterior_entropy_bits,
    posterior_probs,
    train,
    value_manifold,
)


def _brute_force(pi: tuple[int, ...], xs: list[int]) -> list[list[float]]:
    """For each t, the distribution of sigma(x_t) over every bijection sigma that agrees with the pairs before t
    (uniform prior: each consistent bijection equally likely)."""
    v = len(pi)
    rows = []
    for t, x in enumerate(xs):
        counts = [0] * v
        for sigma in itertools.permutations(range(v)):
            if all(sigma[xs[s]] == pi[xs[s]] for s in range(t)):
                counts[sigma[x]] += 1
        total = sum(counts)
        rows.append([c / total for c in counts])
    return rows


@st.composite
def _case(draw):
    v = draw(st.integers(2, 5))
    pi = tuple(draw(st.permutations(range(v))))
    xs = draw(st.lists(st.integers(0, v - 1), min_size=1, max_size=8))
    return pi, xs


@given(_case())
def test_posterior_matches_enumeration(case):
    pi, xs = case
    v = len(pi)
    want = _brute_force(pi, xs)
    x = torch.tensor([xs])
    y = torch.tensor([[pi[i] for i in xs]])
    probs = posterior_probs(x, y, v)[0]
    entropy = posterior_entropy_bits(x, v)[0]
    for t, dist in enumerate(want):
        assert probs[t].tolist() == pytest.approx(dist, abs=1e-12)
        h = -sum(p * math.log2(p) for p in dist if p > 0)
        assert float(entropy[t]) == pytest.approx(h, abs=1e-12)


@pytest.mark.parametrize("repeat", [0.5, None, 0.0])
def test_sampler_invariants(repeat):
    task = BijectionTask(vocab=8, pairs=8 if repeat == 0.0 else 20, repeat=repeat)
    data = task.sample(256, torch.Generator().manual_seed(1))
    v, k = task.vocab, task.pairs
    assert data.ids.shape == (256, task.seq_len) and data.xs.shape == data.ys.shape == (256, k)
    assert torch.equal(data.perms.sort(1).values, torch.arange(v).expand(256, v))  # a bijection per sequence
    assert torch.equal(data.ys, data.perms.gather(1, data.xs))
    for x, y in zip(data.xs.tolist(), data.ys.tolist(), strict=True):  # the same input always gives the same output
        seen: dict[int, int] = {}
        for a, b in zip(x, y, strict=True):
            assert seen.setdefault(a, b) == b
    assert bool((data.ids[:, 0] == task.bos).all())
    assert torch.equal(data.ids[:, 1::2], data.xs) and torch.equal(data.ids[:, 2::2], data.ys[:, :-1] + v)
    again = task.sample(256, torch.Generator().manual_seed(1))
    assert torch.equal(again.ids, data.ids) and torch.equal(again.perms, data.perms)
    if repeat == 0.0:
        assert bool((data.xs.sort(1).values.diff(dim=1) > 0).all())  # a permutation prefix: every input new
        assert bool((posterior_entropy_bits(data.xs, v) == torch.log2(v - torch.arange(k).double())).all())
    if repeat == 0.5:  # a repeat half the time while some inputs are unseen (and always once all are seen)
        h = posterior_entropy_bits(data.xs, v)
        distinct = torch.cat([torch.zeros(256, 1, dtype=torch.long),
                              (torch.nn.functional.one_hot(data.xs, v).cumsum(1) > 0).sum(-1)[:, :-1]], 1)
        open_ = (distinct > 0) & (distinct < v - 1)  # (a new input with one output left has 0 bits too)
        share = float((h[open_] == 0).double().mean())
        assert 0.45 < share < 0.55
        assert bool((h[distinct == v] == 0).all())


class _Oracle(torch.nn.Module):
    """A 'model' whose logits at each query position are the log of the analytic posterior."""

    def __init__(self, task: BijectionTask):
        super().__init__()
        self.task = task

    def forward(self, input_ids, use_cache=False):
        task, v = self.task, self.task.vocab
        xs = input_ids[:, 1::2]
        ys = torch.cat([input_ids[:, 2::2] - v, torch.zeros_like(xs[:, :1])], 1)
        for row in range(xs.shape[0]):  # the last output is not in the input: recover it where x_K repeats
            earlier = (xs[row, :-1] == xs[row, -1]).nonzero()
            if earlier.numel():
                ys[row, -1] = ys[row, earlier[0, 0]]
        logits = torch.zeros(*input_ids.shape, task.vocab_size, dtype=torch.float64)
        logits[:, task.query_positions, v:2 * v] = posterior_probs(xs, ys, v).clamp_min(1e-30).log()
        return type("Out", (), {"logits": logits})()


def test_evaluate_against_the_posterior_itself():
    task = BijectionTask(vocab=6, pairs=10)
    result = evaluate(_Oracle(task), task, sequences=300, batch=100)
    assert result.mae_bits < 1e-12 and result.kl_bits < 1e-12 and result.max_abs_error_bits < 1e-12
    assert result.cross_entropy_bits == pytest.approx(result.bayes_cross_entropy_bits, abs=1e-12)
    assert len(result.mae_by_position) == task.pairs
    assert sum(r["count"] for r in result.by_posterior) == 300 * task.pairs
    assert result.as_dict()["task"] == {"vocab": 6, "pairs": 10, "repeat": 0.5}


@pytest.fixture
def one_thread():
    """Train on one thread (the machines running the tests are small and shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_short_training_lowers_the_loss(one_thread):
    task = BijectionTask(vocab=8, pairs=12)
    model = build_model(task, hidden=32, layers=2, heads=4, seed=0)
    before = evaluate(model, task, sequences=200)
    lines: list[str] = []
    log = train(model, task, steps=200, batch=32, lr=3e-3, log_every=50, log=lines.append)
    after = evaluate(model, task, sequences=200)
    assert log.steps == 200 and len(lines) == 5 and lines[-1].startswith("step    200")
    assert after.cross_entropy_bits < before.cross_entropy_bits - 0.1, (before.cross_entropy_bits, after)
    assert after.mae_bits < before.mae_bits
    layers = probe_geometry(model, task.sample(1, torch.Generator().manual_seed(5)).ids)  # the probes apply
    assert len(layers) == 2 and all(math.isfinite(g.key_abs_cos_mean) for g in layers)
    manifold = value_manifold(model, task, sequences=16)
    assert [row["layer"] for row in manifold] == [0, 1]
    assert all(math.isfinite(c) for row in manifold for c in row["pc_entropy_corr"])


def test_task_arguments_are_checked():
    with pytest.raises(ValueError):
        BijectionTask(vocab=4, pairs=5, repeat=0.0)
    with pytest.raises(ValueError):
        BijectionTask(vocab=4, pairs=5, repeat=1.0)
    with pytest.raises(ValueError):
        train(build_model(BijectionTask(4, 2), hidden=16, heads=4), BijectionTask(4, 2))
