"""Gemma3 text (EmbeddingGemma): sandwich RMSNorms with (1 + w), MQA/GQA with q/k RMSNorm, GeGLU
(tanh GELU) from gate/up projections, RoPE with a local and a global base, bidirectional attention
when ``use_bidirectional_attention`` (causal otherwise) and sliding windows on local layers."""

from .spec import SANDWICH_NORM, BackboneSpec, LayerSpec, layer_types


def _window(config, layer_idx):
    if layer_types(config)[layer_idx] != "sliding_attention" or not config.sliding_window:
        return None
    w = config.sliding_window
    if getattr(config, "use_bidirectional_attention", False):
        # Stock: causal sliding window OR |i - j| < w  ==  |i - j| <= w - 1.
        return (w - 1, w - 1)
    return (w - 1, 0)  # causal: j > i - w


GEMMA3 = BackboneSpec(
    family="gemma3",
    model_types=("gemma3_text",),
    layers="layers",
    word_embeddings="embed_tokens",  # Gemma3TextScaledWordEmbedding applies sqrt(hidden) itself
    final_norm="norm",
    rotary="rotary_emb",
    layer=LayerSpec(
        wiring=SANDWICH_NORM,
        norm="rmsnorm",
        norm_offset=1.0,
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.o_proj",
        q_norm="self_attn.q_norm",
        k_norm="self_attn.k_norm",
        attn_norm="input_layernorm",
        post_attn_norm="post_attention_layernorm",
        mlp_norm="pre_feedforward_layernorm",
        post_mlp_norm="post_feedforward_layernorm",
        mlp_gate="mlp.gate_proj",
        mlp_up="mlp.up_proj",
        mlp_out="mlp.down_proj",
        activation="geglu_tanh",
        rope=True,
    ),
    causal=lambda c: not getattr(c, "use_bidirectional_attention", False),
    window=_window,
    attention_scale=lambda c: c.query_pre_attn_scalar**-0.5,
    head_dim=lambda c: c.head_dim,
    attention_dropout=lambda c: getattr(c, "attention_dropout", 0.0),
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    half_precision_ok=False,
)
