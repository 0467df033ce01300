"""Padded batches (`cache/padding.py`): no padding token is stored, each row generates what it generates alone, and
the compiled step runs the rotated-query kernel on the untouched pools, never the gather fallback."""

import pytest
import torch
from transformers import DynamicCache

from gaugecompile.cache import ManifoldCache
from gaugecompile.models import random_model
from gaugecompile.ops.counters import runs

LLAMA = random_model("llama")
LAYERS = LLAMA.config.num_hidden_layers
PROMPTS = [9, 5, 1, 7]  # real tokens per row
GEN = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0, return_dict_in_generate=True,
           output_logits=True)


def _rows(lengths=PROMPTS, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 128, (1, n), generator=g) for n in lengths]


def _pad(rows: list[torch.Tensor], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.shape[1] for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        cols = slice(width - r.shape[1], width) if side == "left" else slice(0, r.shape[1])
        ids[i, cols], mask[i, cols] = r[0], 1
    return ids, mask


def _cache(model, rows: int = 8, **kw) -> ManifoldCache:
    return ManifoldCache(model, max_batch_size=rows, max_tokens=kw.pop("max_tokens", 512), block_size=4, **kw)


def _alone(model, row: torch.Tensor, **kw):
    return model.generate(row, attention_mask=torch.ones_like(row), **{**GEN, **kw})


@pytest.fixture(scope="module")
def compiled():
    """A second copy of the tiny Llama, compiled with the gauge backend the way generate() uses it."""
    model = random_model("llama")
    model.compile(backend="gauge")
    return model


def _check_rows_alone(model, ids, mask, rows, cache):
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, **GEN)
    width = ids.shape[1]
    for i, row in enumerate(rows):
        want = _alone(LLAMA, row)
        assert out.sequences[i, width:].tolist() == want.sequences[0, row.shape[1]:].tolist(), f"row {i}"
        for got_step, want_step in zip(out.logits, want.logits, strict=True):
            torch.testing.assert_close(got_step[i], want_step[0], rtol=0, atol=1e-4)
    return out


def test_padded_rows_generate_what_they_generate_alone_eager():
    rows = _rows()
    ids, mask = _pad(rows)
    cache = _cache(LLAMA)
    _check_rows_alone(LLAMA, ids, mask, rows, cache)
    # no padding token is stored: each row holds its real tokens and the ones it generated (the last is not fed)
    assert [cache.seq_len(s) for s in cache.batch] == [n + GEN["max_new_tokens"] - 1 for n in PROMPTS]


@pytest.mark.parametrize("model", ["eager", "compiled"])
def test_right_padding_keeps_each_row_its_own_positions(compiled, model):
    """Right padding leaves padding between a prompt and what follows it (generate() would predict the first token
    at a padding column, so the steps are driven here): prefill logits at the real columns and two decode steps
    equal the rows run alone.  Compiled, the decode steps run the kernel; the prefill falls back to the gather (its
    real queries come before padding ones, which the kernel's bottom-right alignment does not express)."""
    model = compiled if model == "compiled" else LLAMA
    rows = _rows([6, 3, 1])
    ids, mask = _pad(rows, "right")
    cache = _cache(model)
    nxt = torch.randint(2, 128, (len(rows), 2), generator=torch.Generator().manual_seed(5))
    runs.clear()
    with torch.no_grad():
        logits = [model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits]
        for step in range(2):
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], 1)
            positions = (mask.cumsum(-1) - 1)[:, -1:]
            logits.append(model(input_ids=nxt[:, step:step + 1], attention_mask=mask, position_ids=positions,
                                past_key_values=cache).logits)
        for i, row in enumerate(rows):
            want = LLAMA(input_ids=torch.cat([row, nxt[i:i + 1]], 1)).logits[0]
            n = row.shape[1]
            torch.testing.assert_close(logits[0][i, :n], want[:n], rtol=0, atol=1e-4)
            for step in range(2):
                torch.testing.assert_close(logits[1 + step][i, 0], want[n + step], rtol=0, atol=1e-4)
    assert runs["masked_fallback"] == (LAYERS if model is compiled else 0)


def test_padded_rows_compiled_run_the_kernel_on_every_layer(compiled):
    rows = _rows(seed=1)
    ids, mask = _pad(rows)
    runs.clear()
    _check_rows_alone(compiled, ids, mask, rows, _cache(compiled))
    assert runs["masked_fallback"] == 0
    assert runs["kernel"] >= LAYERS * GEN["max_new_tokens"]


@pytest.mark.parametrize("kw", [dict(num_beams=3), dict(num_return_sequences=2, do_sample=True, top_k=4)],
                         ids=["beams", "samples"])
def test_padded_beams_and_samples_equal_dynamic_cache(compiled, kw):
    """Beams and samples over a fresh cache, compiled: every layer call runs the kernel, and the tokens are the ones
    transformers' own cache gives for the same padded batch (left padding: its positions are the rows' own)."""
    ids, mask = _pad(_rows(seed=2))
    torch.manual_seed(0)
    want = LLAMA.generate(ids, attention_mask=mask, past_key_values=DynamicCache(config=LLAMA.config), **{**GEN, **kw})
    runs.clear()
    torch.manual_seed(0)
    got = compiled.generate(ids, attention_mask=mask, past_key_values=_cache(compiled, rows=16), **{**GEN, **kw})
    assert torch.equal(got.sequences, want.sequences)
    assert runs["masked_fallback"] == 0 and runs["kernel"] >= LAYERS * GEN["max_new_tokens"]


