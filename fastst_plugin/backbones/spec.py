"""What a backbone family is, as data.

A family is described once, declaratively: where its modules live (attribute paths relative to the
base model, e.g. ``BertModel``), how a layer is wired (post-LN, pre-LN or Gemma's sandwich norms),
which norm and activation it uses, and how attention is masked (bidirectional or causal, sliding
windows per layer). :mod:`fastst_plugin.backbones.encoder` turns such a description plus a live
model into a padding-free forward that reads the model's own parameters: nothing is copied or
renamed, so state-dict keys, peft adapters and optimizers keep working.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

# Wiring of one layer.
POST_NORM = "post"  # BERT: h = LN(h + attn(h)); h = LN(h + mlp(h))
PRE_NORM = "pre"  # ModernBERT, Qwen3: h = h + attn(LN(h)); h = h + mlp(LN(h))
SANDWICH_NORM = "sandwich"  # Gemma3: h = h + LN2(attn(LN1(h))); h = h + LN4(mlp(LN3(h)))


@dataclass(frozen=True)
class LayerSpec:
    wiring: str
    norm: str  # "layernorm" | "rmsnorm"
    norm_offset: float = 0.0  # RMSNorm weight used as (offset + w): Gemma3 stores w - 1
    # attention projections: either one fused module or three
    qkv: str | None = None
    q: str | None = None
    k: str | None = None
    v: str | None = None
    o: str = ""
    q_norm: str | None = None
    k_norm: str | None = None
    # norms around the blocks (None: absent / identity)
    attn_norm: str | None = None  # pre-LN / sandwich: before attention
    post_attn_norm: str | None = None  # post-LN: after attention + residual; sandwich: on attention output
    mlp_norm: str | None = None  # pre-LN / sandwich: before the MLP
    post_mlp_norm: str | None = None  # post-LN: after MLP + residual; sandwich: on MLP output
    # MLP: either one input projection (plain activation or a fused [gate|up] GLU) or gate + up
    mlp_in: str | None = None
    mlp_gate: str | None = None
    mlp_up: str | None = None
    mlp_out: str = ""
    activation: str = "gelu"  # gelu | gelu_tanh | geglu | geglu_tanh | swiglu
    rope: bool = False


@dataclass(frozen=True)
class BackboneSpec:
    family: str
    model_types: tuple[str, ...]
    layer: LayerSpec
    layers: str  # path of the ModuleList
    # embeddings
    word_embeddings: str
    position_embeddings: str | None = None  # learned absolute positions (BERT)
    token_type_embeddings: str | None = None
    embedding_norm: str | None = None
    embedding_scale: Callable | None = None  # config -> float multiplier, when the module does not apply it
    position_offset: Callable | None = None  # config -> int added to 0-based positions (RoBERTa: pad + 1)
    final_norm: str | None = None
    rotary: str | None = None  # path of the HF rotary module (called with layer type when it takes one)
    # masking
    causal: Callable = lambda config: False
    window: Callable = lambda config, layer_idx: None  # (left, right) or None for full attention
    attention_scale: Callable | None = None  # config -> softmax scale; default head_dim ** -0.5
    head_dim: Callable | None = None  # config -> head dim; default hidden / heads
    # dropout probabilities read from the config (training mode only)
    hidden_dropout: Callable = lambda config: 0.0
    attention_dropout: Callable = lambda config: 0.0
    embedding_dropout: Callable | None = None
    # LoRA targets used by ``lora=True`` / an int rank
    lora_targets: tuple[str, ...] = ()
    half_precision_ok: bool = True  # False: fp16 overflows (Gemma3): refuse fp16, bf16/fp32 only
    notes: tuple[str, ...] = field(default_factory=tuple)


def layer_types(config) -> list[str]:
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    return ["full_attention"] * config.num_hidden_layers
