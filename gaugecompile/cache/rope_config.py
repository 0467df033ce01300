"""Read a model's RoPE (frequencies, rotary width, pair layout) and KV shapes from its transformers config.

The config alone does not say how pairs are formed or, for some architectures, how wide the rotary
part is, so the basis is taken from the model's own code: its rotary module gives `inv_freq` (exactly
the float32 values the model multiplies positions by), and a probe of its `apply_rotary_pos_emb`
decides between rotate-half and interleaved pairs.  Anything that does not match one of the two
layouts exactly is refused rather than guessed.

Bases are per layer: a model whose layer types have their own RoPE parameters (Gemma 3's local and global
thetas) gives each type's basis from the same rotary module, and a NoPE layer (marked by `no_rope_layers`, or
found by the probe of `rope_probe.py`) gets no rotation.  The KV shape carries each layer's sliding window,
which the cache bounds the layer's view by.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

import torch

from ..rope import RopeSpec
from .rope_probe import build_model, probe_layer_rotations

__all__ = ["KVShape", "kv_shape_from_config", "layer_ropes_from_config", "read_layout",
           "rope_from_config", "shared_rope"]

# inv_freq of these schemes changes with the sequence length, so no static basis exists.
_DYNAMIC_ROPE = {
    "dynamic": "dynamic NTK rescales inv_freq as the sequence grows, so keys stored earlier are in another basis",
    "longrope": "LongRoPE switches between short and long frequency factors with the sequence length",
}
_PROBE_POSITION = 7


@dataclass(frozen=True)
class KVShape:
    """What a decoder config fixes of its KV: the layer count and the head dim the RoPE basis is read with (the KV
    heads are the model's, read from its first update: a tensor-parallel rank holds a share of the config's)."""

    num_layers: int
    head_dim: int
    #: per layer, the sliding window a query sees (itself and the W - 1 tokens before it), or None
    windows: tuple[int | None, ...]
    #: per layer, what it caches: "attention" (keys and values), "state" (a linear-attention, SSM or convolution
    #: layer's conv/recurrent states), "attention+state" (a layer with both) or "none" (no cache: an MLP layer)
    kinds: tuple[str, ...] = ()
    #: per layer, its head dim (Gemma 4's global layers have wider heads than its sliding ones); `head_dim` is the
    #: first attention layer's.  A latent layer's is its packed row's width, rope part + latent
    head_dims: tuple[int, ...] = ()
    #: per layer, (rope width, latent width) of a multi-head latent attention layer, or None.  Such a layer's
    #: `update(latent, k_rot)` caches the latent (one head, never rotated) and the decoupled RoPE key (one head);
    #: its pool row packs them as [k_rot | latent], the rotation on the leading rope dims
    latent_dims: tuple[tuple[int, int] | None, ...] = ()

    def __post_init__(self) -> None:
        if not self.kinds:
            object.__setattr__(self, "kinds", ("attention",) * self.num_layers)
        if not self.head_dims:
            object.__setattr__(self, "head_dims", (self.head_dim,) * self.num_layers)
        if not self.latent_dims:
            object.__setattr__(self, "latent_dims", (None,) * self.num_layers)

    @property
    def latent_layers(self) -> tuple[int, ...]:
        """The multi-head latent attention layers."""
        return tuple(i for i, d in enumerate(self.latent_dims) if d is not None)

    @property
    def sliding_layers(self) -> list[int]:
        """The layers with a sliding window."""
        return [i for i, w in enumerate(self.windows) if w is not None]

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """The layers that cache keys and values (in the block pools), in the order a forward updates them."""
        return tuple(i for i, k in enumerate(self.kinds) if "attention" in k)

    @property
    def state_layers(self) -> tuple[int, ...]:
        """The layers that keep conv/recurrent states (a hybrid model's linear-attention, SSM or conv layers)."""
        return tuple(i for i, k in enumerate(self.kinds) if "state" in k)


# transformers' layer types (cache_utils.get_layer_types_and_kwargs) and what each caches
_KINDS = {"full_attention": "attention", "sliding_attention": "attention", "chunked_attention": "attention",
          "linear_attention": "state", "conv": "state", "hybrid": "attention+state",
          "hybrid_sliding": "attention+state", "dummy": "none"}


def _layer_types(config) -> list[str]:
    from transformers.cache_utils import get_layer_types_and_kwargs

    return list(get_layer_types_and_kwargs(config)[0])


def _layer_windows(config) -> tuple[int | None, ...]:
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, kwargs = get_layer_types_and_kwargs(config)
    return tuple(k.get("sliding_window") if t in ("sliding_attention", "chunked_attention", "hybrid_sliding") else None
                 for t, k in zip(types, kwargs, strict=True))


def decoder_config(config):
    """The config of the decoder that a cache serves: a multimodal model's text config (as transformers' own
    caches read it), else `config` itself."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


def kv_shape_from_config(config) -> KVShape:
    """Layer count, head dim, windows and layer kinds of a transformers decoder config.  A layer that reuses another
    layer's KV (`kv_sharing_modes`, Gemma 3n) caches nothing: the model hands it what the other layer's update
    returned.  Refused: layer types whose cache is neither attention over every earlier token (possibly through a
    window or chunk the model masks itself) nor a recurrent state (indexed or compressed attention), and a model
    with no attention layer."""
    config = decoder_config(config)
    types = _layer_types(config)
    odd = sorted({t for t in types if t not in _KINDS})
    if odd:
        raise ValueError(
            f"config: ManifoldCache caches full and sliding-window attention layers and linear-attention, SSM or "
            f"convolution states, got layer types {odd}"
        )
    if cross := getattr(config, "cross_attention_layers", None):
        raise ValueError(f"config: {config.model_type!r} has cross-attention layers {list(cross)}, whose keys and "
                         "values come from the image encoder, not from the tokens; ManifoldCache does not cache them")
    kinds = tuple(_KINDS[t] for t in types)
    if not any("attention" in k for k in kinds):
        raise ValueError(f"config: {config.model_type!r} has no attention layer among its layer types {types}; "
                         "ManifoldCache is a cache for attention keys and values")
    latent = _latent_dims(config)
    head_dims = tuple(sum(d) if d is not None else h for d, h in zip(latent, _layer_head_dims(config), strict=True))
    if latent[0] is None and (v_dim := getattr(config, "v_head_dim", None)) is not None and {v_dim} != set(head_dims):
        raise ValueError(f"config: {config.model_type!r} has values of width v_head_dim={v_dim} and keys of "
                         f"head_dim={head_dims[0]}; ManifoldCache pools keys and values of one width")
    windows = _layer_windows(config)
    if any(w is not None and (not isinstance(w, int) or w < 1) for w in windows):
        raise ValueError(f"config.sliding_window: expected a positive int per sliding layer, got {windows}")
    first = next(i for i, k in enumerate(kinds) if "attention" in k)
    latent = tuple(d if "attention" in k else None for d, k in zip(latent, kinds, strict=True))
    return KVShape(int(config.num_hidden_layers), head_dims[first], windows, kinds, head_dims, latent)


def _latent_dims(config) -> tuple[tuple[int, int] | None, ...]:
    """Per layer, (qk_rope_head_dim, kv_lora_rank) where the config has multi-head latent attention (DeepSeek-V2/V3,
    MiniCPM3, ...: transformers caches the latent and the decoupled RoPE key), else None."""
    rank = getattr(config, "kv_lora_rank", None)
    if rank is None:
        return (None,) * int(config.num_hidden_layers)
    rope = getattr(config, "qk_rope_head_dim", None)
    if not (isinstance(rank, int) and isinstance(rope, int) and rank > 0 and rope > 0 and rope % 2 == 0):
        raise ValueError(f"config: {config.model_type!r} has multi-head latent attention with kv_lora_rank={rank!r} "
                         f"and qk_rope_head_dim={rope!r}; expected positive ints (an even rope width)")
    return ((rope, rank),) * int(config.num_hidden_layers)


def _layer_head_dims(config) -> tuple[int, ...]:
    """Each layer's head dim: its per-layer config's (transformers' heterogeneous configs), else the config's
    `head_dim`, else hidden_size / heads."""
    dims = []
    for layer in config.per_layer_config:
        dim = getattr(layer, "head_dim", None) or layer.hidden_size // layer.num_attention_heads
        dims.append(int(dim))
    return tuple(dims)


def _modeling_module(config):
    name = type(config).__module__.replace(".configuration_", ".modeling_")
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ValueError(f"config: cannot import the modeling code of {config.model_type!r} ({name})") from exc


def _rope_params(config) -> dict[str | None, dict]:
    """RoPE parameters per layer type (key None: one set for every layer)."""
    params = getattr(config, "rope_parameters", None) or {}
    if not isinstance(params, dict):
        return {None: {}}
    if params and "rope_type" not in params and all(isinstance(v, dict) or v is None for v in params.values()):
        return dict(params)  # (None: that layer type has no RoPE, as Beam's full-attention layers)
    return {None: params}


def _matched_basis(rotated: torch.Tensor, x: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
                   arch: str) -> RopeSpec:
    """The basis under which `rotated` is `x` rotated to _PROBE_POSITION: rotate-half or interleaved pairs, by
    +theta or by -theta (negated frequencies: NanoChat's rotate_half flips the signs).  Exactly one must match."""
    rotary_dim = 2 * inv_freq.numel()
    pos = torch.tensor([_PROBE_POSITION])
    matches = []
    for sign in (1.0, -1.0):
        for interleaved in (False, True):
            spec = RopeSpec(sign * inv_freq, rotary_dim, interleaved, attention_factor=scaling)
            expect = spec.apply(x, pos)
            expect = torch.cat((expect[..., :rotary_dim] * scaling, expect[..., rotary_dim:]), dim=-1)
            if torch.allclose(rotated, expect, atol=1e-5, rtol=1e-5):
                matches.append(spec)
    if len(matches) != 1:
        raise ValueError(
            f"config: the rotary embedding of {arch!r} matches neither rotate-half nor interleaved pairs (by theta "
            f"or -theta) over rotary_dim={rotary_dim}; refusing to guess its layout"
        )
    return matches[0]


def _rotary_class(module, config):
    """The rotary embedding class of the decoder `config` builds: the modeling module's only one, or, where the
    module defines several (a multimodal model's vision and text rotaries), the one a meta-device build of the
    decoder holds."""
    arch = config.model_type
    classes = _rotary_classes(module)
    if len(classes) > 1:
        classes = _built_rotaries(config, classes)
    if len(classes) != 1 or not any(hasattr(module, f) for f in (*_ROTATIONS, "apply_rotary_pos_emb_interleave")):
        raise ValueError(
            f"config: cannot find a single rotary embedding class and apply_rotary_pos_emb (or apply_rotary_emb) in "
            f"the modeling code of "
            f"{arch!r}; ManifoldCache does not know its RoPE layout"
        )
    return classes[0]


_ROTATIONS = ("apply_rotary_pos_emb", "apply_rotary_emb")  # functions whose output layout the basis is read from


def _rotary_classes(module) -> list[type]:
    """The rotary embedding classes a modeling module defines."""
    return [obj for name, obj in vars(module).items()
            if name.endswith("RotaryEmbedding") and isinstance(obj, type) and issubclass(obj, torch.nn.Module)
            and obj.__module__ == module.__name__]


def _built_rotaries(config, classes: list[type]) -> list[type]:
    """Which of `classes` a meta-device build of `config`'s model instantiates (ValueError naming the build's error
    when the model does not build)."""
    try:
        with torch.device("meta"):
            model = build_model(config)
    except Exception as exc:  # noqa: BLE001 -- any failure of the model's own code
        raise ValueError(f"config: cannot build {config.model_type!r} to find which of its rotary embedding classes "
                         f"{[c.__name__ for c in classes]} the decoder uses ({type(exc).__name__}: {exc})") from exc
    return [c for c in classes if any(type(m) is c for m in model.modules())]


def _gptj_rope(config, module, head_dim: int) -> RopeSpec:
    """The basis of a model with GPT-J's sinusoidal table (`create_sinusoidal_positions`, base 10000)."""
    rotary_dim = getattr(config, "rotary_dim", None)
    if not rotary_dim:
        raise ValueError(f"config.rotary_dim: {config.model_type!r} without rotary_dim rotates over the embedding "
                         "width; unsupported")
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64) / rotary_dim))
    table = module.create_sinusoidal_positions(_PROBE_POSITION + 1, rotary_dim)[_PROBE_POSITION]
    sin, cos = table.double().chunk(2)
    angles = _PROBE_POSITION * inv_freq.double()
    if not (torch.allclose(sin, angles.sin(), atol=1e-5) and torch.allclose(cos, angles.cos(), atol=1e-5)):
        raise ValueError(f"config: the sinusoidal table of {config.model_type!r} does not match base-10000 "
                         "frequencies; unsupported variant")
    x = torch.randn(1, 1, 1, head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rot = module.apply_rotary_pos_emb(x[..., :rotary_dim], sin[None, None].float(), cos[None, None].float())
    rotated = torch.cat((rot, x[..., rotary_dim:]), dim=-1)
    return _matched_basis(rotated, x, inv_freq, 1.0, config.model_type)


def apply_keys_rotation(module, keys: torch.Tensor, emb) -> torch.Tensor:
    """`keys` ([B, H, S, D]) rotated by the modeling module's own code with `emb`, what its rotary module returned:
    (cos, sin) for apply_rotary_pos_emb, in its (q, k, cos, sin) form or its one-tensor (x, cos, sin) form (Gemma
    4), or complex `freqs_cis` for apply_rotary_emb (Llama 4, which takes [B, S, H, D])."""
    if isinstance(emb, torch.Tensor) and emb.is_complex():
        return module.apply_rotary_emb(keys.transpose(1, 2), keys.transpose(1, 2), emb)[1].transpose(1, 2)
    fn = module.apply_rotary_pos_emb
    if list(inspect.signature(fn).parameters)[1] == "cos":
        return fn(keys, *emb)
    return fn(keys, keys, *emb)[1]


def rotated_width(emb) -> int:
    """How many leading dims the rotary module's output `emb` rotates (cos per dim, or freqs_cis per pair)."""
    return 2 * emb.shape[-1] if isinstance(emb, torch.Tensor) and emb.is_complex() else emb[0].shape[-1]


def _basis(config, module, rotary, layer_type: str | None, head_dim: int) -> RopeSpec:
    """The basis `rotary` (the model's rotary module) gives for `layer_type` (None: its only one)."""
    arch = config.model_type
    name = "inv_freq" if layer_type is None else f"{layer_type}_inv_freq"
    if not isinstance(getattr(rotary, name, None), torch.Tensor):
        raise ValueError(f"config: the rotary module of {arch!r} ({type(rotary).__name__}) has no {name} buffer; "
                         "ManifoldCache does not know its frequencies")
    inv_freq = getattr(rotary, name).detach().to("cpu")
    scaling = float(getattr(rotary, "attention_scaling" if layer_type is None else f"{layer_type}_attention_scaling",
                            1.0))
    x = torch.randn(1, 1, 1, head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    position = torch.tensor([[_PROBE_POSITION]])
    emb = rotary(x, position) if layer_type is None else rotary(x, position, layer_type)
    rotary_dim = 2 * inv_freq.numel()
    # cos per rotated dim, or per pair (GPT-OSS: its apply_rotary_pos_emb splits the head in halves itself)
    if rotated_width(emb) not in (rotary_dim, rotary_dim // 2) or rotary_dim > head_dim:
        raise ValueError(
            f"config: {arch!r} rotary module gives a rotation of width {rotated_width(emb)} for {inv_freq.numel()} "
            f"frequencies and head_dim {head_dim}; unsupported layout"
        )
    if not any(hasattr(module, f) for f in _ROTATIONS):
        # only DeepSeek's interleave variant (LongCat, Ling): it permutes each key's pairs, then rotates the halves,
        # so stored keys differ between positions by a rotate-half rotation; the probe checks it layer by layer
        return RopeSpec(inv_freq, rotary_dim, False, attention_factor=scaling)
    if not (isinstance(emb, torch.Tensor) and emb.is_complex()):
        emb = tuple(t.double() for t in emb)
    # Partial-rotary models (NeoX, Phi, ...) rotate the leading rotary_dim dims and pass the rest through.
    rot = apply_keys_rotation(module, x[..., :rotary_dim], emb).double()
    rotated = torch.cat((rot, x[..., rotary_dim:]), dim=-1)
    return _matched_basis(rotated, x, inv_freq, scaling, arch)


def layer_ropes_from_config(config) -> tuple[RopeSpec, ...]:
    """Each layer's static RoPE basis, learnt from the model's own code: its layer type's basis from the rotary
    module (models whose layer types have their own RoPE parameters), or no rotation for a NoPE layer.

    NoPE layers are those the config's `no_rope_layers` marks 0 (SmolLM3, Llama 4: "1 uses RoPE, 0 is a NoPE
    layer") and those a probe of a small copy of the model finds do not rotate (`rope_probe.py`: Cohere 2's
    full-attention layers); their keys are cached as the model wrote them and never re-rotated by an edit.
    Raises ValueError for schemes with no static basis (dynamic NTK, LongRoPE), for architectures whose rotary
    layout cannot be identified and for layers the probe cannot place.  Memoised per config.
    """
    config = decoder_config(config)
    key = (type(config).__qualname__, config.to_json_string(use_diff=False))
    if key not in _LAYER_ROPES:
        _LAYER_ROPES[key] = _compute_layer_ropes(config)
    return _LAYER_ROPES[key]


_LAYER_ROPES: dict[tuple[str, str], tuple[RopeSpec, ...]] = {}  # the probe builds a model: once per config


def _compute_layer_ropes(config) -> tuple[RopeSpec, ...]:
    params = _rope_params(config)
    for layer_type, p in params.items():
        rope_type = (p or {}).get("rope_type", "default")
        if rope_type in _DYNAMIC_ROPE:
            where = "" if layer_type is None else f"[{layer_type!r}]"
            raise ValueError(f"config.rope_parameters{where}: rope_type {rope_type!r} cannot be cached by block "
                             f"deltas: {_DYNAMIC_ROPE[rope_type]}")
    shape = kv_shape_from_config(config)
    module = _modeling_module(config)
    types = _layer_types(config)
    if hasattr(module, "create_sinusoidal_positions"):  # GPT-J and CodeGen: a sinusoidal table, no rotary module
        bases = {None: _gptj_rope(config, module, shape.head_dim)}
    elif not _rotary_classes(module):  # no rotary code at all (Jamba, Nemotron-H): NoPE layers, if the probe agrees
        bases, params = {None: RopeSpec.none(shape.head_dim)}, {None: {}}
    else:
        rotary = _rotary_class(module, config)(config=config)
        # the layer types the model has (a rotary module holds only those bases), each read with its head dim
        dims = {t: shape.head_dims[types.index(t)] if t in types else shape.head_dim for t in params}
        bases = {t: _basis(config, module, rotary, t, dims[t]) for t, p in params.items()
                 if p is not None and (t is None or t in types)}
    attends = ["attention" in k for k in shape.kinds]  # a state or MLP layer has no keys to rotate
    nope = {t for t, p in params.items() if p is None}
    attends = [a and t not in nope for t, a in zip(types, attends, strict=True)]  # NoPE types: checked by the probe
    if None not in bases and any(t not in bases for t, a in zip(types, attends, strict=True) if a):
        raise ValueError(f"config.rope_parameters: no RoPE parameters for layer types "
                         f"{sorted({t for t, a in zip(types, attends, strict=True) if a} - set(bases))}")
    base = next(iter(bases.values()))
    ropes = [(bases[None] if None in bases else bases[t]) if a else RopeSpec.none(base.rotary_dim)
             for t, a in zip(types, attends, strict=True)]
    flags = getattr(config, "no_rope_layers", None)
    if flags is not None:
        flags = list(flags)
        if len(flags) < len(ropes) or any(f not in (0, 1) for f in flags[:len(ropes)]):
            raise ValueError(f"config.no_rope_layers: expected a 0/1 flag (1: RoPE) for each of the {len(ropes)} "
                             f"layers, got {flags}")
        ropes = [r if flags[i] else RopeSpec.none(r.rotary_dim) for i, r in enumerate(ropes)]
    return probe_layer_rotations(config, tuple(ropes), shape)


def shared_rope(ropes: tuple[RopeSpec, ...]) -> RopeSpec:
    """The one basis all rotating layers of `ropes` use (ValueError when layer types have their own)."""
    bases = list(dict.fromkeys(r for r in ropes if not r.is_identity)) or [ropes[0]]
    if len(bases) > 1:
        raise ValueError(f"config: its layers use {len(bases)} RoPE bases (per layer type); this needs one basis "
                         "for every layer: use the per-layer bases (ManifoldCache.layer_ropes)")
    return bases[0]


def rope_from_config(config) -> RopeSpec:
    """The static RoPE basis every rotating layer of a transformers decoder config shares (see
    `layer_ropes_from_config`; ValueError when layer types have their own bases)."""
    return shared_rope(layer_ropes_from_config(config))


def read_layout(config) -> tuple[tuple[RopeSpec, ...], KVShape]:
    """Per-layer RoPE bases and KV shape of `config`; a config whose structure this code does not understand
    (an attribute it lacks, a per-layer attribute it has) is refused with a ValueError naming it."""
    try:
        return layer_ropes_from_config(config), kv_shape_from_config(config)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 -- any other failure to read the layout is a refusal with its reason
        kind = getattr(config, "model_type", type(config).__name__)
        raise ValueError(f"config: cannot read the KV layout and RoPE of {kind!r} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
