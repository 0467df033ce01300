"""A Bayesian wind tunnel: a task whose posterior is known in closed form, a small transformer trained on it, and
the gap between the model's predictive entropy and the analytic posterior's, in bits, position by position.

The Bayesian-geometry papers (arXiv 2512.22471, 2512.22473) call such a task a wind tunnel: the Bayes-optimal
prediction is known exactly at every position, so how close a trained model comes to Bayesian inference is a
number, not an impression, and the geometry probes of `gaugecompile.research.geometry` can be read on a model whose
job is known.  This module implements their bijection-elimination task.

The task.  Each sequence draws a fresh uniformly random bijection `pi` of {0..V-1} and shows `K` pairs
`x_1 pi(x_1) x_2 pi(x_2) ... x_K`.  The inputs never depend on `pi`: by default each repeats an input already
seen with probability 1/2 and is new otherwise (a repeated input has a known answer, 0 bits; a new one leaves the
unrevealed outputs), or uniformly with replacement, or as a permutation prefix (the pure elimination curve): see
`BijectionTask.repeat`, which also says why plain uniform sampling is not the default.  Tokens: input `x` is
token `x`, output `y` is token `V + y`, and a BOS token `2V` opens the sequence, so the vocabulary has `2V + 1`
tokens and a sequence is `BOS x_1 (V+y_1) ... x_K` (`2K` tokens; the last answer is never an input).  The model predicts
`pi(x_t)` at the position of `x_t`; its predictive distribution is the softmax of its logits over the `V` output
tokens (training uses the same restricted softmax, so no probability sits on tokens that cannot be answers).

The posterior, derived.  The prior on `pi` is uniform over the `V!` bijections.  How the inputs are drawn does
not depend on `pi` (it may depend on the earlier inputs), so their probability is the same under every bijection
and cancels: conditioning on the pairs before `t` (and on `x_t` itself) multiplies the prior by 1 for a
bijection that agrees with every pair seen and by 0 otherwise.
Let `S` be the set of the `k` distinct inputs seen before `t` and `pi(S)` their revealed outputs.  The bijections
that agree with the pairs are exactly those that agree with `pi` on `S`: a bijection of the `V - k` remaining
inputs onto the `V - k` remaining outputs, `(V - k)!` of them, all equally probable.  Hence
- if `x_t` is in `S`, `pi(x_t)` is fixed: a point mass, entropy 0 bits;
- otherwise, for each output `u` not in `pi(S)`, the consistent bijections with `pi(x_t) = u` are the bijections of
  the other `V - k - 1` inputs onto the other `V - k - 1` outputs, `(V - k - 1)!` of them, the same number for
  every `u`: the posterior of `pi(x_t)` is uniform over the `V - k` unrevealed outputs, entropy `log2(V - k)` bits
  (0 bits when `k = V - 1`: the last unseen input has one output left).
`tests/research/test_wind_tunnel.py` checks this against brute-force enumeration of all bijections for `V <= 5`.

What is measured (`evaluate`): over held-out sequences (a generator seed the training never uses; each has its own
bijection, so nothing can be memorised), the model's predictive entropy in bits at every output position against
the analytic posterior's, the mean absolute error (MAE, bits) overall and per position, and the KL divergence
from the posterior to the prediction (bits; in expectation, the model's cross-entropy on the true answers minus the
Bayes floor, the mean posterior entropy).

The model is a transformers `LlamaForCausalLM` (RoPE, eager attention) so that `probe_geometry` applies to it as it
does to any checkpoint; `value_manifold` adds the probe the papers draw and `probe_geometry` cannot, since it needs
the analytic posterior: the correlation of each layer's value vectors (first principal components) with the
posterior entropy of the position.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

__all__ = ["BijectionTask", "Batch", "TrainLog", "WindTunnelResult", "posterior_entropy_bits", "posterior_probs",
           "build_model", "output_logits", "train", "evaluate", "value_manifold"]

_LOG2 = math.log(2.0)


@dataclass(frozen=True)
class Batch:
    """One batch of sequences: `ids` [B, 2K] the model's input, `xs` [B, K] the inputs, `ys` [B, K] their outputs
    `pi(x_t)` in [0, V), `perms` [B, V] each sequence's bijection (`ys == perms.gather(1, xs)`)."""

    ids: torch.Tensor
    xs: torch.Tensor
    ys: torch.Tensor
    perms: torch.Tensor


