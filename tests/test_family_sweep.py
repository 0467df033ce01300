"""The family sweep (`gaugecompile.models.sweep`) on a sample of model types: none is silently wrong.

Each status is pinned, so that a family that changes (better or worse) shows here; the full sweep over every
rotary causal LM of the installed transformers is `python -m gaugecompile.models.sweep` (README).
"""

import pytest

from gaugecompile.models.sweep import check_family

EXPECTED = {
    "llama": "rewritten",
    "smollm3": "rewritten",  # NoPE layers by config flag, rewritten with a zero basis
    "phi": "rewritten",  # partial rotary
    "gpt_neox": "rewritten",
    "qwen3": "rewritten",
    "cohere2": "rewritten",  # NoPE full layers found by the probe; interleaved sliding layers, windowed op
    "gemma3_text": "rewritten",  # two bases; sliding windows read from the model's masks at run time
    "mistral": "rewritten",  # every layer sliding: past the window, the op's sliding window over the pool
    "gpt_oss": "rewritten",  # sink logits: a factor sigmoid(lse - sink) on the op's output
    "gemma2": "rewritten",  # logit soft-capping in eager attention: the op's softcap
    "moshi": "rewritten",  # a window only its cache bounds (no mask): one query over the slice, its own window
    "granite_swa": "rewritten",  # post-attention sink scaling: its logsumexp of the scores is the op's lse
    "mellum": "rewritten",  # a graph break per layer: every layer's kernel run counted at run time
    "deepseek_v3": "exact",  # multi-head latent attention: the latent and RoPE key cached, attention not rewritten
    "mimo_v2_flash": "refused",  # values of another width than the keys
    "qwen3_next": "rewritten",  # hybrid: gated delta-rule layers' states kept per sequence, the delete refused
    "falcon_h1": "rewritten",  # every layer both a Mamba-2 state and attention
    "falcon": "rewritten",  # multi-query SDPA, decomposed by torch into scaled operands and _safe_softmax
    "gpt_neox_japanese": "rewritten",  # scores through baddbmm over zeros
    "llama4_text": "rewritten",  # complex-form RoPE, chunked-attention layers, NoPE layers by flag
    "nanochat": "rewritten",  # rotates by -theta (its rotate_half flips the signs): negated frequencies
    "gemma4_text": "rewritten",  # per-layer head dims (512 on global layers), a proportional basis
}


@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_a_sample_of_families_keeps_its_status(model_type):
    result = check_family(model_type)
    assert result.status == EXPECTED[model_type], result
