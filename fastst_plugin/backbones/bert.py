"""BERT family: BERT, MiniLM, bge, e5, RoBERTa/XLM-R style encoders (post-LN, learned positions)."""

from .spec import POST_NORM, BackboneSpec, LayerSpec


def _roberta_offset(config):
    return (config.pad_token_id or 0) + 1 if config.model_type in ("roberta", "xlm-roberta", "camembert") else 0


BERT = BackboneSpec(
    family="bert",
    model_types=("bert", "roberta", "xlm-roberta", "camembert", "mpnet_disabled"),
    layers="encoder.layer",
    word_embeddings="embeddings.word_embeddings",
    position_embeddings="embeddings.position_embeddings",
    token_type_embeddings="embeddings.token_type_embeddings",
    embedding_norm="embeddings.LayerNorm",
    position_offset=_roberta_offset,
    layer=LayerSpec(
        wiring=POST_NORM,
        norm="layernorm",
        q="attention.self.query",
        k="attention.self.key",
        v="attention.self.value",
        o="attention.output.dense",
        post_attn_norm="attention.output.LayerNorm",
        mlp_in="intermediate.dense",
        mlp_out="output.dense",
        post_mlp_norm="output.LayerNorm",
        activation="gelu",
    ),
    hidden_dropout=lambda c: c.hidden_dropout_prob,
    attention_dropout=lambda c: c.attention_probs_dropout_prob,
    embedding_dropout=lambda c: c.hidden_dropout_prob,
    lora_targets=("query", "key", "value", "dense"),
)
