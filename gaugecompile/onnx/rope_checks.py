"""The RoPE checks of an exported program, made at export time: ONNX has no run-time error to raise.

The passes guard every rewritten attention over a cache with `gauge::check_rope_basis(model inv_freq, cache
inv_freq)`.  In an exported program both vectors are the program's own buffers or constants, so
`settle_rope_checks` evaluates each check on them (raising the op's ValueError on a mismatch) and replaces
the check by the cache's vector; a check whose vectors are graph inputs cannot be decided here and is dropped
with a warning.
"""

from __future__ import annotations

import warnings

import torch
from torch import fx

__all__ = ["settle_rope_checks"]

CHECK_ROPE = torch.ops.gauge.check_rope_basis.default


class _Unknown(LookupError):
    """A value that only exists at run time (an input of the exported program)."""


def _known_values(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    sig = ep.graph_signature  # non-persistent buffers live in `constants`, not in the state dict
    stores = {**ep.constants, **ep.state_dict}
    named = (*sig.inputs_to_parameters.items(), *sig.inputs_to_buffers.items(),
             *sig.inputs_to_lifted_tensor_constants.items())
    return {name: stores[fqn] for name, fqn in named if fqn in stores}


def settle_rope_checks(ep: torch.export.ExportedProgram) -> int:
    """Decide every `check_rope_basis` of `ep` now and remove it; returns how many were proven."""
    known, memo = _known_values(ep), {}

    def ev(n):
        if isinstance(n, (list, tuple)):
            return type(n)(ev(a) for a in n)
        if not isinstance(n, fx.Node):
            return n
        if n not in memo:
            if n.op == "placeholder":
                if n.name not in known:
                    raise _Unknown(n.name)
                memo[n] = known[n.name]
            elif n.op == "call_function":
                memo[n] = n.target(*ev(n.args), **{k: ev(v) for k, v in n.kwargs.items()})
            else:
                raise _Unknown(n.name)
        return memo[n]

    proven = 0
    graph = ep.graph_module.graph
    for node in [n for n in graph.nodes if n.target is CHECK_ROPE]:
        query, cache = node.args
        try:
            CHECK_ROPE(ev(query), ev(cache))  # raises ValueError on a mismatch
            proven += 1
        except _Unknown as unknown:
            warnings.warn(f"gaugecompile.export_onnx: the RoPE basis check {node.name} reads the program input "
                          f"{unknown}; it cannot run in ONNX and is dropped", stacklevel=3)
        node.replace_all_uses_with(cache)
        graph.erase_node(node)
    ep.graph_module.recompile()
    return proven
