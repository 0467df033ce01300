"""Export one decode step over a reorganised ManifoldCache to ONNX and run it in stock onnxruntime.

Shows: `CacheStep.capture` turns a transformers step into a module whose pools, block table, deltas and write
slots are inputs; `export_onnx` writes each rewritten attention as one `ai.gauge::RotatedQueryAttention` node
(defined for any runtime by a model-local function in standard ops); `run` executes the file with onnxruntime,
and its logits match eager, here after a span deletion and a document spliced at position 2^30.

    python examples/onnx_export.py                 # SmolLM2-135M-Instruct
    python examples/onnx_export.py --random llama  # a tiny random model
    python examples/onnx_export.py --random llama --out llama_step.onnx
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import onnx
import torch

from gaugecompile.bench.decode_loops import manifold_cache
from gaugecompile.bench.prompts import text_ids
from gaugecompile.models import add_model_arguments, model_from_args
from gaugecompile.onnx import DOMAIN, CacheStep, export_onnx, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--out", type=Path, help="where to write the .onnx file (default: a temporary directory)")
    parser.add_argument("--atol", type=float, default=1e-3, help="largest accepted |logit difference|")
    args = parser.parse_args(argv)

    model, tokenizer = model_from_args(args)
    prompt = text_ids(tokenizer, model.config.vocab_size, 20)  # whole blocks of 4: the edits below stay aligned
    document = text_ids(tokenizer, model.config.vocab_size, 16, seed=1)
    cache = manifold_cache(model, max_tokens=prompt.shape[1] + 64, block_size=4)
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
    cache.delete(0, 4, 8)  # drop 4 tokens: later blocks move down (a delta, no copy)
    cache.splice(0, cache.prefill(model, document), at=2**30)  # a document far away, at offset 2^30
    deltas = sorted(set(cache.mapping(0)[1]))  # each block's key position offset (the op rotates the query instead)
    print(f"cache: {cache.seq_len(0)} tokens, block deltas {deltas}")

    # one eager decode step, captured with its inputs (pools as they were before it) and its logits
    step, step_inputs, logits = CacheStep.capture(model, cache, prompt[:, -1:])
    with tempfile.TemporaryDirectory() as tmp:
        path = args.out or Path(tmp) / "decode_step.onnx"
        proto = export_onnx(step, step_inputs, path)  # inline=True would write standard ops only
        nodes = [node for node in proto.graph.node if node.domain == DOMAIN]
        print(f"wrote {path}: {len(nodes)} {DOMAIN} node(s), e.g.")
        print("  " + onnx.helper.printable_node(nodes[0]) if nodes else "  none")
        # input_ids, position_ids, block_table, block_delta, block_lens, slots, view_sizes; then the pools
        *tensors, k_pools, v_pools = step_inputs
        outputs = run(path, [*tensors, *k_pools, *v_pools])  # logits, then every layer's updated pools
    diff = float(abs(outputs[0] - logits.numpy()).max())
    print(f"onnxruntime vs eager: max |logit difference| {diff:.1e}")
    if len(nodes) != model.config.num_hidden_layers:
        print(f"FAIL: expected one {DOMAIN} node per layer ({model.config.num_hidden_layers})", file=sys.stderr)
        return 1
    if diff > args.atol:
        print(f"FAIL: logits differ by {diff:.1e} > {args.atol:.1e}", file=sys.stderr)
        return 1
    print("OK: the exported step equals eager")
    return 0


if __name__ == "__main__":
    sys.exit(main())
