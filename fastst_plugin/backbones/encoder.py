"""The one generic walker: a family description + a live HF model → a padding-free forward.

``PackedEncoder(hf_model, spec, state)(packed)`` maps a :class:`~fastst_plugin.packing.PackedBatch`
(``[T]`` tokens of N texts) to the last hidden states ``[T, hidden]``. It holds references to the
model's own modules (embeddings, norms, linear layers — plain, peft LoRA or quantized) and reads
their parameters at every call, so training, ``load_state_dict``, ``.to()`` and adapters all act on
the same tensors stock code uses. What it adds: packing, varlen attention, Q/K/V and gate/up
projections as one matmul, fused LoRA, and the fused norm / activation / RoPE kernels.

Options are read from the model's fastst state at each call (gradient checkpointing, attention
backend, kernels), so the trainer can switch checkpointing on after ``enable_fast``. Checkpointing
wraps each layer ("layer", "selective") or each attention / MLP half-layer ("offload", the block
inputs in host memory); what each mode stores is described in :mod:`fastst_plugin.checkpointing`.
"""

from __future__ import annotations

import inspect
import math
import weakref
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import checkpointing, ops
from ..kernels._backend import on_device
from ..kernels.varlen_attention import shared_block_maps
from ..attention import varlen_attention
from ..linear import FusedProjection, apply_linear, saves_its_input
from ..log import warn_once
from . import base_model_of
from .spec import POST_NORM, PRE_NORM, SANDWICH_NORM, BackboneSpec, layer_types


def resolve(root: nn.Module, path: str | None):
    if path is None:
        return None
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


_GLU = {"geglu": "gelu", "geglu_tanh": "gelu_tanh", "swiglu": "silu"}


def _as_in_forward(fn, device_type: str, dtype):
    """``fn()`` under the autocast state the forward ran it in (``dtype``: autocast's, or None when
    off), cast to that dtype as the forward did: the recomputed activation is the stored one bitwise."""
    with torch.autocast(device_type, dtype=dtype or torch.get_autocast_dtype(device_type), enabled=dtype is not None):
        out = fn()
    return out if dtype is None or out.dtype == dtype else out.to(dtype)


def _pair_as_in_forward(fn, device_type: str, dtype):
    """``_as_in_forward`` for a function returning two tensors (RoPE's q and k)."""
    with torch.autocast(device_type, dtype=dtype or torch.get_autocast_dtype(device_type), enabled=dtype is not None):
        a, b = fn()
    return (a, b) if dtype is None else (a.to(dtype), b.to(dtype))


def _cast(fn, dtype):
    return fn().to(dtype)


def _apply_projection(proj, x, training):
    return proj(x, training) if isinstance(proj, FusedProjection) else apply_linear(x, proj, training)


def _projection_modules(proj) -> list:
    return list(proj.modules) if isinstance(proj, FusedProjection) else [proj]


class _Layer:
    """One transformer layer's modules, resolved once."""

    def __init__(self, module: nn.Module, spec: BackboneSpec, idx: int, enc: "PackedEncoder"):
        ls = spec.layer
        self.ls = ls
        self.idx = idx
        r = partial(resolve, module)
        self.qkv = r(ls.qkv) if ls.qkv else FusedProjection([r(ls.q), r(ls.k), r(ls.v)])
        self.o = r(ls.o)
        self.q_norm, self.k_norm = r(ls.q_norm), r(ls.k_norm)
        self.attn_norm, self.post_attn_norm = r(ls.attn_norm), r(ls.post_attn_norm)
        self.mlp_norm, self.post_mlp_norm = r(ls.mlp_norm), r(ls.post_mlp_norm)
        if ls.mlp_in:
            self.mlp_in = r(ls.mlp_in)
        else:
            self.mlp_in = FusedProjection([r(ls.mlp_gate), r(ls.mlp_up)])
        self.mlp_out = r(ls.mlp_out)
        config = enc.config
        self.window = spec.window(config, idx)
        self.layer_type = layer_types(config)[idx]


