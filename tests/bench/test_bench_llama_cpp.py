"""The llama.cpp comparison's parts that run without llama.cpp: what each side reads, the medians, the skip."""

import importlib.util
import json
import math

import numpy as np
import pytest
from gguf import GGUFWriter

from gaugecompile.bench.llama_cpp import bytes_per_token, median_plain_and_shift, unavailable
from gaugecompile.cli import main
from gaugecompile.models.random_configs import random_model


def test_bytes_per_token_counts_the_files_tensors_and_an_f16_kv_cache(tmp_path):
    path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_tensor("a", np.zeros((3, 5), np.float32))  # 60 bytes
    writer.add_tensor("b", np.zeros(7, np.float16))  # 14 bytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = random_model("llama")
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 100
    reads = bytes_per_token(path, model, 100)
    assert reads["llama_cpp"] == 74 + 2 * kv
    assert reads["gauge"] == sum(p.numel() for p in model.parameters()) * 4 + 4 * kv


def test_medians_split_the_steps_that_evicted_from_the_others():
    plain, shift = median_plain_and_shift([1.0, 9.0, 2.0, 3.0, 7.0], [False, True, False, False, True])
    assert (plain, shift) == (2.0, 8.0)
    plain, shift = median_plain_and_shift([1.0, 2.0], [False, False])
    assert plain == 1.5 and math.isnan(shift)
    with pytest.raises(ValueError):  # one flag per step
        median_plain_and_shift([1.0, 2.0], [False])


def test_the_suite_skips_llama_cpp_with_its_reason_for_a_model_without_a_gguf_file(tmp_path):
    rc = main(["bench", "--quick", "--only", "9", "--out", str(tmp_path)])
    scenario = json.loads((tmp_path / "results.json").read_text())["scenarios"]["9_llama_cpp"]
    assert rc == 0
    assert "GGUF" in scenario["skipped"] or "llama-cpp-python" in scenario["skipped"]


def test_unavailable_says_why_llama_cpp_cannot_run_a_file(tmp_path):
    reason = unavailable(tmp_path / "missing.gguf")
    if importlib.util.find_spec("llama_cpp") is None:
        assert "llama-cpp-python is not installed" in reason
    else:  # the child process cannot load it
        assert "failed a probe decode of missing.gguf" in reason
