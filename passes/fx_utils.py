"""Small FX helpers shared by the detectors: op sets, layout chains, constant folding, node insertion."""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable

import sympy
import torch
from torch import fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten
prims = torch.ops.prims

#: Ops that only change how elements are laid out (no arithmetic): a chain of them is an index map.
LAYOUT_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
    aten.clone.default, aten.permute.default, aten.transpose.int, aten.t.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.default, aten.alias.default, aten.contiguous.default,
    aten.slice.Tensor, prims.convert_element_type.default, aten._to_copy.default,
    # pre-dispatch (torch.export) spellings
    aten.flatten.using_ints, aten.to.dtype, aten.type_as.default,
}
#: Conversions (identity on values for the proofs; layout_root only walks through dtype-preserving ones).
CONVERTS = (prims.convert_element_type.default, aten._to_copy.default, aten.to.dtype, aten.type_as.default)


class AnalysisError(Exception):
    """A condition of the proof failed; the message is the reason shown to the user."""


class RuntimeValueError(AnalysisError):
    """The condition depends on values only known at run time (a graph input), so no static proof exists."""


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


def as_int(d):
    """`d` as an int when it is one, or a SymInt the shape environment has pinned to a constant."""
    if isinstance(d, torch.SymInt):
        expr = d.node.shape_env.replace(d.node.expr)
        if expr.is_number:
            return int(expr)
    return d


def static_dim(node, dim: int) -> int:
    """One dimension that must be static (head count, head dim)."""
    d = as_int(shape(node)[dim])
    if not isinstance(d, int):
        raise AnalysisError(f"dimension {dim} of {node.name} is dynamic ({d}); it must be static")
    return d


def known_equal(a, b) -> bool:
    """True when two sizes (ints or SymInts, or tuples of them) are equal for every value of their symbols.

    Decided without adding guards: a pass must not narrow what the compiled graph accepts.
    """
    if isinstance(a, (tuple, list, torch.Size)) or isinstance(b, (tuple, list, torch.Size)):
        return len(a) == len(b) and all(known_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return bool(statically_known_true(a == b))


# ----------------------------------------------------------------------------- size environments
#: Extra assignments tried besides the traced sizes; distinct per symbol so independent sizes differ.
_PERTURBATIONS = (8, 21)
#: Moves of one symbol alone (small ones first: guards often bound a size by a product of others).
_SINGLE_STEPS = (1, -1, 3, 8)
_ENVS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _shape_env(graph: fx.Graph):
    for node in graph.nodes:
        v = node.meta.get("val")
        vals = [v] if not isinstance(v, torch.Tensor) else list(v.shape)
        for d in vals:
            if isinstance(d, torch.SymInt):
                return d.node.shape_env
    return None


def _free_symbols(graph: fx.Graph, shape_env) -> list[sympy.Symbol]:
    found: dict = {}
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        v = node.meta.get("val")
        vals = list(v.shape) if isinstance(v, torch.Tensor) else [v]
        for d in vals:
            if isinstance(d, torch.SymInt):
                for sym in shape_env.replace(d.node.expr).free_symbols:
                    found[sym] = None
    return sorted(found, key=str)


def size_envs(graph: fx.Graph) -> list[dict]:
    """Assignments of the graph's size symbols under which the proofs are checked.

    Static graphs: one empty assignment.  Dynamic graphs: the traced sizes, then every symbol moved
    alone, all symbols moved by different amounts, and all scaled by 2 -- each kept only if it
    satisfies every guard the graph was compiled under (sizes stay >= 2: 0 and 1 are specialised).
    A pattern that holds at all of them follows
    the symbols (a mask built as `kv_idx <= q_idx + offset`, a view of `[b, h, s, d]`); one that holds
    at the traced sizes by chance (two independent lengths that happen to be equal) is caught.
    """
    if graph in _ENVS:
        return _ENVS[graph]
    shape_env = _shape_env(graph)
    envs: list[dict] = [{}]
    if shape_env is not None:
        symbols = _free_symbols(graph, shape_env)
        hints = {s: shape_env.backed_var_to_val.get(s) for s in symbols}
        if any(h is None for h in hints.values()):
            raise AnalysisError("the graph has data-dependent (unbacked) sizes")
        hints = {s: int(h) for s, h in hints.items()}
        candidates = [{**hints, s: h + step} for s, h in hints.items() for step in _SINGLE_STEPS if h + step > 1]
        candidates += [{s: h + step * (i + 1) for i, (s, h) in enumerate(hints.items())} for step in _PERTURBATIONS]
        candidates.append({s: 2 * h for s, h in hints.items()})
        guards = [g.expr for g in shape_env.guards]
        envs = [{s: sympy.Integer(h) for s, h in hints.items()}]
        for cand in candidates:
            env = {s: sympy.Integer(h) for s, h in cand.items()}
            if all(_holds(g, env, shape_env) for g in guards):
                envs.append(env)
    _ENVS[graph] = envs
    return envs


def _holds(expr, env: dict, shape_env) -> bool:
    try:
        return bool(shape_env.replace(expr).xreplace(env))
    except TypeError:
        return False


def concrete(value, env: dict):
    """`value` (int, SymInt, or a list/tuple of them) under the assignment `env`."""
    if isinstance(value, (list, tuple, torch.Size)):
        return type(value)(concrete(v, env) for v in value) if not isinstance(value, torch.Size) else \
            tuple(concrete(v, env) for v in value)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        expr = value.node.shape_env.replace(value.node.expr).xreplace(env)
        if expr.free_symbols:
            raise AnalysisError(f"size {value} depends on symbols the proof cannot assign")
        if isinstance(value, torch.SymInt):
            return int(expr)
        return float(expr) if isinstance(value, torch.SymFloat) else bool(expr)
    return value


def concrete_shape(node, env: dict) -> tuple[int, ...]:
    return tuple(concrete(shape(node), env))


def is_call(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def getitem_of(node, index: int):
    """The `getitem(node, index)` user of a multi-output node, or None."""
    for user in node.users:
        if user.target is operator.getitem and user.args[1] == index:
            return user
    return None


def _same_dtype_convert(node) -> bool:
    if node.target in (prims.convert_element_type.default, aten.to.dtype, aten.type_as.default):
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
    root, node, expected: Callable[[torch.Tensor, Callable], torch.Tensor], extra_ops: frozenset = frozenset()
) -> None:
    """Prove that the chain root -> node computes `expected(root, dims)` by running it on distinct values.

    Layout ops (and `extra_ops` such as neg/cat) are index maps independent of the data, so equality
    on a tensor of distinct integers (exact in float64) proves equality for every input of that shape.
    Dynamic shapes: checked under every assignment of `size_envs`; `dims(n)` is n's shape under it.
    """
    for env in size_envs(node.graph):
        _probe_once(root, node, expected, extra_ops, env)


def _eval_size_node(n, env):
    """A node computing a size (sym_size, a SymInt placeholder, size arithmetic) under `env`."""
    v = val(n)
    if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool):
        return concrete(v, env)
    return None