@dataclass(frozen=True)
class BijectionTask:
    """The bijection-elimination wind tunnel: `vocab` symbols (V), `pairs` pairs per sequence (K), and how the
    inputs are drawn (`repeat`):
    - a float r in [0, 1) (default 0.5): each input repeats an input already seen with probability r (uniformly
      among those), else is a new one (uniformly among the unseen); once all V are seen, every input repeats.
      r = 0 is the permutation prefix (every input new: the pure elimination curve, then `pairs <= vocab`);
    - None: uniformly over all V with replacement.
    The inputs never depend on the bijection, so the posterior is the same closed form in every mode.  The default
    is not plain uniform sampling because there a repeat has probability k/V exactly, which makes every output
    equally likely (1/V) given only which outputs were revealed: a model that has not yet learned to look up the
    input's earlier pair gets no gradient from the elimination either, and training stalls at 4 bits (V = 16,
    K = 32: 1,500 steps at each of 1e-3, 3e-3 and 1e-2 without leaving 4.00 bits)."""

    vocab: int = 16
    pairs: int = 32
    repeat: float | None = 0.5

    def __post_init__(self) -> None:
        if self.vocab < 2 or self.pairs < 1:
            raise ValueError(f"need vocab >= 2 and pairs >= 1, got vocab={self.vocab}, pairs={self.pairs}")
        if self.repeat is not None and not 0.0 <= self.repeat < 1.0:
            raise ValueError(f"repeat: a probability in [0, 1) or None, got {self.repeat}")
        if self.repeat == 0.0 and self.pairs > self.vocab:
            raise ValueError(f"without repeats at most vocab={self.vocab} pairs, got {self.pairs}")

    @property
    def bos(self) -> int:
        return 2 * self.vocab

    @property
    def vocab_size(self) -> int:
        """Token count: V inputs, V outputs, BOS."""
        return 2 * self.vocab + 1

    @property
    def seq_len(self) -> int:
        return 2 * self.pairs

    @property
    def query_positions(self) -> torch.Tensor:
        """Positions of `x_1 .. x_K` in `ids`: where the model predicts `pi(x_t)`."""
        return torch.arange(self.pairs) * 2 + 1

    def _inputs(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        v, k = self.vocab, self.pairs
        if self.repeat is None:
            return torch.randint(0, v, (batch, k), generator=generator)
        seen = torch.zeros(batch, v, dtype=torch.bool)
        xs = torch.empty(batch, k, dtype=torch.long)
        for t in range(k):
            count = seen.sum(1)
            again = (torch.rand(batch, generator=generator) < self.repeat) & (count > 0) | (count == v)
            pool = torch.where(again.unsqueeze(1), seen, ~seen)  # candidates: the seen ones, or the unseen ones
            pick = torch.multinomial(pool.double(), 1, generator=generator).squeeze(1)
            xs[:, t] = pick
            seen[torch.arange(batch), pick] = True
        return xs

    def sample(self, batch: int, generator: torch.Generator) -> Batch:
        """`batch` sequences, each with its own uniformly random bijection, drawn from `generator` only."""
        v, k = self.vocab, self.pairs
        perms = torch.rand(batch, v, generator=generator).argsort(1)
        xs = self._inputs(batch, generator)
        ys = perms.gather(1, xs)
        ids = torch.empty(batch, 2 * k, dtype=torch.long)
        ids[:, 0] = self.bos
        ids[:, 1::2] = xs
        ids[:, 2::2] = ys[:, :-1] + v
        return Batch(ids, xs, ys, perms)


def _seen_before(xs: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """xs [B, K] -> (repeat [B, K] bool: x_t occurred before t, distinct [B, K]: distinct inputs before t)."""
    onehot = torch.nn.functional.one_hot(xs, vocab).to(torch.int64)  # [B, K, V]
    before = onehot.cumsum(1) - onehot  # occurrences strictly before t
    repeat = before.gather(2, xs.unsqueeze(-1)).squeeze(-1) > 0
    distinct = (before > 0).sum(-1)
    return repeat, distinct


def posterior_entropy_bits(xs: torch.Tensor, vocab: int) -> torch.Tensor:
    """Analytic posterior entropy (bits, float64) of `pi(x_t)` given the pairs before t, for inputs xs [B, K]:
    0 where `x_t` was seen before, `log2(V - k)` otherwise (k = distinct inputs before t).  See the module
    docstring for the derivation; it depends on the inputs only, never on the bijection."""
    repeat, distinct = _seen_before(xs, vocab)
    return torch.where(repeat, 0.0, torch.log2((vocab - distinct).double()))


def posterior_probs(xs: torch.Tensor, ys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Analytic posterior [B, K, V] (float64) of `pi(x_t)` over the V outputs given the pairs before t: a point mass
    on `ys[t]` where `x_t` was seen before, else uniform over the outputs not yet revealed."""
    repeat, _ = _seen_before(xs, vocab)
    shown = torch.nn.functional.one_hot(ys, vocab).to(torch.int64)
    revealed = (shown.cumsum(1) - shown) > 0  # outputs revealed strictly before t [B, K, V]
    free = (~revealed).double()
    uniform = free / free.sum(-1, keepdim=True)
    point = shown.double()
    return torch.where(repeat.unsqueeze(-1), point, uniform)


def build_model(task: BijectionTask, hidden: int = 64, layers: int = 2, heads: int = 4, mlp: int | None = None,
                init_std: float = 0.02, seed: int = 0):
    """A tiny transformers `LlamaForCausalLM` for `task` (RoPE, RMSNorm, SwiGLU MLP of `mlp` = 4 * hidden by default,
    untied embeddings, eager attention so that `probe_geometry` reads its attention weights), float32, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden % heads:
        raise ValueError(f"hidden={hidden} is not a multiple of heads={heads}")
    config = LlamaConfig(vocab_size=task.vocab_size, hidden_size=hidden, intermediate_size=mlp or 4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max(64, task.seq_len), rope_theta=10000.0,
                         tie_word_embeddings=False, bos_token_id=task.bos, eos_token_id=None, pad_token_id=None,
                         initializer_range=init_std, attn_implementation="eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def output_logits(model: torch.nn.Module, task: BijectionTask, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits over the V output tokens at the K query positions: [B, K, V]."""
    logits = model(input_ids=ids, use_cache=False).logits
    return logits[:, task.query_positions, task.vocab:2 * task.vocab]


@dataclass
class TrainLog:
    """What training did: steps, wall seconds, and (step, loss in bits) every `log_every` steps."""

    steps: int
    seconds: float
    batch: int
    lr: float
    final_lr: float
    warmup: int
    weight_decay: float
    losses: list[tuple[int, float]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def train(model: torch.nn.Module, task: BijectionTask, steps: int | None = None, seconds: float | None = None,
          batch: int = 64, lr: float = 5e-3, final_lr: float = 0.01, weight_decay: float = 0.01, warmup: int = 200,
          seed: int = 0, log_every: int = 100, log: Callable[[str], None] | None = print) -> TrainLog:
    """Train `model` on fresh sequences from `task` (AdamW, cross-entropy on the output positions only, gradient
    norm clipped at 1) for `steps` steps or `seconds` of wall time, whichever is given (both: the first reached).

    The learning rate warms up linearly over the first `warmup` steps and follows a cosine from `lr` down to
    `final_lr * lr` over the run's progress, the larger of step/steps and elapsed/seconds, so that a time budget
    gets a complete schedule however fast the machine is.  The warm-up matters here: with a few tens of warm-up
    steps the model settles on elimination alone and can stay there for thousands of steps before it learns to
    look up a repeated input's earlier pair (36 warm-up steps, then 1,200 steps at 3e-3 on the default task:
    still 2.4 bits); with 150-200 the loss was under 1.9 bits by step 300-500 on each of three seeds.

    `log` receives a line per `log_every` steps: step, loss (bits, this batch's mean; the Bayes floor is the mean
    posterior entropy, 1.36 bits for the default task) and elapsed seconds."""
    if steps is None and seconds is None:
        raise ValueError("give steps or seconds")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    record = TrainLog(steps=0, seconds=0.0, batch=batch, lr=lr, final_lr=final_lr, warmup=warmup,
                      weight_decay=weight_decay)
    model.train()
    start = time.perf_counter()
    step = 0
    while True:
        elapsed = time.perf_counter() - start
        progress = max(step / steps if steps else 0.0, elapsed / seconds if seconds else 0.0)
        if progress >= 1.0:
            break
        scale = min(1.0, (step + 1) / warmup) * (final_lr + (1 - final_lr) * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        data = task.sample(batch, generator)
        logits = output_logits(model, task, data.ids)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, task.vocab), data.ys.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % log_every == 0 or step == 1:
            bits = float(loss.detach()) / _LOG2
            record.losses.append((step, bits))
            if log is not None:
                log(f"step {step:>6}  loss {bits:.4f} bits  lr {lr * scale:.2e}  elapsed {elapsed:6.1f} s")
    record.steps, record.seconds = step, time.perf_counter() - start
    model.eval()
    return record


@dataclass
class WindTunnelResult:
    """Predictive entropy against the analytic posterior over held-out sequences (bits; per-position lists are over
    the K query positions, means over the sequences)."""

    task: dict
    sequences: int
    mae_bits: float  # mean |H_model - H_posterior| over every query position of every sequence
    mae_by_position: list[float]
    mae_repeat_bits: float  # over positions whose input was seen before (posterior 0 bits)
    mae_new_bits: float  # over positions whose input is new (posterior log2(V - k))
    max_abs_error_bits: float
    model_entropy_by_position: list[float]
    posterior_entropy_by_position: list[float]
    kl_bits: float  # mean KL(posterior || model)
    kl_by_position: list[float]
    cross_entropy_bits: float  # mean -log2 q(pi(x_t)): the loss on the true answers
    bayes_cross_entropy_bits: float  # the same for the posterior: its mean entropy
    by_posterior: list[dict]  # one row per posterior entropy value: count, posterior bits, mean model bits, MAE
    train: dict | None = None
    model: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: BijectionTask, sequences: int = 2000, seed: int = 1_000_003,
             batch: int = 500) -> WindTunnelResult:
    """Predictive entropy of `model` at every query position of `sequences` held-out sequences (drawn from `seed`,
    which training never uses by default) against the analytic posterior: MAE, KL and cross-entropy in bits."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    h_model, h_post, kl, ce, repeat = [], [], [], [], []
    done = 0
    while done < sequences:
        data = task.sample(min(batch, sequences - done), generator)
        logq = torch.log_softmax(output_logits(model, task, data.ids).double(), -1)  # [B, K, V]
        q = logq.exp()
        h_model.append(-(q * logq).sum(-1) / _LOG2)
        post = posterior_probs(data.xs, data.ys, task.vocab)
        h_post.append(posterior_entropy_bits(data.xs, task.vocab))
        kl.append((torch.special.xlogy(post, post) - post * logq).sum(-1) / _LOG2)
        ce.append(-logq.gather(-1, data.ys.unsqueeze(-1)).squeeze(-1) / _LOG2)
        repeat.append(_seen_before(data.xs, task.vocab)[0])
        done += data.ids.shape[0]
    h_model, h_post, kl, ce, repeat = (torch.cat(x) for x in (h_model, h_post, kl, ce, repeat))
    err = (h_model - h_post).abs()
    rows = []
    for value in torch.unique(h_post).tolist():
        sel = h_post == value
        rows.append({"posterior_bits": value, "count": int(sel.sum()), "model_bits": float(h_model[sel].mean()),
                     "mae_bits": float(err[sel].mean())})
    nan = float("nan")
    return WindTunnelResult(
        task=asdict(task), sequences=sequences, mae_bits=float(err.mean()), mae_by_position=err.mean(0).tolist(),
        mae_repeat_bits=float(err[repeat].mean()) if repeat.any() else nan,
        mae_new_bits=float(err[~repeat].mean()) if (~repeat).any() else nan, max_abs_error_bits=float(err.max()),
        model_entropy_by_position=h_model.mean(0).tolist(), posterior_entropy_by_position=h_post.mean(0).tolist(),
        kl_bits=float(kl.mean()), kl_by_position=kl.mean(0).tolist(), cross_entropy_bits=float(ce.mean()),
        bayes_cross_entropy_bits=float(h_post.mean()), by_posterior=rows)


@torch.no_grad()
def value_manifold(model: torch.nn.Module, task: BijectionTask, sequences: int = 256, seed: int = 2_000_003,
                   components: int = 3) -> list[dict]:
    """Per layer: the value vectors the layer attends with (all heads concatenated, from the cache) at the query
    positions of `sequences` held-out sequences, their first `components` principal components' shares of the
    variance, and the Pearson correlation of each component's coordinate with the position's analytic posterior
    entropy.  The papers' third signature is late-layer values on a low-dimensional curve ordered by posterior
    entropy: a large |corr| of a leading component is that ordering."""
    from transformers import DynamicCache

    model.eval()
    data = task.sample(sequences, torch.Generator().manual_seed(seed))
    cache = DynamicCache(config=model.config)
    model(input_ids=data.ids, past_key_values=cache, use_cache=True)
    entropy = posterior_entropy_bits(data.xs, task.vocab).reshape(-1)
    rows = []
    for i, layer in enumerate(cache.layers):
        v = layer.values[:, :, task.query_positions]  # [B, kv_heads, K, d]
        x = v.permute(0, 2, 1, 3).reshape(-1, v.shape[1] * v.shape[3]).double()
        x = x - x.mean(0)
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        var = s**2
        coords = x @ vh[:components].T
        corr = [float(torch.corrcoef(torch.stack([coords[:, j], entropy]))[0, 1]) for j in range(components)]
        rows.append({"layer": i, "pc_share": (var[:components] / var.sum()).tolist(), "pc_entropy_corr": corr})
    return rows
