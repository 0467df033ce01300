"""ManifoldCache under transformers tensor parallelism on 2 CPU ranks (gloo), against the unsharded model.

The scenario (`tp_scenario.py`) runs under `torch.distributed.run` on a sharded checkpoint: greedy and beam
`generate`, delete, splice of a prefilled chunk at 2^30, a streaming window over 2.5 windows, the compiled
gauge backend, with `check_sync()` after every generation step and edit.  Each rank's tokens must equal the
single-process run's, its logits within 1e-4; its pools hold half the KV heads; each edit sends a few hundred
bytes, and the agreement's failure modes are checked.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from gaugecompile.cache import ManifoldCache

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "tp_scenario.py")
_spec = importlib.util.spec_from_file_location("tp_scenario", SCRIPT)
tp_scenario = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tp_scenario)

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256)
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(num_key_value_heads=4, **SIZES)),  # MHA: 2 KV heads per rank
    "qwen2-gqa": lambda: Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **SIZES)),  # GQA: 1 KV head per rank
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def sharded_run(request, tmp_path_factory):
    """(single-process result, per-rank results, KV heads) of the scenario on one model."""
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    MODELS[request.param]().save_pretrained(root / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           SCRIPT, str(root / "model"), str(root)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    return tp_scenario.scenario(model), ranks, model.config.num_key_value_heads


def test_tokens_and_logits_equal_the_unsharded_model(sharded_run):
    single, ranks, _ = sharded_run
    for got in ranks:
        for key in ("greedy", "beams", "stream"):
            assert got[key].tolist() == single[key].tolist(), key
        for key in ("after_delete", "after_splice", "compiled"):
            torch.testing.assert_close(got[key], single[key], atol=1e-4, rtol=1e-4)
        assert got["stream_view"] == single["stream_view"] <= 4 + 12 + 4  # the window held over 30 new tokens


def test_every_step_checked_in_sync_and_every_layer_rewritten(sharded_run):
    single, ranks, heads = sharded_run
    for got in ranks:
        assert got["synced_steps"] == 6  # check_sync() passed after each of the 6 greedy steps
        assert got["pool_heads"] == heads // 2  # each rank's pools hold its half of the KV heads
        assert got["rewritten"] == single["rewritten"] == [2, 2]  # prefill and decode graphs, both layers
        assert not any(got["refused"])
        torch.testing.assert_close(got["compiled"], got["compiled_eager"], atol=1e-5, rtol=1e-5)


def test_edits_send_hundreds_of_bytes_and_the_same_on_every_rank(sharded_run):
    _, ranks, _ = sharded_run
    assert ranks[0]["bytes"] == ranks[1]["bytes"]
    sent = ranks[0]["bytes"]
    assert set(sent) >= {"delete", "splice at 2^30", "set_window", "fork 3", "reorder", "free", "free chunk"}
    assert 0 < max(sent.values()) < 1024, sent  # O(arguments), never O(tokens x dim)


def test_agreement_failure_modes(sharded_run):
    _, ranks, _ = sharded_run
    assert ranks[0]["src_args_win"] == ranks[1]["src_args_win"] == list(range(10))  # rank 0's delete(0, 1, 3)
    assert ranks[0]["spliced_len"] == ranks[1]["spliced_len"] == 13  # rank 1 passed None for the chunk
    for got in ranks:  # rank 0's bad arguments raise on both ranks, which stay in sync
        assert "start/end" in got["bad_edit"] and "5, 2" in got["bad_edit"]
        assert "sequence 0 differs between rank 0 and ranks [1]" in got["diverged"]


def test_a_group_needs_torch_distributed_initialised_and_one_process_needs_none():
    config = LlamaConfig(num_key_value_heads=2, **SIZES)
    with pytest.raises(ValueError, match="group: torch.distributed is not initialised"):
        ManifoldCache(config, max_batch_size=1, max_tokens=16, group=object())
    cache = ManifoldCache(config, max_batch_size=1, max_tokens=16)
    assert cache.tensor_parallel is None
    cache.check_sync()  # a single process: nothing to compare
