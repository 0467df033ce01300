"""`gaugecompile.onnx.run`: inputs are checked against the model's signature with clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gaugecompile
from gaugecompile import RopeSpec
from gaugecompile.onnx import export_onnx, run


class Attend(torch.nn.Module):
    rope = RopeSpec.from_base(10000.0, 8)

    def forward(self, q, k_pool, v_pool, block_table, block_delta, seq_lens):
        return gaugecompile.rotated_query_attention(q, k_pool, v_pool, block_table, block_delta, seq_lens, self.rope)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 2, 1, 8, generator=gen), torch.randn(3, 4, 1, 8, generator=gen),
              torch.randn(3, 4, 1, 8, generator=gen), torch.tensor([[2, 0], [1, 2]]),
              torch.tensor([[7, -3], [0, 5]]), torch.tensor([6, 3]))
    path = tmp_path_factory.mktemp("onnx") / "attend.onnx"
    batch = torch.export.Dim("batch")
    export_onnx(Attend(), inputs, path, dynamic_shapes=({0: batch}, None, None, {0: batch}, {0: batch}, {0: batch}))
    return path, inputs


def test_runs_from_sequence_and_mapping(model_path):
    path, inputs = model_path
    want = Attend()(*inputs).numpy()
    by_position = run(path, inputs)
    names = ["q", "k_pool", "v_pool", "block_table", "block_delta", "seq_lens"]
    by_name = run(path, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})
    assert len(by_position) == 1
    np.testing.assert_allclose(by_position[0], want, atol=1e-5)
    np.testing.assert_array_equal(by_position[0], by_name[0])


def test_bad_inputs_name_the_input(model_path):
    path, inputs = model_path
    names = ["q", "k_pool", "v_pool", "block_table", "block_delta", "seq_lens"]
    feeds = dict(zip(names, inputs, strict=True))
    with pytest.raises(ValueError, match=r"missing \['seq_lens'\]"):
        run(path, {n: t for n, t in feeds.items() if n != "seq_lens"})
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        run(path, {**feeds, "extra": inputs[0]})
    with pytest.raises(ValueError, match="takes 6 inputs"):
        run(path, inputs[:5])
    with pytest.raises(ValueError, match=r"inputs\['q'\]: expected rank 4"):
        run(path, {**feeds, "q": inputs[0][0]})
    with pytest.raises(ValueError, match=r"inputs\['k_pool'\]: dim 1 must be 4"):
        run(path, {**feeds, "k_pool": torch.randn(3, 2, 1, 8)})
    with pytest.raises(TypeError, match=r"inputs\['block_table'\]: expected dtype int64, got int32"):
        run(path, {**feeds, "block_table": inputs[3].int()})
    with pytest.raises(TypeError, match=r"inputs\['seq_lens'\]: expected a numpy array"):
        run(path, {**feeds, "seq_lens": [6, 3]})
    with pytest.raises(TypeError, match="inputs: expected a mapping"):
        run(path, inputs[0])


@pytest.mark.parametrize("name,value,match", [
    ("block_table", [[2, -1], [1, 2]], "block_table: block ids must lie in"),  # onnxruntime would wrap -1
    ("block_table", [[2, 3], [1, 2]], "block_table: block ids must lie in"),
    ("block_delta", [[2**31, 0], [0, 0]], "block_delta: expected -2"),
    ("seq_lens", [9, 3], "seq_lens: expected values in"),
    ("seq_lens", [0, 3], "seq_lens: expected values in"),
])
def test_mapping_values_are_checked_against_the_pools(model_path, name, value, match):
    """Issue 14, finding 7: an exported graph cannot check values, so `run` checks ids, lengths and deltas."""
    path, inputs = model_path
    names = ["q", "k_pool", "v_pool", "block_table", "block_delta", "seq_lens"]
    feeds = dict(zip(names, inputs, strict=True))
    with pytest.raises(ValueError, match=match):
        run(path, {**feeds, name: torch.tensor(value)})


def test_bad_path_or_provider(model_path, tmp_path):
    path, inputs = model_path
    with pytest.raises(ValueError, match="path: no ONNX file"):
        run(tmp_path / "missing.onnx", inputs)
    with pytest.raises(ValueError, match="providers"):
        run(path, inputs, providers=["NoSuchExecutionProvider"])