def test_config_built_cache_with_padding_is_exact_compiled(compiled):
    """A cache built from a config cannot see the mask: the padding is stored and masked, the compiled step falls
    back to the gather, and a query that sees no key gives 0 (the NaN that padded rows once produced)."""
    rows = _rows(seed=3)
    ids, mask = _pad(rows)
    cache = ManifoldCache(LLAMA.config, max_batch_size=4, max_tokens=256, block_size=4)
    cache.new_sequences(len(rows))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = compiled(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache).logits
        for i, row in enumerate(rows):
            want = LLAMA(input_ids=row).logits[0]
            torch.testing.assert_close(got[i, -row.shape[1]:], want, rtol=0, atol=1e-4)
    assert not got.isnan().any()


def _state(cache: ManifoldCache):
    return ({s: cache.mapping(s) for s in cache.sequences}, cache.batch, cache.free_blocks, cache.get_seq_length())


@pytest.mark.parametrize("bad", ["width", "between", "positions", "history"])
def test_bad_masks_are_refused_naming_the_argument_state_unchanged(bad):
    rows = _rows([4, 2])
    ids, mask = _pad(rows)
    cache = _cache(LLAMA)
    with torch.no_grad():
        LLAMA(input_ids=ids, attention_mask=mask, past_key_values=cache)
    before = _state(cache)
    step = torch.ones(2, 3, dtype=torch.long)
    kwargs = dict(input_ids=step, attention_mask=torch.cat([mask, torch.ones_like(step)], 1))
    if bad == "width":
        kwargs["attention_mask"] = torch.ones(2, 2, dtype=torch.long)  # narrower than the new tokens
        match = "attention_mask: expected"
    elif bad == "between":
        kwargs["attention_mask"][1, -3:] = torch.tensor([1, 0, 1])
        match = "padding between"
    elif bad == "positions":
        kwargs["position_ids"] = torch.tensor([[4, 5, 7], [2, 3, 4]])
        match = "position_ids"
    else:
        kwargs["attention_mask"][1, 0] = 1
        match = "attention_mask: row 1 marks"
    with pytest.raises(ValueError, match=match), torch.no_grad():
        LLAMA(past_key_values=cache, **kwargs)
    assert _state(cache) == before


def test_padded_batch_without_its_mask_is_refused():
    ids, mask = _pad(_rows([4, 2]))
    cache = _cache(LLAMA)
    with torch.no_grad():
        LLAMA(input_ids=ids, attention_mask=mask, past_key_values=cache)
        with pytest.raises(ValueError, match="attention_mask: the batch's rows are padded"):
            LLAMA(input_ids=torch.ones(2, 1, dtype=torch.long), past_key_values=cache)


def test_generate_on_a_torch_compile_wrapper_warns_that_it_runs_uncompiled():
    model = random_model("llama")
    fast = torch.compile(model, backend="gauge")
    ids = torch.randint(2, 128, (1, 4))
    runs.clear()
    with pytest.warns(UserWarning, match="model.compile"):
        fast.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=_cache(model), max_new_tokens=2)
    assert runs["kernel"] == 0  # nothing compiled ran: what the warning says


def test_prefill_and_splice_into_a_padded_batch():
    """A chunk prefilled while the batch is padded (its own forward, unpadded) and spliced into a padded row: the
    batch keeps generating with a mask that marks each row's tokens, and the row's next logits are those of the same
    edit on that row alone, unpadded."""
    rows = _rows([5, 2])
    ids, mask = _pad(rows)
    doc = torch.randint(2, 128, (1, 6), generator=torch.Generator().manual_seed(9))
    nxt = torch.tensor([[7], [9]])
    cache, alone = _cache(LLAMA), _cache(LLAMA)
    with torch.no_grad():
        LLAMA(input_ids=ids, attention_mask=mask, past_key_values=cache)
        chunk = cache.prefill(LLAMA, doc)
        assert cache.get_seq_length() == ids.shape[1]  # the padded width, as before the prefill
        cache.splice(cache.batch[1], chunk, 0)
        held = [cache.seq_len(s) for s in cache.batch]
        assert held == [5, 8]
        step_mask = torch.zeros(2, max(held) + 1, dtype=torch.long)
        for i, n in enumerate(held):
            step_mask[i, max(held) - n:] = 1
        got = LLAMA(input_ids=nxt, attention_mask=step_mask, position_ids=torch.tensor([[n] for n in held]),
                    past_key_values=cache).logits
        LLAMA(input_ids=rows[1], past_key_values=alone)
        alone.splice(alone.batch[0], alone.prefill(LLAMA, doc), 0)
        want = LLAMA(input_ids=nxt[1:], past_key_values=alone).logits
    torch.testing.assert_close(got[1, -1], want[0, -1], rtol=0, atol=1e-4)


def test_a_padded_batch_whose_rows_even_out_takes_an_all_ones_mask():
    """Rows padded once, then equal in length (a scheduler's step after the short rows caught up): a mask of all ones
    is the right mask, and the batch leaves its padded view."""
    rows = _rows([3, 1])
    ids, mask = _pad(rows)
    cache = _cache(LLAMA)
    with torch.no_grad():
        LLAMA(input_ids=ids, attention_mask=mask, past_key_values=cache)
        LLAMA(input_ids=torch.tensor([[5], [6]]), attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]),
              position_ids=torch.tensor([[3], [1]]), past_key_values=cache)
        cache.set_batch([cache.batch[1]])  # one row alone: all ones
        LLAMA(input_ids=torch.tensor([[7]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
              past_key_values=cache)
    assert cache.get_seq_length() == 3
