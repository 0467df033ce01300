"""Document reuse on the real model: re-prefill against splice, and splice plus selective recompute.

    python benchmarks/doc_reuse.py [--episodes 3] [--doc-tokens 320] [--repeat 3] [--model PATH | --random ARCH]

Each episode takes one long text of `pydoc_data.topics` (real English that ships with Python) and cuts it
into a prefix, three documents, a question and a continuation, in that order.  The documents are prefilled
once, each on its own (a document store); a prompt is prefix + documents + question:
- re-prefill: the whole prompt in one forward (the reference);
- splice: the prefix prefilled, the stored documents spliced after it, the question run;
- splice + recompute: the same, with `ManifoldCache.recompute` of a fraction of each document's tokens in
  the new context ("first": EPIC; "deviation": CacheBlend's selection, probe layer 1).
Reported per method: the NLL of the continuation (teacher forced after the prompt), the share of the
continuation's positions whose argmax equals the re-prefill's, the share of the splice-to-re-prefill NLL
gap the method closes, and the time to first token (the prompt's work: prefix, splices, recompute and
question, or the whole prefill; median of `--repeat`), with its ratio to re-prefill's.  All in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from gaugecompile.cache import ManifoldCache
from gaugecompile.models.loading import add_model_arguments, model_from_args

__all__ = ["main"]

METHODS = [("re-prefill", None, 0.0), ("splice", None, 0.0)] + [
    (f"{policy} {int(fraction * 100)}%", policy, fraction) for policy in ("first", "deviation")
    for fraction in (0.05, 0.15, 0.30)]


def _episodes(tokenizer, vocab: int, count: int, sizes: tuple[int, ...]) -> list[list[torch.Tensor]]:
    """`count` episodes, each consecutive segments of `sizes` tokens of one topic (random ids without a tokenizer)."""
    total = sum(sizes)
    if tokenizer is None:
        gen = torch.Generator().manual_seed(0)
        texts = [torch.randint(0, vocab, (total,), generator=gen) for _ in range(count)]
    else:
        from pydoc_data.topics import topics

        texts = []
        for key in sorted(topics):
            ids = tokenizer(topics[key], return_tensors="pt").input_ids[0]
            if ids.numel() >= total:
                texts.append(ids[:total])
            if len(texts) == count:
                break
        if len(texts) < count:
            raise ValueError(f"episodes: only {len(texts)} topics hold {total} tokens, asked {count}")
    return [list(torch.split(t[None], list(sizes), dim=1)) for t in texts]


def _prompt(model, cache: ManifoldCache, parts, chunks, policy, fraction) -> tuple[int, torch.Tensor]:
    """A new sequence of `cache` holding the prompt, and the logits after its question: a re-prefill (chunks
    None) or the prefix, the stored chunks spliced after it (and recomputed), then the question."""
    prefix, docs, question = parts[0], parts[1:-2], parts[-2]
    (seq,) = cache.new_sequences(1)
    cache.set_batch([seq])
    with torch.no_grad():
        if chunks is None:
            out = model(input_ids=torch.cat([prefix, *docs, question], 1), past_key_values=cache, use_cache=True)
            return seq, out.logits
        model(input_ids=prefix, past_key_values=cache, use_cache=True)
    at, spans = prefix.shape[1], []
    for doc, chunk in zip(docs, chunks, strict=True):
        cache.splice(seq, chunk, at)
        spans.append((at, doc))
        at += doc.shape[1]
    if policy is not None:  # every document's share, in one forward
        cache.recompute(model, seq, spans, fraction=fraction, policy=policy)
    with torch.no_grad():
        return seq, model(input_ids=question, past_key_values=cache, use_cache=True).logits


def _continuation(model, cache, last_logits, continuation) -> tuple[float, torch.Tensor]:
    """NLL per token of the continuation after the prompt, and the argmax at each of its positions."""
    with torch.no_grad():
        logits = model(input_ids=continuation[:, :-1], past_key_values=cache, use_cache=True).logits
    logits = torch.cat([last_logits[:, -1:], logits], 1)[0].double()
    return float(torch.nn.functional.cross_entropy(logits, continuation[0])), logits.argmax(-1)


def _machine() -> str:
    import transformers

    return (f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; torch "
            f"{torch.__version__}, transformers {transformers.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--prefix-tokens", type=int, default=32)
    parser.add_argument("--doc-tokens", type=int, default=320)
    parser.add_argument("--question-tokens", type=int, default=16)
    parser.add_argument("--continuation-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="time to first token: the median of this many runs")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = model_from_args(args)
    sizes = (args.prefix_tokens, *[args.doc_tokens] * 3, args.question_tokens, args.continuation_tokens)
    episodes = _episodes(tokenizer, model.config.vocab_size, args.episodes, sizes)
    results = {name: dict(nll=[], agree=[], ttft=[]) for name, _, _ in METHODS}
    for e, parts in enumerate(episodes):
        print(f"episode {e + 1}/{len(episodes)}: {sum(sizes)} tokens, {len(METHODS)} methods x {args.repeat} runs",
              flush=True)
        cache = ManifoldCache(model.config, max_batch_size=2, max_tokens=4 * sum(sizes), block_size=16)
        chunks = [cache.prefill(model, doc) for doc in parts[1:-2]]  # the store: each document alone, once
        reference = None
        for name, policy, fraction in METHODS:
            times = []
            for run in range(args.repeat):
                t0 = time.perf_counter()
                seq, logits = _prompt(model, cache, parts, None if name == "re-prefill" else chunks, policy,
                                      fraction)
                times.append(time.perf_counter() - t0)
                if run < args.repeat - 1:
                    cache.free(seq)
            nll, top = _continuation(model, cache, logits, parts[-1])
            cache.free(seq)
            reference = top if reference is None else reference
            for key, value in (("nll", nll), ("agree", float((top == reference).double().mean())),
                               ("ttft", statistics.median(times))):
                results[name][key].append(value)
        for chunk in chunks:
            chunk.free()
    rows = _rows(results)
    print(f"\nDocument reuse, {len(episodes)} episodes of pydoc_data.topics: prefix {sizes[0]}, 3 documents x "
          f"{sizes[1]}, question {sizes[4]}, continuation {sizes[5]} tokens; {_machine()}; means over episodes")
    print(f"{'method':<16} {'NLL':>7} {'gap closed':>11} {'agreement':>10} {'TTFT ms':>9} {'vs re-prefill':>14}")
    for row in rows:
        print(f"{row['method']:<16} {row['nll']:>7.4f} {row['gap_closed']:>10.1%} {row['agreement']:>10.1%} "
              f"{row['ttft_ms']:>9.1f} {row['ttft_speedup']:>13.1f}x")
    if args.out:
        args.out.write_text(json.dumps(dict(machine=_machine(), sizes=sizes, episodes=len(episodes), rows=rows),
                                       indent=2))
    return 0


def _rows(results: dict) -> list[dict]:
    """Means over episodes; the gap closed is (NLL splice - NLL method) / (NLL splice - NLL re-prefill)."""
    mean = {name: {k: statistics.fmean(v) for k, v in r.items()} for name, r in results.items()}
    ref, plain = mean["re-prefill"], mean["splice"]
    gap = plain["nll"] - ref["nll"]
    return [dict(method=name, nll=m["nll"], gap_closed=(plain["nll"] - m["nll"]) / gap if gap else float("nan"),
                 agreement=m["agree"], ttft_ms=1e3 * m["ttft"], ttft_speedup=ref["ttft"] / m["ttft"])
            for name, m in mean.items()]


if __name__ == "__main__":
    raise SystemExit(main())
