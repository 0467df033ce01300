"""Every causal LM with rotary embeddings in the installed transformers, checked the way a new user would.

    python -m gaugecompile.models.sweep [--only llama cohere2 ...] [--out DIR] [--jobs N]

Each model type gets a tiny random config (4 layers, 4 heads / 2 KV heads of 16 dims, a window of 6 where
the type has windows, small experts) and four checks:
1. `ManifoldCache(config, ...)` constructs, or refuses with a ValueError that says why;
2. greedy `generate` over it gives DynamicCache's tokens;
3. after an unaligned `delete`, the next two steps' logits equal a reference built from the model's own code
   (within 1e-4): the prompt's keys and values with the span cut out and the later keys re-rotated by the
   model's rotary module and `apply_rotary_pos_emb`, in the layers whose forward called it (observed by
   wrapping that function, not by the cache's probe), written into transformers' own cache for the config
   (whose sliding layers keep their last W - 1 tokens);
   (a hybrid model's cache, whose linear-attention, SSM or convolution layers keep recurrent states, must refuse
   the delete instead, with a ValueError that names them, and be left exactly as it was: "refused");
4. the same steps compiled with `backend="gauge"` equal eager, counting the attention layers (KV-sharing ones
   too) that ran the rotated-query kernel in the last step (at run time: a layer compiled in a graph of its own
   counts too, and a rewritten site whose run-time mask check fell back to the gather does not).
A hybrid type whose default layer pattern puts no attention layer among the first 4 gets attention at layers 1
and 3 (its config's own attribute for the pattern).
Status: "rewritten" (all four, every layer ran the kernel), "exact" (all equal, some sites left as they were),
"refused" (check 1 said no), "WRONG" (a check disagrees, or the cache raised something other than a refusal),
"harness" (the tiny model or the reference could not be built: no verdict on the cache).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import importlib
import inspect
import json
import multiprocessing
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache

from ..cache.rope_config import apply_keys_rotation, rotated_width
from ..ops.counters import runs
from .families import SWEEP_STATUS

__all__ = ["FamilyResult", "check_family", "rotary_causal_lm_types", "tiny_config"]

_SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_local_experts=4,
              num_experts=4, n_routed_experts=4, num_experts_per_tok=2, n_embd=64, n_layer=4, n_head=4,
              vocab_size_per_layer_input=128, hidden_size_per_layer_input=16, rotary_dim=8, n_positions=2048,
              n_group=1, topk_group=1)
_OTHER_PARTS = dict(depth=1, num_hidden_layers=1, num_layers=1, hidden_size=32, embed_dim=32, intermediate_size=32,
                    num_heads=2, num_attention_heads=2, out_hidden_size=64, vision_output_dim=64,
                    adapter_in_dim=32, adapter_input_size=32, adapter_out_dim=64)  # adapters: part width -> text
_LATENT = dict(kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
               num_key_value_heads=4)  # its keys are expanded to every head from the latent
_WINDOW = 6
_PROMPT = 12
_CUT = (2, 5)  # off the block boundaries of block size 4
_STEPS = (7, 9)
_TOL = 1e-4


@dataclass
class FamilyResult:
    model_type: str
    status: str
    detail: str = ""
    checks: dict = field(default_factory=dict)


def _modeling(model_type: str):
    name = transformers.models.auto.configuration_auto.model_type_to_module_name(model_type)
    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


def rotary_causal_lm_types() -> list[str]:
    """Model types with a causal-LM class whose modeling code has rotary embeddings."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        try:
            module = _modeling(model_type)
        except Exception:  # noqa: BLE001 -- a type whose code does not import here is not one to check
            continue
        if hasattr(module, "apply_rotary_pos_emb") or any(k.endswith("RotaryEmbedding") for k in vars(module)):
            out.append(model_type)
    return out


