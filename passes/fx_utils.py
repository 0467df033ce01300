"""Small FX helpers shared by the detectors: op sets, layout chains, constant folding, node insertion."""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

aten = torch.ops.aten
prims = torch.ops.prims

#: Ops that only change how elements are laid out (no arithmetic): a chain of them is an index map.
LAYOUT_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
    aten.clone.default, aten.permute.default, aten.transpose.int, aten.t.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.default, aten.alias.default, aten.contiguous.default,
    aten.slice.Tensor, prims.convert_element_type.default, aten._to_copy.default,
}


class AnalysisError(Exception):
    """A condition of the proof failed; the message is the reason shown to the user."""


def val(node) -> object:
    """The traced value (fake tensor / SymInt) of a node, or the constant itself."""
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def shape(node) -> tuple:
    v = val(node)
    if not isinstance(v, torch.Tensor):
        raise AnalysisError(f"no tensor metadata on {getattr(node, 'name', node)}")
    return tuple(v.shape)


def static_shape(node) -> tuple[int, ...]:
    s = shape(node)
    if not all(isinstance(d, int) for d in s):
        raise AnalysisError(f"dynamic shape {s} on {node.name}: the proof needs static shapes")
    return s


def is_call(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def getitem_of(node, index: int):
    """The `getitem(node, index)` user of a multi-output node, or None."""
    for user in node.users:
        if user.target is operator.getitem and user.args[1] == index:
            return user
    return None


def _same_dtype_convert(node) -> bool:
    if node.target is prims.convert_element_type.default:
        return val(node).dtype == val(node.args[0]).dtype
    if node.target is aten._to_copy.default:
        return set(node.kwargs) <= {"dtype"} and val(node).dtype == val(node.args[0]).dtype
    return True


def layout_root(node):
    """Walk back through layout-only ops (dtype-preserving converts included) to their source."""
    while is_call(node, *LAYOUT_OPS) and _same_dtype_convert(node):
        node = node.args[0]
    return node


def real_mode(fn):
    """Run `fn` on real tensors even inside a tracing fake mode (AOT compilers are called in one)."""

    def wrapped(*args, **kwargs):
        with unset_fake_temporarily():
            return fn(*args, **kwargs)

    return wrapped


@real_mode
def probe_chain(
    root, node, expected: Callable[[torch.Tensor], torch.Tensor], extra_ops: frozenset = frozenset()
) -> None:
    """Prove that the chain root -> node computes `expected(root)` by running it on distinct values.

    Layout ops (and `extra_ops` such as neg/cat) are index maps independent of the data, so equality
    on a tensor of distinct integers (exact in float64) proves equality for every input of that shape.
    """
    base = torch.arange(1, torch.Size(static_shape(root)).numel() + 1, dtype=torch.float64)
    memo = {root: base.reshape(static_shape(root))}
    allowed = LAYOUT_OPS | extra_ops

    def ev(n):
        if isinstance(n, (list, tuple)):
            return type(n)(ev(a) for a in n)
        if not isinstance(n, fx.Node):
            return n
        if n in memo:
            return memo[n]
        if not is_call(n, *allowed):
            raise AnalysisError(f"{n.name} ({n.target}) is not a pure layout op")
        args = ev(list(n.args))
        kwargs = {k: v for k, v in n.kwargs.items() if k not in ("dtype", "layout", "device", "pin_memory")}
        if n.target in (prims.convert_element_type.default, aten._to_copy.default):
            out = args[0]
        else:
            out = n.target(*args, **kwargs)
        memo[n] = out
        return out

    got, want = ev(node), expected(memo[root])
    if got.shape != want.shape or not torch.equal(got, want):
        raise AnalysisError(f"{node.name} is not the expected layout of {root.name}")


@real_mode
def const_eval(node, owner: torch.nn.Module | None):
    """Evaluate a node whose inputs are all constants (iota, full, arange, get_attr, ...).

    Raises AnalysisError naming the runtime input it depends on.
    """
    memo: dict = {}

    def ev(n):
        if not isinstance(n, fx.Node):
            if isinstance(n, (list, tuple)):
                return type(n)(ev(a) for a in n)
            return n
        if n in memo:
            return memo[n]
        if n.op == "placeholder":
            raise AnalysisError(f"the mask depends on the runtime input {n.name}")
        if n.op == "get_attr":
            out = operator.attrgetter(n.target)(owner)
        elif n.op == "call_function":
            out = n.target(*ev(list(n.args)), **{k: ev(v) for k, v in n.kwargs.items()})
        else:
            raise AnalysisError(f"the mask depends on {n.op} {n.name}")
        if isinstance(out, torch.SymInt) or (isinstance(out, torch.Tensor) and out.device.type == "meta"):
            raise AnalysisError("the mask has dynamic shape")
        memo[n] = out
        return out

    return ev(node)


def location(node) -> str:
    """Last frame of the node's stack trace (file:line in function), or the node name."""
    trace = node.meta.get("stack_trace") or ""
    frames = [ln.strip() for ln in trace.splitlines() if ln.strip().startswith("File ")]
    if not frames:
        return node.name
    return frames[-1].replace("File ", "").replace('"', "")


class Builder:
    """Insert call_function nodes before `anchor`, with fake `meta['val']` so later passes see shapes."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node):
        self.graph = graph
        self.anchor = anchor
        vals = [n.meta.get("val") for n in graph.nodes]
        self.fake_mode = torch._guards.detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])

    def __call__(self, target, *args, **kwargs) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        node.meta["stack_trace"] = self.anchor.meta.get("stack_trace")
        if self.fake_mode is not None:
            to_val = lambda a: val(a) if isinstance(a, fx.Node) else a
            fargs = fx.node.map_aggregate(args, to_val)
            fkwargs = fx.node.map_aggregate(kwargs, to_val)
            with self.fake_mode:
                node.meta["val"] = target(*fargs, **fkwargs)
        return node
