"""The op layer: `gauge::rotated_query_attention` and its companions, each with a schema, a fake kernel and a
reference.

- `attention`: the op, its autograd and the public `rotated_query_attention`;
- `paged_attention`: the CPU torch loop (a paged loop that never materialises the view), where no native kernel
  (`gaugecompile.codegen.native`) can be built;
- `triton_attention`: `gauge::rotated_query_attention_triton`, the generated Triton kernels as a `triton_op`
  (registered on first use: it imports Triton);
- `masked_attention`: `gauge::rotated_query_attention_masked` (a mask known only at run time);
- `materialize`: `gauge::materialize_kv` (the cache's gather + re-rotate, the node the passes remove);
- `attention_backward`: `gauge::rotated_query_attention_backward`, the explicit adjoint;
- `reference`: gather + re-rotate + plain attention, the definition of correct;
- `masks`: which keys a query sees (causal, sliding window) and logit soft-capping, shared by all of them;
- `rope_check`: `gauge::check_rope_basis` (the model's query basis against a cache's, at run time);
- `checks`: validation of the op's inputs with errors that name the argument (the mapping's values:
  `gaugecompile.block_tables`).

Importing this package registers every op but the Triton one.
"""

from . import (
    masked_attention,  # noqa: F401  (registers gauge::rotated_query_attention_masked)
    rope_check,  # noqa: F401  (registers gauge::check_rope_basis)
)
from .attention import IMPLS, rotated_query_attention
from .materialize import materialize_kv
from .reference import reference_attention

__all__ = ["IMPLS", "materialize_kv", "reference_attention", "rotated_query_attention"]
