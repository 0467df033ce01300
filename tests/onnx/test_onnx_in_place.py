"""The exported step's pool updates run in place in onnxruntime (issue 21): the exporter's identity Transposes are
dropped without changing a value, and each pool output is one ScatterND of its pool input."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from gaugecompile.onnx.in_place import drop_identity_transposes, in_place_pool_outputs


def _transpose(src: str, dst: str, perm: list[int]) -> onnx.NodeProto:
    return helper.make_node("Transpose", [src], [dst], perm=perm)


def _graph() -> onnx.ModelProto:
    """x -> T(id) -> Relu -> T(id) -> y (producer renamed); x -> T(id) -> z (fed by an input: kept);
    x -> T(1,0) -> w (not the identity: kept); Relu's output also read by Neg -> u."""
    nodes = [_transpose("x", "a", [0, 1]), helper.make_node("Relu", ["a"], ["b"]), _transpose("b", "y", [0, 1]),
             helper.make_node("Neg", ["b"], ["u"]), _transpose("x", "z", [0, 1]), _transpose("x", "w", [1, 0])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
            for n, shape in (("y", [2, 3]), ("u", [2, 3]), ("z", [2, 3]), ("w", [3, 2]))]
    graph = helper.make_graph(nodes, "g", [x], outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_identity_transposes_go_and_every_output_stays():
    model, x = _graph(), np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    want = _run(model, x)
    assert drop_identity_transposes(model.graph) == 2
    onnx.checker.check_model(model, full_check=True)
    kept = [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
    assert kept == [("Relu", ["x"], ["y"]), ("Neg", ["y"], ["u"]), ("Transpose", ["x"], ["z"]),
                    ("Transpose", ["x"], ["w"])]
    for got, ref in zip(_run(model, x), want, strict=True):
        np.testing.assert_array_equal(got, ref)
    assert drop_identity_transposes(model.graph) == 0  # nothing left that it may remove


def _scatter_model(extra_reader: bool) -> onnx.GraphProto:
    """pool -> ScatterND -> out, with an optional Identity reading the pool first (what makes it unsafe)."""
    src = "copy" if extra_reader else "pool"
    nodes = [helper.make_node("Shape", ["pool"], ["shape"]), helper.make_node("ScatterND", [src, "i", "u"], ["out"])]
    if extra_reader:
        nodes.insert(0, helper.make_node("Identity", ["pool"], ["copy"]))
    return helper.make_graph(nodes, "g", [], [])


@pytest.mark.parametrize("extra_reader", [False, True])
def test_a_pool_is_in_place_only_when_its_scatter_is_its_one_reader(extra_reader):
    graph = _scatter_model(extra_reader)
    assert in_place_pool_outputs(graph, ["pool"], ["out"]) == ([] if extra_reader else ["pool"])
    assert in_place_pool_outputs(_scatter_model(False), ["pool"], ["other"]) == []  # scatter writes another output
