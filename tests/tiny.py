"""Tiny random models for unit tests (seconds on a CPU)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


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
    """A random decoder with `num_heads` query heads; biases on for qwen2 (as in the real one)."""
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
    config = CONFIGS[model_type](**{**settings, **overrides})
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, so errors are not hidden
        for name, param in model.named_parameters():
            if "proj" in name:
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