class PackedEncoder:
    def __init__(self, hf_model: nn.Module, spec: BackboneSpec, state):
        self.hf_model = hf_model
        self.base = base_model_of(hf_model)
        self.spec = spec
        self.state = state
        self.config = config = self.base.config
        b = partial(resolve, self.base)
        self.word_embeddings = b(spec.word_embeddings)
        self.position_embeddings = b(spec.position_embeddings)
        self.token_type_embeddings = b(spec.token_type_embeddings)
        self.embedding_norm = b(spec.embedding_norm)
        self.final_norm = b(spec.final_norm)
        self.rotary = b(spec.rotary)
        self._rotary_takes_layer_type = (
            self.rotary is not None and "layer_type" in inspect.signature(self.rotary.forward).parameters
        )
        self.layers = [_Layer(m, spec, i, self) for i, m in enumerate(b(spec.layers))]
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = spec.head_dim(config) if spec.head_dim else config.hidden_size // self.num_heads
        self.scale = spec.attention_scale(config) if spec.attention_scale else self.head_dim**-0.5
        self.causal = bool(spec.causal(config))
        self.position_offset = spec.position_offset(config) if spec.position_offset else 0
        self.embedding_scale = spec.embedding_scale(config) if spec.embedding_scale else None
        self.hidden_dropout = float(spec.hidden_dropout(config) or 0.0)
        self.attention_dropout = float(spec.attention_dropout(config) or 0.0)
        self.embedding_dropout = float(spec.embedding_dropout(config) or 0.0) if spec.embedding_dropout else 0.0
        self.graphed = None  # GraphedEncoder, created on the first CUDA call
        self._lora_dropout, self._lora_dropout_seen = False, -1
        self._recompute_activation = False  # set by _forward_eager while its unchecked layers run
        self._recompute_rope = False  # likewise
        # id(norm output) -> (weakref to it, how to recompute it); a dict only while unchecked layers
        # run with the norm recompute on (default; FASTST_RECOMPUTE_NORM=0 off; see _norm / _project)
        self._recomputable: dict | None = None
        self.max_seq_length = None  # set by fast_modules from the ST Transformer module

    def used_modules(self) -> list[nn.Module]:
        """The base model's modules that the packed forward reads, each with its children (LoRA
        adapters included): a parameter of the base model outside all of them (a BERT pooler) never
        gets a gradient from the fast path."""
        spec, ls = self.spec, self.spec.layer
        b = partial(resolve, self.base)
        top = (spec.word_embeddings, spec.position_embeddings, spec.token_type_embeddings, spec.embedding_norm,
               spec.final_norm, spec.rotary)
        per_layer = (ls.qkv, ls.q, ls.k, ls.v, ls.o, ls.q_norm, ls.k_norm, ls.attn_norm, ls.post_attn_norm,
                     ls.mlp_norm, ls.post_mlp_norm, ls.mlp_in, ls.mlp_gate, ls.mlp_up, ls.mlp_out)
        found = [b(path) for path in top if path]
        for layer in b(spec.layers):
            found += [resolve(layer, path) for path in per_layer if path]
        return [m for m in found if m is not None]

    # -- options, read per call -------------------------------------------------------------
    @property
    def kernels(self) -> bool:
        return self.state.options.kernels == "triton"

    @property
    def attention_backend(self) -> str:
        return self.state.options.attention

    # -- pieces -----------------------------------------------------------------------------
    def _norm(self, x, mod, residual=None, return_residual=False):
        kind, offset = self.spec.layer.norm, self.spec.layer.norm_offset
        register = self._recomputable is not None and mod is not None and not isinstance(mod, nn.Identity)
        # To recompute the output, the pre-norm sum: the norm kernel materialises (and saves) it anyway.
        want_sum = return_residual or (register and residual is not None)
        out = ops.apply_norm(x, mod, kind, offset, residual, want_sum, self.kernels)
        if not register:
            return out
        y, h = out if want_sum else (out, x)
        # A plain norm of the (rounded) sum is the fused residual + norm's output bit for bit.
        redo = partial(_as_in_forward, partial(ops.apply_norm, h, mod, kind, offset, None, False, self.kernels),
                       y.device.type, ops.autocast_dtype(y.device.type))
        self._recomputable[id(y)] = (weakref.ref(y), redo)
        return (y, h) if return_residual else y

    def _project(self, x, project, modules):
        """``project(x)`` for a projection that saves ``x``; when ``x`` is a registered norm output
        (unless FASTST_RECOMPUTE_NORM=0) it is recomputed in backward instead of stored."""
        entry = self._recomputable.get(id(x)) if self._recomputable is not None else None
        if entry is None or entry[0]() is not x or not all(saves_its_input(m) for m in modules):
            return project(x)
        redo = entry[1]
        dt = ops.autocast_dtype(x.device.type)
        if dt is not None and x.dtype != dt:  # the cast the projection would make, made here (see mlp)
            x, redo = x.to(dt), partial(_cast, redo, dt)
        with checkpointing.recomputed_when_saved(x, redo):
            return project(x)

    def embed(self, p) -> torch.Tensor:
        training = self.base.training
        h = self.word_embeddings(p.input_ids)
        if self.embedding_scale is not None:
            h = h * torch.tensor(self.embedding_scale, dtype=h.dtype)
        extra = None
        if self.position_embeddings is not None:
            extra = self.position_embeddings(p.position_ids + self.position_offset)
        if self.token_type_embeddings is not None:
            tt = p.token_type_ids if p.token_type_ids is not None else torch.zeros_like(p.input_ids)
            tte = self.token_type_embeddings(tt)
            extra = tte if extra is None else extra + tte
        if self.embedding_norm is not None:
            h = self._norm(h, self.embedding_norm, residual=extra)
        elif extra is not None:
            h = h + extra
        return ops.dropout(h, self.embedding_dropout, training)

    def rope_tables(self, p, like: torch.Tensor):
        """cos/sin ``[max_seqlen, D]`` per layer type, from the model's own rotary module."""
        if self.rotary is None:
            return {}
        positions = torch.arange(max(p.max_seqlen, 1), device=like.device)[None]
        tables = {}
        for layer in self.layers:
            key = layer.layer_type
            if key in tables:
                continue
            args = (like, positions, key) if self._rotary_takes_layer_type else (like, positions)
            cos, sin = self.rotary(*args)
            tables[key] = (cos[0], sin[0])
        return tables

    def attention(self, layer: _Layer, x, p, tables, training):
        t = x.shape[0]
        hq, hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self._project(x, partial(_apply_projection, layer.qkv, training=training), _projection_modules(layer.qkv))
        q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
        q, k, v = q.view(t, hq, d), k.view(t, hk, d), v.view(t, hk, d)
        rope = None
        if layer.ls.rope:
            cos, sin = tables[layer.layer_type]
            if layer.q_norm is not None:
                rope = partial(
                    ops.qk_norm_rope, q, k, layer.q_norm.weight, layer.k_norm.weight, ops.norm_eps(layer.q_norm),
                    self.spec.layer.norm_offset, cos, sin, p.position_ids, kernels=self.kernels,
                )
            else:
                rope = partial(ops.apply_rope, q, k, cos, sin, p.position_ids, kernels=self.kernels)
            q, k = rope()
        elif layer.q_norm is not None:
            q = self._norm(q, layer.q_norm)
            k = self._norm(k, layer.k_norm)
        dt = ops.autocast_dtype(x.device.type)
        if dt is not None:
            # Flash kernels take fp16/bf16 only; q/k norms under autocast hand back fp32.
            q, k, v = q.to(dt), k.to(dt), v.to(dt)
        # The attention saves the rotated q and k; the RoPE kernel's inputs (views of the projection's
        # output, which v keeps alive) give them back in the backward instead.
        redo = partial(_pair_as_in_forward, rope, x.device.type, dt) if rope is not None and self._recompute_rope else None
        o = varlen_attention(
            q, k, v, p.cu_seqlens, p.max_seqlen,
            causal=self.causal, window=layer.window, scale=self.scale,
            dropout_p=self.attention_dropout if training else 0.0, backend=self.attention_backend, seq_info=p,
            qk_recompute=redo,
        )
        return apply_linear(o.reshape(t, hq * d), layer.o, training)

    def mlp(self, layer: _Layer, x, training):
        act = layer.ls.activation
        if act in ("gelu", "gelu_tanh"):
            mod, approx = layer.mlp_in, "tanh" if act == "gelu_tanh" else "none"
            if type(mod) is nn.Linear:
                # bias folded into the activation kernel
                z, bias = self._project(x, partial(torch.nn.functional.linear, weight=mod.weight), [mod]), mod.bias
            else:
                z, bias = self._project(x, partial(apply_linear, mod=mod, training=training), [mod]), None
            activation = partial(ops.bias_gelu, z, bias, approx, kernels=self.kernels)
        else:
            z = self._project(x, partial(_apply_projection, layer.mlp_in, training=training), _projection_modules(layer.mlp_in))
            activation = partial(ops.gated_activation, z, _GLU[act], kernels=self.kernels)
        y = activation()
        if not (self._recompute_activation and saves_its_input(layer.mlp_out)):
            return apply_linear(y, layer.mlp_out, training)
        # The down projection saves its input; the activation kernel saved ``z`` already, so the
        # output is recomputed from it in the backward instead of being stored from forward to
        # backward (checkpointing.recomputed_when_saved). Under autocast the cast the projection
        # would make is made here, so that the saved tensor is the one recomputed.
        dt = ops.autocast_dtype(y.device.type)
        if dt is not None and y.dtype != dt:
            y = y.to(dt)
        with checkpointing.recomputed_when_saved(y, partial(_as_in_forward, activation, y.device.type, dt)):
            return apply_linear(y, layer.mlp_out, training)

    def layer_forward(self, layer: _Layer, h, p, tables):
        training = self.base.training
        pd = self.hidden_dropout
        wiring = layer.ls.wiring
        if wiring == POST_NORM:
            a = ops.dropout(self.attention(layer, h, p, tables, training), pd, training)
            h = self._norm(a, layer.post_attn_norm, residual=h)
            m = ops.dropout(self.mlp(layer, h, training), pd, training)
            return self._norm(m, layer.post_mlp_norm, residual=h)
        x = self._norm(h, layer.attn_norm)
        a = self.attention(layer, x, p, tables, training)
        if wiring == SANDWICH_NORM:
            a = self._norm(a, layer.post_attn_norm)
        a = ops.dropout(a, pd, training)
        x, h = self._norm(a, layer.mlp_norm, residual=h, return_residual=True)
        m = self.mlp(layer, x, training)
        if wiring == SANDWICH_NORM:
            m = self._norm(m, layer.post_mlp_norm)
        m = ops.dropout(m, pd, training)
        return h + m.to(h.dtype)

    # The same layer as two halves, each mapping one hidden-state tensor to the next (the unit the
    # "offload" checkpointing mode stores and recomputes). Forward values equal ``layer_forward``'s
    # bit for bit: the fused residual + norm kernel normalises the *rounded* sum, which is what the
    # split ``h + a`` followed by a plain norm computes. Gradients may differ in the last bit of
    # bf16 (the residual gradient is summed from two rounded terms instead of once, in fp32).
    def attention_block(self, layer: _Layer, h, p, tables):
        training = self.base.training
        pd = self.hidden_dropout
        if layer.ls.wiring == POST_NORM:
            a = ops.dropout(self.attention(layer, h, p, tables, training), pd, training)
            return self._norm(a, layer.post_attn_norm, residual=h)
        # h comes back from the norm (as itself) so that its two gradients (norm, residual) are
        # summed in fp32 inside the norm's backward, as in the fused residual + norm of
        # layer_forward, not in bf16 by autograd. In bf16, offload's gradients still differ from
        # "off" by ~1e-2 on EmbeddingGemma (5x the run-to-run noise; the rounding points differ),
        # but both are equally far from an fp32 run (H200: 0.0440 vs 0.0442, see
        # tests/gpu/memory_checks.py yardstick).
        x, h = self._norm(h, layer.attn_norm, return_residual=True)
        a = self.attention(layer, x, p, tables, training)
        if layer.ls.wiring == SANDWICH_NORM:
            a = self._norm(a, layer.post_attn_norm)
        a = ops.dropout(a, pd, training)
        return h + a.to(h.dtype)

    def mlp_block(self, layer: _Layer, h):
        training = self.base.training
        pd = self.hidden_dropout
        if layer.ls.wiring == POST_NORM:
            m = ops.dropout(self.mlp(layer, h, training), pd, training)
            return self._norm(m, layer.post_mlp_norm, residual=h)
        x, h = self._norm(h, layer.mlp_norm, return_residual=True)  # see attention_block
        m = self.mlp(layer, x, training)
        if layer.ls.wiring == SANDWICH_NORM:
            m = self._norm(m, layer.post_mlp_norm)
        m = ops.dropout(m, pd, training)
        return h + m.to(h.dtype)

    # -- whole forward ------------------------------------------------------------------------
    @property
    def pad_token_id(self) -> int:
        return int(getattr(self.config, "pad_token_id", None) or 0)

    @property
    def uses_token_types(self) -> bool:
        return self.token_type_embeddings is not None

    def run_host(self, hp, device):
        """Hidden states for a host pack: replayed from a CUDA graph when possible, else eagerly.
        Returns ``(hidden [T, H], PackedBatch on device)``."""
        p = hp.to_device(device)
        if self.state.options.cuda_graphs and device.type == "cuda":
            with on_device(device):
                out = self.ensure_graphed().run(hp, device)
            if out is not None:
                return out, p
        return self.forward_eager(p), p

    def ensure_graphed(self):
        """The encoder's :class:`~fastst_plugin.graphs.GraphedEncoder` (made on first use)."""
        if self.graphed is None:
            from ..graphs import GraphedEncoder

            self.graphed = GraphedEncoder(self, self.max_positions())
        return self.graphed

    def max_positions(self) -> int:
        """The longest text the graphs are captured for: the model's ``max_seq_length`` when known."""
        return int(self.max_seq_length or getattr(self.config, "max_position_embeddings", 512))

    def __call__(self, p) -> torch.Tensor:
        return self.forward_eager(p)

    def checkpoint_mode(self) -> str:
        """The checkpointing mode this call uses: the option, in training with gradients enabled,
        unless :func:`fastst_plugin.checkpointing.suspended` is active (cached losses' replay)."""
        mode = self.state.options.gradient_checkpointing
        if mode == "off" or not self.base.training or not torch.is_grad_enabled() or checkpointing.is_suspended():
            return "off"
        if torch._C._current_graph_task_id() != -1:
            # A forward run inside a backward pass: a GradCache loss re-embedding one mini-batch
            # whose backward follows at once. Only that mini-batch's activations ever exist, so
            # checkpointing would only compute it a third time.
            warn_once(
                f"gradient_checkpointing={mode!r} is skipped for forwards run inside a backward pass (a cached "
                "loss's replay): each mini-batch's activations are freed by its own backward already"
            )
            return "off"
        return mode

    def draws_random_numbers(self) -> bool:
        """Whether a training forward draws from the RNG (a dropout with p > 0 in the config or in a
        LoRA adapter). Without it, checkpointing needs no RNG snapshot (which reads the CUDA
        generator's state: not allowed inside a CUDA graph capture) and the recompute is exact anyway."""
        if not self.base.training:
            return False
        if self.hidden_dropout > 0 or self.attention_dropout > 0 or self.embedding_dropout > 0:
            return True
        from ..graphs import registrations

        seen = registrations()
        if self._lora_dropout_seen != seen:  # adapters added or replaced since the last look
            self._lora_dropout = any(
                isinstance(d, nn.Dropout) and d.p > 0
                for m in self.base.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()
            )
            self._lora_dropout_seen = seen
        return self._lora_dropout

    def forward_eager(self, p) -> torch.Tensor:
        # Every layer attends over the same boundaries: the attention's block maps are built once.
        with on_device(p.input_ids.device), shared_block_maps():
            return self._forward_eager(p)

    def _forward_eager(self, p) -> torch.Tensor:
        if not self.spec.half_precision_ok and ops.autocast_dtype(p.input_ids.device.type) == torch.float16:
            raise ValueError(
                f"{self.spec.family} overflows float16 (stock gives NaN): train with bf16=True or in fp32, not fp16=True"
            )
        h = self.embed(p)
        tables = self.rope_tables(p, h)
        mode = self.checkpoint_mode()
        if mode == "off":
            # Only here: under a checkpointing mode the checkpoint's own saved-tensor hooks decide.
            self._recompute_activation = checkpointing.recompute_activation_enabled()
            self._recompute_rope = checkpointing.recompute_rope_enabled()
            self._recomputable = {} if checkpointing.recompute_norm_enabled() else None
            try:
                for layer in self.layers:
                    h = self.layer_forward(layer, h, p, tables)
            finally:
                self._recompute_activation, self._recompute_rope, self._recomputable = False, False, None
        elif mode == "offload":
            offloader = checkpointing.ActivationOffloader(h.device)
            for layer in self.layers:
                h = self._offloaded(partial(self.attention_block, layer, p=p, tables=tables), h, p, offloader)
                h = self._offloaded(partial(self.mlp_block, layer), h, p, offloader)
        else:
            rng = self.draws_random_numbers()
            for layer in self.layers:
                h = self._checkpointed(layer, h, p, tables, mode, rng)
        if self.final_norm is not None:
            h = self._norm(h, self.final_norm)
        return h

    def _checkpointed(self, layer, h, p, tables, mode, rng):
        """One layer under non-reentrant checkpointing: ``h`` is all that is stored ("layer"), or
        the selective policy's tensors too ("selective", see :mod:`fastst_plugin.checkpointing`)."""
        fn = partial(self.layer_forward, layer, p=p, tables=tables)
        # ``rng``: whether the forward draws random numbers (no RNG snapshot needed otherwise).
        if mode == "selective":
            # A stored attention kernel is not re-run, so it must not be one that draws random numbers.
            save_attention = not (self.base.training and self.attention_dropout > 0)
            return checkpoint(fn, h, use_reentrant=False, preserve_rng_state=rng,
                              context_fn=checkpointing.selective_context_fn(save_attention))
        return checkpoint(fn, h, use_reentrant=False, preserve_rng_state=rng)

    @staticmethod
    def _offloaded(unit, h, p, offloader):
        """One half-layer ``unit`` checkpointed with its input ``h`` offloaded to host memory.

        ``h`` reaches the unit through the offloader, not as a tensor argument, so the checkpoint
        stores nothing on the device. ``p.cu_seqlens`` is passed along only to tell the checkpoint
        which device's RNG state to save and restore for the recompute (dropout)."""
        stored = offloader.save(h)
        return checkpoint(_run_stored, unit, stored, p.cu_seqlens, use_reentrant=False)


def _run_stored(unit, stored, _device_anchor):
    return unit(stored.get())
