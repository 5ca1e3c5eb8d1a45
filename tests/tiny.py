"""Tiny random models for unit tests (seconds on a CPU)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Family settings on top of the common tiny ones: each family's distinctive attention features
# switched on and made large enough to matter (soft-capping that bites, windows shorter than the
# test sequences, head_dim independent of hidden_size, biases, multipliers, partial RoPE, per-head
# q/k norms, q/k/v clipping, layers without RoPE).
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"attention_bias": True},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
    "gemma": {"head_dim": 12},
    "gemma2": {
        "head_dim": 12,
        "attn_logit_softcapping": 1.5,
        "sliding_window": 4,
        "query_pre_attn_scalar": 7,
    },
    "gemma3_text": {
        "head_dim": 12,
        "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention"],
        "query_pre_attn_scalar": 7,
    },
    "phi3": {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
    "olmo2": {},
    "granite": {
        "attention_bias": True,
        "attention_multiplier": 0.2,
        "embedding_multiplier": 3.0,
        "residual_multiplier": 0.5,
        "logits_scaling": 2.0,
    },
    "gpt2": {"n_positions": 128, "n_inner": 64},
    "gpt_neox": {
        "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5},
        "attention_bias": True,
    },
    "opt": {"ffn_dim": 64, "enable_bias": True},
    "gptj": {"rotary_dim": 4, "n_inner": 64},
    "starcoder2": {"use_bias": True, "sliding_window": 4},
    "stablelm": {
        "qk_layernorm": True,
        "use_qkv_bias": True,
        "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5},
    },
    "cohere": {"use_qk_norm": True},
    "olmo": {"clip_qkv": 1.0},
    "smollm3": {"no_rope_layers": [1, 0]},  # layer 1 without RoPE
}
CONFIGS = FAMILIES  # the families tiny_model can build
# weights drawn larger than the default init
RANDOMISED = ("proj", "c_attn", "query_key_value", "q_norm", "k_norm", "q_layernorm", "k_layernorm")


def tiny_model(
    model_type: str = "llama",
    num_heads: int = 6,
    num_kv_heads: int = 6,
    num_layers: int = 2,
    head_dim: int = 8,
    attn: str = "sdpa",
    seed: int = 0,
    **overrides,
):
    """A random decoder of a family in FAMILIES with `num_heads` query heads (biases on for qwen2,
    as in the real one)."""
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=97,
        hidden_size=num_heads * head_dim,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    config = AutoConfig.for_model(model_type, **{**settings, **FAMILIES[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, so errors are not hidden
        for name, param in model.named_parameters():
            if "norm" in name and any(key in name for key in RANDOMISED):
                param.uniform_(0.5, 1.5)  # per-dimension q/k norm gains that differ
            elif any(key in name for key in RANDOMISED):
                param.normal_(0, 0.3)
    return model.eval()


def batch(seed: int = 1, batch_size: int = 3, length: int = 12, pad_left: bool = False):
    """Random token ids with a padded batch (rows of different lengths)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (batch_size, length), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(1, batch_size):
        pad = min(row * 3, length - 2)
        if pad_left:
            mask[row, :pad] = 0
        else:
            mask[row, length - pad :] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs).logits
    return out.masked_fill(inputs["attention_mask"][..., None] == 0, 0.0)
