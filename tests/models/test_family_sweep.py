"""The family sweep (`gaugecompile.models.sweep`) against the project's list of families and their statuses
(`gaugecompile.models.families`): the list is the installed transformers' own, checks (1)-(3) hold for every type as
listed, and a sample also passes the compiled check (4) as listed, so that a family that changes (better or worse)
shows here.  The full sweep with check (4) for every type is `python benchmarks/arch_sweep.py` (README).
"""

import json

import pytest

from gaugecompile.models.families import SWEEP_STATUS
from gaugecompile.models.sweep import check_family, main, rotary_causal_lm_types

#: the sample whose compiled check runs in CI, and what each shows
SAMPLE = {
    "llama": "the plain Llama form: rotate-half RoPE, GQA by repeat_kv, SDPA",
    "smollm3": "NoPE layers by config flag, rewritten with a zero basis",
    "phi": "partial rotary",
    "gpt_neox": "fused QKV projection, partial rotary",
    "qwen3": "per-head norms of q and k before the rotation",
    "cohere2": "NoPE full layers found by the probe; interleaved sliding layers, windowed op",
    "gemma3_text": "two bases; sliding windows read from the model's masks at run time",
    "mistral": "every layer sliding: past the window, the op's sliding window over the pool",
    "gpt_oss": "sink logits: a factor sigmoid(lse - sink) on the op's output",
    "gemma2": "logit soft-capping in eager attention: the op's softcap",
    "moshi": "a window only its cache bounds (no mask): one query over the slice, its own window",
    "granite_swa": "post-attention sink scaling: its logsumexp of the scores is the op's lse",
    "mellum": "a graph break per layer: every layer's kernel run counted at run time",
    "deepseek_v3": "multi-head latent attention: the latent and RoPE key cached, attention not rewritten",
    "mimo_v2_flash": "values of another width than the keys",
    "qwen3_next": "hybrid: gated delta-rule layers' states kept per sequence, the delete refused",
    "falcon_h1": "every layer both a Mamba-2 state and attention",
    "falcon": "multi-query SDPA, decomposed by torch into scaled operands and _safe_softmax",
    "gpt_neox_japanese": "scores through baddbmm over zeros",
    "llama4_text": "complex-form RoPE, chunked-attention layers, NoPE layers by flag",
    "nanochat": "rotates by -theta (its rotate_half flips the signs): negated frequencies",
    "gemma4_text": "per-layer head dims (512 on global layers), a proportional basis",
}


#: what checks (1)-(3) give a type of each listed status (without check (4) every passing type is "exact")
_WITHOUT_COMPILING = {"rewritten": "exact", "exact": "exact", "refused": "refused", "harness": "harness"}


def test_the_list_is_every_rotary_causal_lm_of_the_installed_transformers():
    installed = set(rotary_causal_lm_types())
    assert not installed - set(SWEEP_STATUS), "new rotary causal LMs: add them to gaugecompile.models.families"
    assert not set(SWEEP_STATUS) - installed, "listed families the installed transformers no longer has"


@pytest.mark.parametrize("model_type", sorted(SWEEP_STATUS))
def test_every_family_constructs_generates_and_edits_as_listed(model_type):
    result = check_family(model_type, compile_check=False)
    assert result.status == _WITHOUT_COMPILING[SWEEP_STATUS[model_type]], result


@pytest.mark.parametrize("model_type", sorted(SAMPLE))
def test_a_sample_of_families_keeps_its_status_compiled(model_type):
    result = check_family(model_type)
    assert result.status == SWEEP_STATUS[model_type], (SAMPLE[model_type], result)


def test_sweep_in_worker_processes_reports_in_the_listed_order(tmp_path, capsys):
    """`--jobs 2` checks the types in two processes and writes the table in the order asked for, with the same
    statuses as checked here."""
    types = ["phi", "llama"]
    assert main(["--only", *types, "--jobs", "2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["model_type"], r["status"]) for r in rows] == [(t, SWEEP_STATUS[t]) for t in types]
    assert "[2/2]" in capsys.readouterr().err
