"""The tensor-parallel scenario `test_tensor_parallel.py` runs: on 2 gloo ranks under torchrun, and in one process.

Run as `python -m torch.distributed.run --standalone --nproc_per_node 2 tests/cache/tp_scenario.py CHECKPOINT OUT`:
each rank loads CHECKPOINT with `tp_plan="auto"`, runs `scenario` with a ManifoldCache in the world group
(`check_sync()` after every step and edit, bytes through the process group counted per edit) and saves what
it saw to OUT/rank<r>.pt.  The test runs the same `scenario` on the unsharded model and compares.
"""

from __future__ import annotations

import functools
import os
import sys

import torch
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

from gaugecompile.backend import gauge_backend
from gaugecompile.bench.distributed import ByteCounter
from gaugecompile.cache import ManifoldCache

PROMPT = [[3, 17, 42, 8, 99, 23, 5, 61, 77, 12, 30, 4]]
DOC = [[50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60]]
SPLICE_AT = 2**30


class SyncEveryStep(StoppingCriteria):
    """Checks that every rank holds the same mapping after each generation step (never stops generation)."""

    def __init__(self, check) -> None:
        self.check, self.steps = check, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.check()
        self.steps += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def scenario(model, group=None) -> dict:
    """Greedy and beam generate, delete, splice at 2^30, a streaming window, each checked in sync; returns the
    tokens and logits, and the bytes each edit sent."""
    out: dict = {"bytes": {}}

    def new_cache(**kw) -> ManifoldCache:
        return ManifoldCache(model.config, max_batch_size=4, max_tokens=512, block_size=4, group=group, **kw)

    def sent(name: str, edit) -> None:  # run one edit, record the bytes it sent (the check after it excluded)
        if group is None:
            edit()
        else:
            with ByteCounter() as counter:
                edit()
            out["bytes"][name] = counter.bytes
        cache.check_sync()

    prompt = torch.tensor(PROMPT)
    with torch.no_grad():
        cache = new_cache()
        sync = SyncEveryStep(cache.check_sync)
        greedy = model.generate(prompt, max_new_tokens=6, do_sample=False, past_key_values=cache,
                                stopping_criteria=StoppingCriteriaList([sync]))
        out["greedy"], out["synced_steps"] = greedy, sync.steps

        sent("delete", lambda: cache.delete(0, 2, 5))
        out["after_delete"] = model(input_ids=greedy[:, -1:], past_key_values=cache).logits[0, -1]
        cache.check_sync()

        chunk = cache.prefill(model, torch.tensor(DOC))
        sent("splice at 2^30", lambda: cache.splice(0, chunk, SPLICE_AT))
        out["after_splice"] = model(input_ids=torch.tensor([[7]]), past_key_values=cache).logits[0, -1]
        sent("free chunk", chunk.free)
        sent("fork 3", lambda: cache.fork(0, 3))
        sent("reorder", lambda: cache.reorder([1, 1, 0, 2]))
        sent("free", lambda: cache.free(3))

        cache = new_cache()
        beams = model.generate(prompt, max_new_tokens=5, num_beams=3, do_sample=False, past_key_values=cache,
                               stopping_criteria=StoppingCriteriaList([SyncEveryStep(cache.check_sync)]))
        out["beams"] = beams

        cache = new_cache()
        sent("set_window", lambda: cache.set_window(4, 12))
        stream = model.generate(prompt, max_new_tokens=30, do_sample=False, past_key_values=cache,
                                stopping_criteria=StoppingCriteriaList([SyncEveryStep(cache.check_sync)]))
        out["stream"], out["stream_view"] = stream, cache.seq_len(cache.batch[0])
        out["pool_heads"] = cache.k_pools[0].shape[2]  # this rank's share of the KV heads

        # the gauge backend: prefill and two decode steps compiled, every layer's site rewritten
        sink: list = []
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=functools.partial(gauge_backend, inner="eager", report_sink=sink,
                                                                  keep_graphs=True))
        logits = []
        for c, m in ((new_cache(), compiled), (new_cache(), model)):
            c.new_sequences(1)
            steps = [m(input_ids=prompt, past_key_values=c).logits[0, -1]]
            for tok in (9, 14):
                steps.append(m(input_ids=torch.tensor([[tok]]), past_key_values=c).logits[0, -1])
            c.check_sync()
            logits.append(torch.stack(steps))
        out["compiled"], out["compiled_eager"] = logits
        out["rewritten"] = [len(r.rewritten) for r, before, _ in sink if "materialize_kv" in before]
        out["refused"] = [len(r.refused) for r, before, _ in sink if "materialize_kv" in before]
        if group is not None:
            out.update(_agreement(model, new_cache(), prompt))
    return out


def _agreement(model, cache: ManifoldCache, prompt: torch.Tensor) -> dict:
    """Rank 0's arguments win; a bad edit fails on every rank alike; a rank that edits alone is caught."""
    import torch.distributed as dist

    rank, out = dist.get_rank(), {}
    cache.new_sequences(1)
    model(input_ids=prompt, past_key_values=cache)
    if rank == 0:
        cache.delete(0, 1, 3)
    else:
        cache.delete(0, 5, 9)  # ignored: the arguments are rank 0's
    out["src_args_win"] = cache.positions(0)
    cache.check_sync()
    chunk = cache.prefill(model, prompt[:, :3])
    cache.splice(0, chunk if rank == 0 else None, 2)  # only rank 0 names the chunk: the same one is spliced
    out["spliced_len"] = cache.seq_len(0)
    cache.check_sync()
    chunk.free()
    try:
        cache.delete(0, 5, 2) if rank == 0 else cache.delete(0, 0, 1)
    except ValueError as error:
        out["bad_edit"] = str(error)
    cache.check_sync()
    with cache.tensor_parallel.edit():  # an edit this rank makes alone, bypassing the agreement
        if rank == 1:
            cache.delete(0, 0, 1)
    try:
        cache.check_sync()
    except RuntimeError as error:
        out["diverged"] = str(error)
    return out


def main(checkpoint: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, tp_plan="auto")
    result = scenario(model, group=dist.group.WORLD)
    torch.save(result, os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
