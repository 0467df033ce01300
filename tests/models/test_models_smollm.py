"""The real model (SmolLM2-135M-Instruct, downloaded once into the user cache): greedy parity of the gauge
backend + ManifoldCache against eager DynamicCache, and every one of its 30 attention sites rewritten.

One compiled decode step serves both tests (the passes' reports of that very compilation are checked)."""

import pytest
import torch
from transformers import DynamicCache

from gaugecompile.bench.decode_loops import gauge_forward, greedy, manifold_cache
from gaugecompile.bench.prompts import QUESTION, chat_ids
from gaugecompile.models import load

pytestmark = pytest.mark.slow

STEPS = 8


@pytest.fixture(scope="module")
def run():
    """(model, tokenizer, eager tokens, gauge tokens, pass reports of the compiled decode step)."""
    model, tokenizer = load()
    ids = chat_ids(tokenizer, model.config.vocab_size, QUESTION)
    eager, _ = greedy(model.forward, ids, DynamicCache(config=model.config), STEPS)
    reports: list = []
    torch._dynamo.reset()
    forward = gauge_forward(model, report_sink=reports)
    cache = manifold_cache(model, max_tokens=ids.shape[1] + STEPS + 16)
    gauge, _ = greedy(forward, ids, cache, STEPS, prefill=model)  # prompt eagerly, every decode step compiled
    return model, tokenizer, eager, gauge, reports


def test_greedy_tokens_equal_eager_dynamic_cache(run):
    model, tokenizer, eager, gauge, _ = run
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert tokenizer.decode(eager, skip_special_tokens=True).startswith("The capital of France is Paris")
    assert gauge == eager


def test_all_thirty_sites_rewritten(run):
    model, _, _, _, reports = run
    rewritten = [site for report, _, _ in reports for site in report.rewritten]
    refused = [site.describe() for report, _, _ in reports for site in report.refused]
    assert len(rewritten) == model.config.num_hidden_layers == 30, refused
    assert not refused