# what a type's config needs beyond the sizes above to build 4 small layers (its own validation's demands)
_TYPE_FIXES = {
    # its default rope_parameters are empty, and its rotary module reads one entry per layer type
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    # its own names for the sizes; its attention reads attn_config.rope_theta (then unused: RoPE comes from
    # rope_parameters), and clamps by clip_qkv, whose default None fails clamp(None, None)
    "dbrx": {"d_model": 64, "n_heads": 4, "n_layers": 4,
             "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}},
    "dots1": {"n_shared_experts": 1},  # None by default, multiplied by the expert width
    "dots3_note_text": {"num_key_value_heads": 4},  # "num_key_value_heads must match num_attention_heads"
    # one sparsity value per layer; the last 2 of the 4 layers share the KV of earlier ones, as its checkpoints do
    "gemma3n_text": {"activation_sparsity_pattern": [0.0] * 4, "num_kv_shared_layers": 2},
    "bailing_hybrid": {"num_expert_group": 1, "num_experts_per_token": 2, "linear_num_heads": 4, "linear_head_dim": 16},
    "longcat_flash": {"num_layers": 2, "ffn_hidden_size": 128, "expert_ffn_hidden_size": 32, "zero_expert_num": 2,
                      "moe_topk": 2, "n_routed_experts": 4},  # (its layers are pairs: 2 of them make 4 caches)
    "lfm2_moe": {"layer_types": ["conv", "full_attention"] * 2},  # None by default, indexed per layer
    "zaya": {"num_experts_per_tok": 1},  # "ZAYA currently supports num_experts_per_tok=1 only"
    "zamba2": {"layers_block_type": ["linear_attention", "hybrid"] * 2, "hybrid_layer_ids": [1, 3]},
}
# the Dynamo settings a type's compiled check runs under, where its own code asks for them: JetMoE's router
# calls .tolist() in every layer, a graph break whose resumed frames recompile per routing pattern past the limit;
# capturing the scalars (the setting Dynamo's warning names) removes the break
_DYNAMO_CONFIG = {"jetmoe": {"capture_scalar_outputs": True}}
# how a hybrid config places its attention layers (the first that a type accepts is used)
_ATTENTION_AT_1_AND_3 = (
    {"layer_types": ["linear_attention", "full_attention"] * 2},
    {"attn_layer_indices": [1, 3]},
    {"attn_layer_period": 2, "attn_layer_offset": 1},
)


def _layer_types(config) -> list[str]:
    from transformers.cache_utils import get_layer_types_and_kwargs

    return list(get_layer_types_and_kwargs(config.get_text_config(decoder=True))[0])


def _tiny_sizes(defaults: dict) -> dict:
    kwargs = {k: v for k, v in _SIZES.items() if k in defaults}
    if "kv_lora_rank" in defaults:  # multi-head latent attention: its head_dim is its RoPE width
        kwargs.update({k: v for k, v in _LATENT.items() if k in defaults})
    for window in ("sliding_window", "attention_chunk_size"):
        if defaults.get(window) is not None:
            kwargs[window] = _WINDOW
    return kwargs


def _tiny_parts(config) -> dict:
    """A multimodal config's sub-configs, shrunk: its text config to the sizes above (its layer pattern
    regenerated for 4 layers), the others (vision, audio, VQ) to one layer of width 32."""
    from transformers import PretrainedConfig

    parts = {}
    for name, sub in vars(config).items():
        if not isinstance(sub, PretrainedConfig):
            continue
        part = sub.to_dict()
        if name == "text_config":
            # per-layer lists, regenerated for 4 layers
            for name_ in ("layer_types", "mlp_layer_types", "per_layer_config", "no_rope_layers"):
                part.pop(name_, None)
            part.update({**_tiny_sizes(part), **_TYPE_FIXES.get(part.get("model_type"), {})})
        else:
            part.update({k: v for k, v in _OTHER_PARTS.items() if isinstance(part.get(k), int)})
            if isinstance(part.get("mlp_layer_types"), list):  # one entry per layer: the ones left (dots3's)
                part["mlp_layer_types"] = part["mlp_layer_types"][:part["num_hidden_layers"]]
                part.pop("per_layer_config", None)  # (its overrides name layers past those)
        parts[name] = part
    return parts


def tiny_config(model_type: str):
    """The type's default config with the sizes above where it has those attributes (windows shrunk to 6; a
    multimodal model's text config so, its other parts to one small layer), and attention at layers 1 and 3
    where its 4 layers would otherwise all be state layers."""
    default = transformers.AutoConfig.for_model(model_type)
    kwargs = {**_tiny_sizes(default.to_dict()), **_tiny_parts(default), **_TYPE_FIXES.get(model_type, {})}
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    try:
        types = set(_layer_types(config))
    except AttributeError:  # no layer count where transformers' caches look (BLT): the cache's own check says why
        return config
    if types == {"linear_attention"}:
        for layout in _ATTENTION_AT_1_AND_3:
            with contextlib.suppress(Exception):
                hybrid = transformers.AutoConfig.for_model(model_type, **kwargs, **layout)
                if _layer_types(hybrid) == ["linear_attention", "full_attention"] * 2:
                    return hybrid
    return config


def _build(config):
    from ..cache.rope_probe import small_model

    for attn in ("sdpa", "eager"):
        # transformers takes the implementation in a config's constructor or a built model's
        # set_attn_implementation; this config exists already and the model is built from it: no public setter
        config._attn_implementation = attn
        try:
            return small_model(config, max_params=20_000_000)
        except ValueError as exc:
            if "scaled_dot_product_attention" not in str(exc):
                raise
    raise RuntimeError("neither sdpa nor eager attention builds")


# the modeling module's functions that rotate keys (DeepSeek-V3's interleave variant permutes the pairs first)
_ROTATIONS = ("apply_rotary_pos_emb", "apply_rotary_emb", "apply_rotary_pos_emb_interleave")


def _rope_layers(model, module, ids: torch.Tensor) -> set[int]:
    """The cache layers whose keys the modeling module's apply_rotary_pos_emb, or apply_rotary_emb (Llama 4's
    complex form), rotated: a call of it marks the layer of the cache update that follows, observed, not inferred
    (by cache layer, not by module: HRM reuses its layer stacks over cycles, LongCat pairs attention modules)."""
    names = [n for n in _ROTATIONS if hasattr(module, n)]
    rotated, seen = [False], set()

    class Spy(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            if rotated[0]:
                seen.add(layer_idx)
            rotated[0] = False
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    originals = {n: getattr(module, n) for n in names}

    def spied(original):
        @functools.wraps(original)
        def spy(*args, **kwargs):
            rotated[0] = True
            return original(*args, **kwargs)
        return spy

    for n, original in originals.items():
        setattr(module, n, spied(original))
    try:
        with torch.no_grad():
            model(input_ids=ids, past_key_values=Spy(config=model.config), use_cache=True)
    finally:
        for n, original in originals.items():
            setattr(module, n, original)
    return seen


def _rotated_by_table(model, module, keys: torch.Tensor, shift: int) -> torch.Tensor:
    """`keys` ([B, H, S, D]) rotated by `shift` positions with a GPT-J-style model's sinusoidal table and its
    apply_rotary_pos_emb (which takes [B, S, H, D] and the table's sin and cos halves) over its rotary_dim."""
    width = model.config.rotary_dim
    sin, cos = module.create_sinusoidal_positions(abs(shift) + 1, width)[abs(shift)].to(keys.dtype).chunk(2)
    sin = sin if shift >= 0 else -sin  # the table starts at 0: R(-s) is R(s) with sin negated
    part = keys[..., :width].transpose(1, 2)
    out = module.apply_rotary_pos_emb(part, sin[None, None], cos[None, None]).transpose(1, 2)
    return torch.cat([out, keys[..., width:]], -1)


def _rotated(model, module, keys: torch.Tensor, shift: int, layer_type: str | None) -> torch.Tensor:
    """`keys` rotated by `shift` positions with the model's rotary module and apply_rotary_pos_emb."""
    if hasattr(module, "create_sinusoidal_positions"):
        return _rotated_by_table(model, module, keys, shift)
    rotary = next(m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding"))
    x = torch.zeros(1, 1, 1, keys.shape[-1], dtype=keys.dtype)
    position = torch.tensor([[shift]])
    typed = layer_type is not None and "layer_type" in inspect.signature(rotary.forward).parameters
    emb = rotary(x, position, layer_type) if typed else rotary(x, position)
    scale = getattr(rotary, f"{layer_type}_attention_scaling" if typed else "attention_scaling", 1.0)
    # a pure rotation: a stored key already carries YaRN's factor
    emb = emb / scale if isinstance(emb, torch.Tensor) else tuple(t / scale for t in emb)
    if not any(hasattr(module, f) for f in _ROTATIONS[:2]):
        # only DeepSeek's interleave variant (LongCat), which pairs its input's dims (2i, 2i+1) and writes halves:
        # the stored keys' halves are paired back first
        width = rotated_width(emb)
        part = keys[..., :width]
        pairs = torch.stack((part[..., :width // 2], part[..., width // 2:]), -1).flatten(-2)
        out = module.apply_rotary_pos_emb_interleave(pairs, pairs, *emb)[1]
        return torch.cat([out, keys[..., width:]], -1)
    try:
        out = apply_keys_rotation(module, keys, emb)
        if out.shape == keys.shape:
            return out
    except RuntimeError:
        pass
    width = rotated_width(emb)  # partial rotary: the model rotates the leading dims and passes the rest
    out = apply_keys_rotation(module, keys[..., :width], emb)
    return torch.cat([out, keys[..., width:]], -1)


def _reference(model, module, ids: torch.Tensor, rope_layers: set[int]) -> DynamicCache:
    start, end = _CUT
    full = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=full, use_cache=True)
    text = model.config.get_text_config(decoder=True)
    types, latent = getattr(text, "layer_types", None), getattr(text, "kv_lora_rank", None) is not None
    edited = DynamicCache(config=model.config)  # sliding layers keep their last W - 1 tokens, as transformers does
    for i, layer in enumerate(full.layers):
        k, v = layer.keys, layer.values
        if k is None:  # a layer that reuses another's KV caches nothing
            continue
        if latent:  # multi-head latent attention caches (latent, k_rot): the rotated one is the second
            k, v = v, k
        later = k[:, :, end:]
        if i in rope_layers:
            later = _rotated(model, module, later, start - end, types[i] if types else None)
        k, v = torch.cat([k[:, :, :start], later], 2), torch.cat([v[:, :, :start], v[:, :, end:]], 2)
        edited.update(*((v, k) if latent else (k, v)), i)
    return edited


def _steps(model, cache, ids: torch.Tensor | None, last_step_runs: Counter[str] | None = None,
           cut: bool = True) -> torch.Tensor:
    """Logits of the steps after the prompt `ids` and the cut (None: `cache` holds the cut prompt already; `cut`
    False: no cut); `last_step_runs` gets the op's run-time counts (`gaugecompile.ops.counters.runs`) of the last
    step: "kernel", the rotated-query kernel's runs (the op's and the masked op's fast path; the custom op's body
    is opaque to Dynamo, so compiled graphs count too), "masked_fallback", the masked op's runs that handed the
    step back to masked attention over the view."""
    with torch.no_grad():
        if ids is not None:
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            if cut:
                cache.delete(0, *_CUT)

        def step(token: int) -> torch.Tensor:
            return model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits

        logits = [step(t) for t in _STEPS[:-1]]
        before = runs.copy()
        logits.append(step(_STEPS[-1]))
        if last_step_runs is not None:
            last_step_runs.update(runs - before)
        return torch.cat(logits, 1)


def _delete_refused(model, cache, ids: torch.Tensor) -> bool:
    """Whether a hybrid model's cache refuses the cut with a ValueError naming its state layers and is left as
    it was (mapping, positions and every state tensor)."""
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    before = (cache.mapping(0), cache.positions(0), cache.batch, dict(cache.states.row_of),
              {k: t.clone() for k, t in cache.states.stored.items()})
    try:
        cache.delete(0, *_CUT)
    except ValueError as exc:
        named = "conv/recurrent states" in str(exc)
    else:
        return False
    after = (cache.mapping(0), cache.positions(0), cache.batch, dict(cache.states.row_of), cache.states.stored)
    same = before[:4] == after[:4] and before[4].keys() == after[4].keys() and all(
        torch.equal(t, after[4][k]) for k, t in before[4].items())
    return named and same


def _why_not_rewritten(reports: list, fallbacks: int) -> str:
    """Why some attention layers did not run the kernel in the last step, from the compiled graphs' pass reports
    and the masked op's fallbacks in that step."""
    refused = [site.reason for report in reports for site in report.refused]
    if refused:
        return f"not rewritten: {refused[-1][:200]}"
    if fallbacks:
        return (f"not run: {fallbacks} rewritten site(s) handed the last step back to masked attention over the "
                "view (their run-time check found a mask other than the causal or sliding-window one)")
    if any(report.rewritten for report in reports):
        return ("not run: the last step did not reach the rewritten graphs (Dynamo ran it eagerly, e.g. past its "
                "recompile limit)")
    plain = sum(report.plain_attention for report in reports)
    if plain:
        return (f"not rewritten: the passes found {plain} attention(s) over keys computed from the cache rather than "
                "the cache itself (e.g. a projection of a latent), left as they are")
    if reports:
        return f"not rewritten: the passes matched no attention site in the {len(reports)} compiled graph(s)"
    return "not compiled: no graph reached the passes"


def check_family(model_type: str, *, compile_check: bool = True) -> FamilyResult:
    """The four checks on one model type."""
    from ..backend import gauge_backend
    from ..cache import ManifoldCache

    try:
        config = tiny_config(model_type)
    except Exception as exc:  # noqa: BLE001 -- the harness, not the cache
        return FamilyResult(model_type, "harness", f"tiny config: {type(exc).__name__}: {str(exc)[:200]}")
    try:
        model = _build(config)
    except Exception as exc:  # noqa: BLE001 -- the harness, not the cache
        model, built = None, f"tiny model: {type(exc).__name__}: {str(exc)[:200]}"
    try:
        ManifoldCache(config, max_batch_size=2, max_tokens=256, block_size=4)
    except ValueError as exc:
        reason = str(exc).splitlines()[0][:300]
        if model is None and "small copy" in reason:  # the cache's probe failed on the same unbuildable config
            return FamilyResult(model_type, "harness", built)
        return FamilyResult(model_type, "refused", reason, {"constructs": False})
    except Exception as exc:  # noqa: BLE001 -- an obscure crash where a refusal with a reason was due
        return FamilyResult(model_type, "WRONG", f"construction: {type(exc).__name__}: {str(exc)[:200]}",
                            {"constructs": False})
    if model is None:
        return FamilyResult(model_type, "harness", built)
    try:
        module = _modeling(model_type)
        vocab = model.config.get_text_config(decoder=True).vocab_size
        ids = torch.randint(3, vocab, (1, _PROMPT), generator=torch.Generator().manual_seed(1))
        rope_layers = _rope_layers(model, module, ids) if any(hasattr(module, f) for f in _ROTATIONS) else None
    except Exception as exc:  # noqa: BLE001 -- the harness, not the cache
        return FamilyResult(model_type, "harness", f"tiny model: {type(exc).__name__}: {str(exc)[:200]}")

    def new_cache():
        return ManifoldCache(model.config, max_batch_size=2, max_tokens=256, block_size=4)

    result = FamilyResult(model_type, "WRONG", checks={"constructs": True})
    hybrid = new_cache().states is not None
    text = model.config.get_text_config(decoder=True)
    reusing = sum(mode == "reuse" for mode in getattr(text, "kv_sharing_modes", None) or ())
    attention = len(new_cache().attention_layers) + reusing  # a KV-sharing layer attends over another's cache
    try:
        kwargs = dict(input_ids=ids, max_new_tokens=6, do_sample=False)
        got = model.generate(past_key_values=new_cache(), **kwargs)
        want = model.generate(past_key_values=DynamicCache(config=model.config), **kwargs)
        result.checks["generate"] = got.tolist() == want.tolist()
        eager = _steps(model, new_cache(), ids, cut=not hybrid)
        if hybrid:
            result.checks["delete"] = "refused" if _delete_refused(model, new_cache(), ids) else False
        elif rope_layers is None:
            result.checks["delete"] = None
            result.detail = "no module-level apply_rotary_pos_emb or apply_rotary_emb to build the reference from"
        else:
            try:
                ref = _steps(model, _reference(model, module, ids, rope_layers), None)
            except Exception as exc:  # noqa: BLE001 -- the reference, not the cache
                result.checks["delete"] = None
                result.detail = f"reference: {type(exc).__name__}: {str(exc)[:160]}"
            else:
                result.checks["delete"] = bool(torch.allclose(eager, ref, rtol=_TOL, atol=_TOL))
        if compile_check:
            sink: list = []
            torch._dynamo.reset()
            compiled = torch.compile(model, backend=functools.partial(gauge_backend, inner="eager",
                                                                      report_sink=sink))
            ran: Counter[str] = Counter()
            with torch._dynamo.config.patch(_DYNAMO_CONFIG.get(model_type, {})):
                got = _steps(compiled, new_cache(), ids, ran, cut=not hybrid)
            result.checks["compiled"] = bool(torch.allclose(got, eager, rtol=_TOL, atol=_TOL))
            result.checks["rewritten"] = f"{ran['kernel']}/{attention}"
            if ran["kernel"] < attention:
                result.detail = _why_not_rewritten([entry[0] for entry in sink], ran["masked_fallback"])
    except Exception as exc:  # noqa: BLE001 -- anything but a refusal at construction is a failure
        result.detail = f"{type(exc).__name__}: {str(exc)[:240]}"
        return result
    equal = [v for k, v in result.checks.items() if k in ("generate", "delete", "compiled") and v is not None]
    if not all(equal):
        result.detail = result.detail or "a check disagrees: " + ", ".join(
            k for k, v in result.checks.items() if v is False)
        return result
    every = result.checks.get("rewritten", "") == f"{attention}/{attention}"
    result.status = "rewritten" if every and result.checks.get("delete") is not None else "exact"
    return result


def _worker_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def _checked(types: list[str], jobs: int):
    """(model type, result) as each check finishes: in this process, or in `jobs` worker processes that share the
    cores (each check builds and compiles its own models, so they are independent)."""
    if jobs == 1:
        for model_type in types:
            yield model_type, check_family(model_type)
        return
    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter each: no Dynamo or fork state shared
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_threads,
                                                initargs=(threads,)) as pool:
        futures = {pool.submit(check_family, t): t for t in types}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.result()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model types (default: every rotary causal LM)")
    parser.add_argument("--out", type=Path, help="write sweep.json and sweep.md there")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes sharing the cores (default 1)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs: expected a number of processes >= 1, got {args.jobs}")
    types = args.only or rotary_causal_lm_types()
    done = {}
    for i, (model_type, r) in enumerate(_checked(types, args.jobs), 1):
        done[model_type] = r
        print(f"[{i}/{len(types)}] {model_type}: {r.status} {r.checks} {r.detail}", file=sys.stderr, flush=True)
    results = [done[t] for t in types]
    counts = {s: sum(r.status == s for r in results) for s in ("rewritten", "exact", "refused", "WRONG", "harness")}
    lines = [f"transformers {transformers.__version__}, torch {torch.__version__}: {len(results)} model types; "
             + ", ".join(f"{n} {s}" for s, n in counts.items()), "",
             "| model type | status | checks | detail |", "|---|---|---|---|"]
    lines += [f"| {r.model_type} | {r.status} | {r.checks} | {r.detail.replace('|', '/')} |" for r in results]
    moved = [f"{r.model_type}: {SWEEP_STATUS.get(r.model_type, 'not listed')} -> {r.status}" for r in results
             if SWEEP_STATUS.get(r.model_type) != r.status]
    lines += ["", "Moved against the list in gaugecompile/models/families.py: " + ("; ".join(moved) or "none")]
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sweep.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
        (args.out / "sweep.md").write_text("\n".join(lines) + "\n")
    return 1 if counts["WRONG"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
