"""GPT-J: an MHA source with separate q/k/v/out_proj linears (no biases) under transformer.h[i].attn,
and RoPE on the first `rotary_dim` dims of each head in GPT-J's interleaved layout (dims 2i and
2i + 1 form a pair). The module reshapes K/V with `view(..., -1, head_dim)`, so any head counts
run exactly; stock GPT-J has no GQA, so groupings save in headgroup's format. The interleaved
RoPE is not expressible to the RoPE-aware key weighting: `rope_inv_freq` refuses (see base)."""

from gqa.adapters.base import ModelAdapter, register_adapter


@register_adapter
class GPTJAdapter(ModelAdapter):
    model_types = ("gptj",)
    layers_path = "transformer.h"
    rotary_path = "transformer.rotary_emb"  # returns (sin, cos), as the module takes them
    attention_attr = "attn"
    projection_names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
    stock_gqa = False
    rope_interleaved = True
