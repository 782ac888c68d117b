"""ModernBERT: pre-LN without biases, fused Wqkv, RoPE, GeGLU, alternating global / local (±64) attention."""

from .spec import PRE_NORM, BackboneSpec, LayerSpec, layer_types


def _window(config, layer_idx):
    # Stock masks local layers with |q - k| <= config.sliding_window (= local_attention // 2).
    if layer_types(config)[layer_idx] == "sliding_attention":
        half = getattr(config, "sliding_window", None) or config.local_attention // 2
        return (half, half)
    return None


MODERNBERT = BackboneSpec(
    family="modernbert",
    model_types=("modernbert",),
    layers="layers",
    word_embeddings="embeddings.tok_embeddings",
    embedding_norm="embeddings.norm",
    final_norm="final_norm",
    rotary="rotary_emb",
    layer=LayerSpec(
        wiring=PRE_NORM,
        norm="layernorm",
        qkv="attn.Wqkv",
        o="attn.Wo",
        attn_norm="attn_norm",
        mlp_norm="mlp_norm",
        mlp_in="mlp.Wi",
        mlp_out="mlp.Wo",
        activation="geglu",
        rope=True,
    ),
    window=_window,
    hidden_dropout=lambda c: getattr(c, "mlp_dropout", 0.0),
    attention_dropout=lambda c: getattr(c, "attention_dropout", 0.0),
    embedding_dropout=lambda c: getattr(c, "embedding_dropout", 0.0),
    lora_targets=("Wqkv", "Wo", "Wi"),
)