def _probe_once(root, node, expected, extra_ops, env) -> None:
    root_shape = concrete_shape(root, env)
    base = torch.arange(1, torch.Size(root_shape).numel() + 1, dtype=torch.float64)
    memo = {root: base.reshape(root_shape)}
    allowed = LAYOUT_OPS | extra_ops

    def ev(n):
        if isinstance(n, (list, tuple)):
            return type(n)(ev(a) for a in n)
        if isinstance(n, torch.SymInt):
            return concrete(n, env)
        if not isinstance(n, fx.Node):
            return n
        if n in memo:
            return memo[n]
        size = _eval_size_node(n, env)
        if size is not None:
            return size
        if not is_call(n, *allowed):
            raise AnalysisError(f"{n.name} ({n.target}) is not a pure layout op")
        args = ev(list(n.args))
        kwargs = {k: v for k, v in n.kwargs.items() if k not in ("dtype", "layout", "device", "pin_memory")}
        if n.target in CONVERTS:
            out = args[0]
        else:
            out = n.target(*args, **kwargs)
        memo[n] = out
        return out

    got, want = ev(node), expected(memo[root], lambda n: concrete_shape(n, env))
    if got.shape != want.shape or not torch.equal(got, want):
        raise AnalysisError(f"{node.name} is not the expected layout of {root.name}")


@real_mode
def const_eval(node, owner: torch.nn.Module | None, env: dict | None = None, given: dict | None = None):
    """Evaluate a node whose inputs are all constants (iota, full, arange, get_attr, sizes), sizes taken
    under the assignment `env` (see `size_envs`), or the values `given` for some of its nodes (a probe).

    Raises AnalysisError naming the runtime input it depends on.
    """
    env = env or {}
    memo: dict = dict(given or {})

    def ev(n):
        if not isinstance(n, fx.Node):
            if isinstance(n, (list, tuple)):
                return type(n)(ev(a) for a in n)
            return concrete(n, env)
        if n in memo:
            return memo[n]
        size = _eval_size_node(n, env)
        if size is not None:
            return size
        if n.op == "placeholder":
            raise RuntimeValueError(f"the mask depends on the runtime input {n.name}")
        if n.op == "get_attr":
            if owner is None:
                raise AnalysisError(f"{n.name} reads an attribute of a module that is not at hand")
            out = operator.attrgetter(n.target)(owner)
        elif n.op == "call_function":
            out = n.target(*ev(list(n.args)), **{k: ev(v) for k, v in n.kwargs.items()})
        else:
            raise AnalysisError(f"the mask depends on {n.op} {n.name}")
        if isinstance(out, torch.Tensor) and out.device.type == "meta":
            raise AnalysisError("the mask could not be evaluated (meta tensor)")
        memo[n] = out
        return out

    return ev(node)


#: Frames of shared helpers (attention dispatch, decorators, torch itself): the model's own frame is more useful.
_HELPER_FRAMES = ("/transformers/integrations/", "/transformers/utils/", "/transformers/masking_utils",
                  "/torch/", "/gaugecompile/")


def location(node) -> str:
    """The innermost frame of the node's stack trace in the model's own code (e.g. the attention module in
    modeling_llama.py rather than transformers' sdpa helper), as file:line in function; or the node name."""
    trace = node.meta.get("stack_trace") or ""
    frames = [ln.strip() for ln in trace.splitlines() if ln.strip().startswith("File ")]
    if not frames:
        return node.name
    own = [f for f in frames if not any(h in f for h in _HELPER_FRAMES)]
    return (own or frames)[-1].replace("File ", "").replace('"', "")


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
            if isinstance(target, torch._ops.OpOverload) and target.namespace == "gauge":
                # Inductor constrains a custom op's inputs to these strides only when it finds them here;
                # without them a pass-inserted op gets whatever layout its inputs happen to have
                node.meta["eager_input_vals"] = (fargs, fkwargs)
        return node
