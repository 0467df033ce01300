"""Generate with a model sharded by tensor parallelism, each rank's ManifoldCache holding only its KV heads.

Shows: `from_pretrained(path, tp_plan="auto")` on every rank and `ManifoldCache(config, ..., group=WORLD)`;
greedy generation; a delete whose span is decided on rank 0 alone (as a server's request would be) and applied
on every rank from one small broadcast record; generation going on after it; `check_sync()` proving the
ranks hold the same mapping.  Only the edit's record crosses between ranks, never KV data: the script prints
its bytes next to the KV bytes per rank a re-rotating cache would rewrite.  Rank 0 then runs the same steps on
the unsharded model in one process: the tokens must be equal.

Run: `python examples/tensor_parallel.py` (SmolLM2-135M-Instruct over 3 CPU ranks: its 3 KV heads, one per
rank) or `--random llama` (2 ranks).  It relaunches itself under `torch.distributed.run`; under torchrun
yourself: `torchrun --nproc_per_node 2 examples/tensor_parallel.py --checkpoint DIR`.  `--backend nccl` on
GPUs (one per rank; untested here: this project's machines have none).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

import torch

from gaugecompile.bench.distributed import ByteCounter, relaunch, under_torchrun
from gaugecompile.bench.prompts import chat_ids, decode
from gaugecompile.cache import ManifoldCache
from gaugecompile.models import add_model_arguments
from gaugecompile.models.random_configs import random_model
from gaugecompile.models.smollm import default_checkpoint

MESSAGE = "Tell me about the sea. Ignore this sentence entirely, please. Then write one line about boats."


SPAN = (8, 20)  # the delete rank 0 decides on (a span of the prompt, off block boundaries)


def generate_and_edit(model, tokenizer, cache: ManifoldCache, new_tokens: int, span: tuple[int, int],
                      share=lambda ids: ids, count: bool = False) -> tuple[list[int], int, int]:
    """Greedy tokens, a delete of `span` from the prompt, more greedy tokens; returns them, the tokens after the
    cut and the bytes the delete sent.  Under tensor parallelism `span` is what this rank passes (rank 0's is
    applied) and `share` gives every rank rank 0's model input, as any tensor-parallel program must."""
    prompt = chat_ids(tokenizer, model.config.vocab_size, MESSAGE)
    first = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, past_key_values=cache)
    held = cache.seq_len(0)
    with ByteCounter() if count else contextlib.nullcontext() as counter:
        cache.delete(0, *span)
    sent = counter.bytes if count else 0
    moved = held - span[1]  # the later tokens a re-rotating cache would rewrite (rank 0's span on rank 0)
    cache.check_sync()
    view = share(torch.cat([first[:, :span[0]], first[:, span[1]:]], 1))  # the ids the cache now holds, + 1 new
    cache.crop(-1)  # generate() feeds the ids the cache lacks: keep the view's last one out
    after = model.generate(view, max_new_tokens=new_tokens, do_sample=False, past_key_values=cache)
    cache.check_sync()
    return first[0, prompt.shape[1]:].tolist() + after[0, view.shape[1]:].tolist(), moved, sent


def _from_rank0(ids: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    box = [ids]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_main(args: argparse.Namespace) -> int:
    import torch.distributed as dist
    import transformers

    torch.set_num_threads(1)
    dist.init_process_group(args.backend)
    rank = dist.get_rank()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.checkpoint, tp_plan="auto").eval()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.checkpoint)
    except (OSError, ValueError):  # a random model has none
        tokenizer = None
    max_tokens = 256 + 2 * args.new_tokens
    cache = ManifoldCache(model.config, max_batch_size=1, max_tokens=max_tokens, group=dist.group.WORLD)
    with torch.no_grad():
        # only rank 0 knows the span; the others pass anything (here an empty span): rank 0's is applied
        got, moved, sent = generate_and_edit(model, tokenizer, cache, args.new_tokens,
                                             SPAN if rank == 0 else (0, 0), share=_from_rank0, count=True)
    heads = cache.k_pools[0].shape[2]
    per_token = 2 * len(cache.k_pools) * heads * cache.k_pools[0].shape[3] * cache.k_pools[0].element_size()
    if rank == 0:
        print(f"{dist.get_world_size()} ranks ({args.backend}), {heads} of {model.config.num_key_value_heads} KV "
              f"heads per rank; the delete of {SPAN} sent {sent} bytes from rank 0, where a re-rotating cache would "
              f"rewrite {moved * per_token} KV bytes on each rank ({moved} later tokens x {per_token} bytes)")
        print(f"tensor parallel: {decode(tokenizer, got)}")
        reference = transformers.AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
        with torch.no_grad():
            single = ManifoldCache(reference.config, max_batch_size=1, max_tokens=max_tokens)
            want, _, _ = generate_and_edit(reference, tokenizer, single, args.new_tokens, SPAN)
        print(f"one process    : {decode(tokenizer, want)}")
        print("OK: the sharded model generates the unsharded model's tokens" if got == want else
              "FAIL: the sharded model's tokens differ from the unsharded model's")
        status = 0 if got == want else 1
    else:
        status = 0
    dist.barrier()
    dist.destroy_process_group()
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--checkpoint", help="a checkpoint directory (what the ranks load; set by the relaunch)")
    parser.add_argument("--ranks", type=int, help="ranks to start (default: 2, or 3 when the KV heads need it)")
    parser.add_argument("--new-tokens", type=int, default=12, help="tokens generated before and after the edit")
    parser.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    args = parser.parse_args(argv)
    if under_torchrun():
        return rank_main(args)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or args.model
        if args.random:
            checkpoint = os.path.join(tmp, "model")
            random_model(args.random).save_pretrained(checkpoint)
        checkpoint = checkpoint or str(default_checkpoint())
        import transformers

        config = transformers.AutoConfig.from_pretrained(checkpoint)
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        ranks = args.ranks or next((n for n in (2, 3) if kv_heads % n == 0), None)
        if ranks is None or kv_heads % ranks:
            print(f"FAIL: {kv_heads} KV heads do not split over {ranks or '2 or 3'} ranks", file=sys.stderr)
            return 2
        return relaunch(ranks, ["--checkpoint", checkpoint, "--new-tokens", str(args.new_tokens),
                                "--backend", args.backend])


if __name__ == "__main__":
    sys.exit(main())
