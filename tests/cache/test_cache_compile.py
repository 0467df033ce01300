"""ManifoldCache under torch.compile: eager parity, one graph for all layers, no recompile per decode step.

The host bookkeeping (allocation, copy-on-write, tables) runs in `get_mask_sizes`, before the layers, as a
`torch.compiler.disable`d call; the view length reaches the graph as the size of a tensor (a SymInt).  So a
decode step is: a small graph, the bookkeeping, one graph holding every layer's `materialize_kv` feeding its
attention, and a small graph after.
"""

import pytest
import torch
from transformers import DynamicCache

from gaugecompile.cache import ManifoldCache
from gaugecompile.models import random_model

MATERIALIZE = (torch.ops.gauge.materialize_kv, torch.ops.gauge.materialize_kv.default)
ATTENTION = (torch._C._nn.scaled_dot_product_attention, torch.matmul)  # sdpa, or the eager chain's matmul


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles its own model: drop earlier compiled frames so no test hits the recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class CountingBackend:
    """A Dynamo backend that keeps every captured graph and runs it as is."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def _materialize_count(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in MATERIALIZE)


def _attention_users(gm: torch.fx.GraphModule) -> int:
    """materialize_kv nodes whose K output reaches an attention (sdpa, or the eager matmul) in the same graph."""
    found = 0
    for node in gm.graph.nodes:
        if node.target not in MATERIALIZE:
            continue
        todo, seen = [node], set()
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "call_function" and n.target in ATTENTION:
                found += 1
                break
            todo.extend(n.users)
    return found


def _cache(model, rows: int) -> ManifoldCache:
    cache = ManifoldCache(model.config, max_batch_size=4, max_tokens=128, block_size=4)
    cache.new_sequences(rows)
    return cache


def _decode(fn, cache, ids: torch.Tensor, steps: int, on_step=None) -> list[torch.Tensor]:
    """Prefill `ids`, then `steps` greedy decode steps with plain forward calls; the logits of each call."""
    out = []
    with torch.no_grad():
        logits = fn(input_ids=ids, past_key_values=cache, use_cache=True).logits
        out.append(logits)
        for step in range(steps):
            if on_step is not None:
                on_step(step)
            logits = fn(input_ids=logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True).logits
            out.append(logits)
    return out


def _ids(rows: int, n: int) -> torch.Tensor:
    return torch.randint(2, 128, (rows, n), generator=torch.Generator().manual_seed(rows * 100 + n))


def test_decode_loop_graphs_and_recompiles():
    """Prefill: every layer's materialize_kv feeds its attention in one graph; decode: no recompile per step."""
    model = random_model("llama").eval()
    layers = model.config.num_hidden_layers
    ids = _ids(2, 9)
    want = _decode(model, _cache(model, 2), ids, steps=6)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    counts = []
    got = _decode(compiled, _cache(model, 2), ids, steps=6, on_step=lambda _: counts.append(len(backend.graphs)))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    prefill, decode = backend.graphs[:counts[0]], backend.graphs[counts[0]:counts[1]]
    for graphs in (prefill, decode):
        with_layers = [g for g in graphs if _materialize_count(g)]
        assert len(with_layers) == 1, [_materialize_count(g) for g in graphs]
        assert _materialize_count(with_layers[0]) == layers
        assert _attention_users(with_layers[0]) == layers
    assert counts[1:] == [counts[1]] * len(counts[1:]), f"recompiled during decode: graphs after each step {counts}"
    assert len(backend.graphs) == counts[-1]


@pytest.mark.parametrize(
    "arch,backend,prompt",
    [("llama", "aot_eager", 7), ("gpt_neox", "aot_eager", 7), ("gptj", "aot_eager", 7), ("llama", "inductor", 6)],
)
def test_compiled_parity(arch, backend, prompt):
    model = random_model(arch).eval()
    ids = _ids(2, prompt)
    want = _decode(model, _cache(model, 2), ids, steps=3)
    got = _decode(torch.compile(model, backend=backend), _cache(model, 2), ids, steps=3)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_compiled_generate_greedy_equals_dynamic_cache():
    model = random_model("llama").eval()
    ids = _ids(2, 8)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_logits=True)
    want = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kw)
    backend = CountingBackend()
    model.forward = torch.compile(model.forward, backend=backend)
    got = model.generate(ids, past_key_values=_cache(model, 2), **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert sum(_materialize_count(g) for g in backend.graphs) == 2 * model.config.num_hidden_layers  # prefill, decode


def test_fresh_cache_without_open_rows_still_matches():
    """Without new_sequences() the bookkeeping happens inside the first layer: more graphs, same results."""
    model = random_model("llama").eval()
    ids = _ids(2, 5)
    fresh = lambda: ManifoldCache(model.config, max_batch_size=4, max_tokens=128, block_size=4)  # noqa: E731
    want = _decode(model, fresh(), ids, steps=2)
    got = _decode(torch.compile(model, backend=CountingBackend()), fresh(), ids, steps=2)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_new_sequences_validates():
    cache = ManifoldCache(random_model("llama").config, max_batch_size=2, max_tokens=16)
    with pytest.raises(ValueError, match="n: expected a positive int"):
        cache.new_sequences(0)
    with pytest.raises(ValueError, match="max_batch_size"):
        cache.new_sequences(3)
    assert cache.new_sequences(2) == list(cache.batch)
