"""Qwen3 (Qwen3-Embedding): pre-RMSNorm, GQA with q/k RMSNorm, SwiGLU, RoPE, causal attention;
pooled from each text's last token (stock pads on the left; packed rows need no padding at all)."""

from .spec import PRE_NORM, BackboneSpec, LayerSpec, layer_types


def _window(config, layer_idx):
    if layer_types(config)[layer_idx] == "sliding_attention" and getattr(config, "sliding_window", None):
        return (config.sliding_window - 1, 0)  # stock: j > i - w, causal
    return None


QWEN3 = BackboneSpec(
    family="qwen3",
    model_types=("qwen3",),
    layers="layers",
    word_embeddings="embed_tokens",
    final_norm="norm",
    rotary="rotary_emb",
    layer=LayerSpec(
        wiring=PRE_NORM,
        norm="rmsnorm",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.o_proj",
        q_norm="self_attn.q_norm",
        k_norm="self_attn.k_norm",
        attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
        mlp_gate="mlp.gate_proj",
        mlp_up="mlp.up_proj",
        mlp_out="mlp.down_proj",
        activation="swiglu",
        rope=True,
    ),
    causal=lambda c: True,
    window=_window,
    head_dim=lambda c: c.head_dim,
    attention_dropout=lambda c: getattr(c, "attention_dropout", 0.0),
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)
