"""The fast forward's elementwise/normalization ops, each routed to its Triton kernel or its torch
reference (``kernels=False``: the model was enabled with ``kernels="torch"``, or a test wants the oracle)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import gelu as _gelu
from .kernels import glu as _glu
from .kernels import layernorm as _ln
from .kernels import qk_norm_rope as _qknr
from .kernels import rmsnorm as _rms
from .kernels import rope as _rope


def layer_norm(x, weight, bias, eps, residual=None, return_residual=False, kernels=True):
    fn = _ln.layer_norm if kernels else _ln.layer_norm_reference
    return fn(x, weight, bias, eps, residual=residual, return_residual=return_residual)


def rms_norm(x, weight, eps, offset=0.0, residual=None, return_residual=False, kernels=True):
    fn = _rms.rms_norm if kernels else _rms.rms_norm_reference
    return fn(x, weight, eps, offset=offset, residual=residual, return_residual=return_residual)


def bias_gelu(x, bias, approximate="none", kernels=True):
    fn = _gelu.bias_gelu if kernels else _gelu.bias_gelu_reference
    return fn(x, bias, approximate=approximate)


def gated_activation(x, activation, kernels=True):
    fn = _glu.gated_activation if kernels else _glu.gated_activation_reference
    return fn(x, activation)


def apply_rope(q, k, cos, sin, position_ids, kernels=True):
    fn = _rope.apply_rope if kernels else _rope.apply_rope_reference
    return fn(q, k, cos, sin, position_ids)


def qk_norm_rope(q, k, q_weight, k_weight, eps, offset, cos, sin, position_ids, kernels=True):
    fn = _qknr.qk_norm_rope if kernels else _qknr.qk_norm_rope_reference
    return fn(q, k, q_weight, k_weight, eps, offset, cos, sin, position_ids)


def norm_eps(mod: nn.Module) -> float:
    for name in ("eps", "variance_epsilon"):
        if hasattr(mod, name):
            return float(getattr(mod, name))
    raise AttributeError(f"cannot find the epsilon of {type(mod).__name__}")


def apply_norm(x, mod, kind, offset=0.0, residual=None, return_residual=False, kernels=True):
    """``norm(x + residual)`` with the module's own parameters; Identity/None passes through."""
    if residual is not None and residual.dtype != x.dtype:
        # Under autocast the residual stream stays fp32, as in stock (bf16 + fp32 promotes).
        x = x.to(residual.dtype)
    if mod is None or isinstance(mod, nn.Identity):
        h = x if residual is None else x + residual
        return (h, h) if return_residual else h
    if kind == "layernorm":
        return layer_norm(x, mod.weight, mod.bias, mod.eps, residual, return_residual, kernels)
    return rms_norm(x, mod.weight, norm_eps(mod), offset, residual, return_residual, kernels)


def dropout(x, p, training):
    return F.dropout(x, p, True) if training and p > 0 else x


def autocast_dtype(device_type: str):
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
