"""`OrtCausalLM`: transformers' generate() over a ManifoldCache with the step run by onnxruntime (issue 21).

Every decoding mode, and generation after the cache's edits, gives the tokens the torch model gives over a
twin cache; a step that fails inside onnxruntime leaves the cache as it was."""

import onnx
import pytest
import torch
from cache_state import snapshot

from gaugecompile.cache import ManifoldCache
from gaugecompile.models.random_configs import random_model
from gaugecompile.onnx import OrtCausalLM

MODEL = random_model("llama")
PROMPT = torch.randint(0, MODEL.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ort_lm(tmp_path_factory):
    return OrtCausalLM.from_model(MODEL, tmp_path_factory.mktemp("ort") / "step.onnx", block_size=4)


def _cache(model=MODEL) -> ManifoldCache:
    return ManifoldCache(model.config, max_batch_size=4, max_tokens=256, block_size=4)


@pytest.mark.parametrize("arch", ["gptj", "gpt_neox"])  # interleaved pairs; partial rotary
def test_other_families_generate_what_the_torch_model_generates(arch, tmp_path):
    model = random_model(arch)
    lm = OrtCausalLM.from_model(model, tmp_path / "step.onnx", block_size=4)
    for mode in (dict(do_sample=False), dict(num_beams=3, do_sample=False)):
        got = lm.generate(input_ids=PROMPT, past_key_values=_cache(model), max_new_tokens=6, **mode)
        want = model.generate(input_ids=PROMPT, past_key_values=_cache(model), max_new_tokens=6, **mode)
        assert got.tolist() == want.tolist(), mode


def test_streaming_over_twice_the_window(ort_lm):
    """A sink window applied after every step, over 2.5 windows of decoding: the same tokens as the torch model."""
    tokens = []
    for lm in (ort_lm, MODEL):
        cache, out = _cache(), []
        cache.set_window(4, 8)
        with torch.no_grad():
            logits = lm(input_ids=PROMPT, past_key_values=cache, use_cache=True).logits
            for _ in range(30):
                nxt = logits[:, -1:].argmax(-1)
                out.append(int(nxt))
                logits = lm(input_ids=nxt, past_key_values=cache, use_cache=True).logits
        assert cache.get_seq_length() <= 4 + 8 + 2 * cache.block_size
        tokens.append(out)
    assert tokens[0] == tokens[1]


@pytest.mark.parametrize("mode", [dict(do_sample=False), dict(num_beams=3, do_sample=False),
                                  dict(do_sample=True, top_k=5), dict(do_sample=True, num_return_sequences=2)])
def test_generate_equals_the_torch_model(ort_lm, mode):
    torch.manual_seed(0)
    got = ort_lm.generate(input_ids=PROMPT, past_key_values=_cache(), max_new_tokens=8, **mode)
    torch.manual_seed(0)
    want = MODEL.generate(input_ids=PROMPT, past_key_values=_cache(), max_new_tokens=8, **mode)
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("edit", ["delete", "splice", "window"])
def test_generation_goes_on_after_edits(ort_lm, edit):
    """The edit is the same on both caches; the chunk is prefilled with the torch model."""
    caches, outs = [_cache(), _cache()], []
    for lm, cache in zip((ort_lm, MODEL), caches, strict=True):
        first = lm.generate(input_ids=PROMPT, past_key_values=cache, max_new_tokens=6, do_sample=False)
        view, last = first[0, :-1].tolist(), first[0, -1:].tolist()  # the last token is not cached yet
        if edit == "delete":
            cache.delete(0, 3, 9)
            view = view[:3] + view[9:]
        elif edit == "splice":
            doc = torch.arange(5, 12)[None]
            chunk = cache.prefill(MODEL, doc)
            cache.splice(0, chunk, 4)
            chunk.free()
            view = view[:4] + doc[0].tolist() + view[4:]
        else:  # the window keeps whole entries: the view is the tokens of the entries it kept
            blocks, _, counts = cache.mapping(0)
            starts = [sum(counts[:j]) for j in range(len(counts))]
            cache.set_window(2, 5)
            kept = cache.mapping(0)[0]
            view = [t for j, b in enumerate(blocks) if b in kept for t in view[starts[j]:starts[j] + counts[j]]]
        assert cache.get_seq_length() == len(view)
        ids = torch.tensor([view + last])
        outs.append(lm.generate(input_ids=ids, past_key_values=cache, max_new_tokens=6, do_sample=False))
        cache.set_window(0, None)
    assert outs[0].tolist() == outs[1].tolist()
    assert caches[0].mapping(0) == caches[1].mapping(0)


def test_a_step_failing_in_onnxruntime_changes_nothing(ort_lm, monkeypatch):
    cache = _cache()
    ort_lm.generate(input_ids=PROMPT, past_key_values=cache, max_new_tokens=2, do_sample=False)
    before, pools = snapshot(cache), [p.clone() for p in cache.k_pools]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ort_lm.session, "run_with_iobinding", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ort_lm(input_ids=torch.tensor([[3]]), past_key_values=cache)
    assert snapshot(cache) == before
    assert all(torch.equal(a, b) for a, b in zip(pools, cache.k_pools, strict=True))


def test_steps_write_the_cache_pools_in_place(ort_lm):
    """Each pool output is bound to the pool itself: over a prefill and two decode steps the cache keeps the same
    buffers, holding what the torch model writes into its twin's."""
    caches, buffers = [_cache(), _cache()], []
    with torch.no_grad():
        for ids in (PROMPT, torch.tensor([[5]]), torch.tensor([[7]])):
            for lm, cache in zip((ort_lm, MODEL), caches, strict=True):
                lm(input_ids=ids, past_key_values=cache, use_cache=True)
            buffers.append([p.data_ptr() for p in (*caches[0].k_pools, *caches[0].v_pools)])
    assert buffers[0] == buffers[1] == buffers[2]
    for got, want in zip((*caches[0].k_pools, *caches[0].v_pools), (*caches[1].k_pools, *caches[1].v_pools),
                         strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_a_file_whose_pools_cannot_be_written_in_place_is_refused(ort_lm, tmp_path):
    """A node reading a pool before its update (here an Identity the scatter then reads) would see the rows being
    written: such a file is refused by name rather than run over a bound buffer."""
    model = onnx.load(ort_lm.path)
    scatter = next(n for n in model.graph.node if n.op_type == "ScatterND" and n.input[0] == "k_pools_0")
    scatter.input[0] = "k_pools_0_copy"
    model.graph.node.insert(0, onnx.helper.make_node("Identity", ["k_pools_0"], ["k_pools_0_copy"]))
    onnx.save(model, tmp_path / "copying.onnx")
    with pytest.raises(ValueError, match=r"path: pools \['k_pools_0'\] are not updated by one ScatterND"):
        OrtCausalLM(tmp_path / "copying.onnx", MODEL.config)


def test_bad_arguments_name_the_argument(ort_lm, tmp_path):
    with pytest.raises(TypeError, match="past_key_values: expected a gaugecompile ManifoldCache"):
        ort_lm(input_ids=PROMPT, past_key_values=None)
    with pytest.raises(ValueError, match="attention_mask: the exported step runs unpadded rows"):
        ort_lm(input_ids=PROMPT, past_key_values=_cache(), attention_mask=torch.tensor([[0] + [1] * 9]))
    with pytest.raises(ValueError, match="path: no ONNX file"):
        OrtCausalLM(tmp_path / "missing.onnx", MODEL.config)


@pytest.fixture(scope="module")
def fused_lm(ort_lm, tmp_path_factory):
    """The same file with its ai.gauge nodes bound to the native kernel (onnxruntime-extensions)."""
    path = tmp_path_factory.mktemp("fused") / "step.onnx"
    return OrtCausalLM.from_model(MODEL, path, block_size=4, fused=True)


@pytest.mark.parametrize("mode", [dict(do_sample=False), dict(num_beams=3, do_sample=False)])
def test_the_fused_node_generates_what_the_function_generates(ort_lm, fused_lm, mode):
    outs = []
    for lm in (ort_lm, fused_lm):
        cache = _cache()
        first = lm.generate(input_ids=PROMPT, past_key_values=cache, max_new_tokens=6, **mode)
        outs.append(first.tolist())
        if "num_beams" not in mode:  # then an edit: nonzero deltas, which the kernel rotates the queries by
            cache.delete(0, 2, 7)
            view = first[0, :-1].tolist()
            ids = torch.tensor([view[:2] + view[7:] + first[0, -1:].tolist()])
            outs.append(lm.generate(input_ids=ids, past_key_values=cache, max_new_tokens=6, do_sample=False).tolist())
    half = len(outs) // 2
    assert outs[:half] == outs[half:]
    assert [n.domain for n in onnx.load(fused_lm.path).graph.node if n.op_type == "RotatedQueryAttention"] == \
        ["ai.onnx.contrib"] * MODEL.config.num_hidden_layers
