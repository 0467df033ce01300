"""Small random transformers models (no download) for every supported RoPE architecture."""

from __future__ import annotations

import torch
import transformers

# model_type -> config overrides that make a tiny model with the architecture's own RoPE layout.
_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=4096)
_OVERRIDES: dict[str, dict] = {
    "llama": dict(intermediate_size=128, num_key_value_heads=2, rope_theta=10000.0),
    "mistral": dict(intermediate_size=128, num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(intermediate_size=128, num_key_value_heads=2, use_sliding_window=False),
    "gpt_neox": dict(intermediate_size=128, rotary_pct=0.25),
    # GPT-J has only the eager attention path in transformers (matmul-softmax-matmul).
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=4096, bos_token_id=0,
                 eos_token_id=1, attn_implementation="eager"),
    "phi": dict(intermediate_size=128, num_key_value_heads=4, partial_rotary_factor=0.5),
    # a hybrid: a gated delta-rule layer (conv + recurrent states, no KV) before a full-attention layer
    "qwen3_next": dict(intermediate_size=128, num_key_value_heads=2, head_dim=16,
                       layer_types=["linear_attention", "full_attention"], moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                       linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                       linear_value_head_dim=16),
}
ARCHITECTURES: tuple[str, ...] = tuple(_OVERRIDES)


def random_config(arch: str, **overrides) -> transformers.PretrainedConfig:
    """A tiny config of `arch` (a transformers model_type), e.g. `random_config("llama")`."""
    if arch not in _OVERRIDES:
        raise ValueError(f"arch: expected one of {ARCHITECTURES}, got {arch!r}")
    kwargs = dict(_COMMON) if arch != "gptj" else dict(vocab_size=_COMMON["vocab_size"])
    kwargs.update(_OVERRIDES[arch])
    kwargs.update(overrides)
    kwargs.setdefault("attn_implementation", "sdpa")
    return transformers.AutoConfig.for_model(arch, **kwargs)


def random_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny `AutoModelForCausalLM` of `arch` with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(random_config(arch, **overrides), dtype=dtype)
    return model.eval()
