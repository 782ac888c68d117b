"""qk_norm_rope: Triton kernel (interpreter on CPU) vs torch reference, reference vs HF Qwen3/Gemma3 code."""

import pytest
import torch

from fastst_plugin.kernels import qk_norm_rope as qnr_mod
from fastst_plugin.kernels._backend import next_power_of_2, use_triton
from fastst_plugin.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference
from fastst_plugin.kernels.rope import apply_rope_reference

needs_triton = pytest.mark.skipif(
    not use_triton(torch.empty(0)), reason="Triton path needs CUDA or TRITON_INTERPRET=1"
)

LENGTHS = [3, 5, 1]


def packed_positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths])


def rope_tables(d, max_pos, theta=10000.0, half=False):
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq
    if not half:
        freqs = torch.cat((freqs, freqs), dim=-1)
    return freqs.cos(), freqs.sin()


def fused_qk(t, hq, hk, d, dtype=torch.float32, scale=2.0):
    qkv = torch.randn(t, (hq + 2 * hk) * d, dtype=torch.float32).mul(scale).to(dtype)
    return qkv[:, : hq * d].view(t, hq, d), qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)


def _fwd_bwd(fn, q, k, qw, kw, offset, cos, sin, pos, gq, gk, w_grad=True):
    q = q.detach().requires_grad_(True)
    k = k.detach().requires_grad_(True)
    qw = qw.detach().clone().requires_grad_(w_grad)
    kw = kw.detach().clone().requires_grad_(w_grad)
    qo, ko = fn(q, k, qw, kw, 1e-6, offset, cos, sin, pos)
    inputs = (q, k, qw, kw) if w_grad else (q, k)
    grads = torch.autograd.grad((qo, ko), inputs, (gq, gk))
    return (qo.detach(), ko.detach()) + tuple(grads)


@needs_triton
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize(
    "d,table,small_blocks",
    [(8, "full", False), (10, "half", False), (16, "per_token", False), (10, "full", True), (16, "half", True)],
)
def test_fp32_matches_reference(d, offset, table, small_blocks, monkeypatch):
    if small_blocks:  # several token blocks, a loop over head blocks, several dw partials
        monkeypatch.setattr(qnr_mod, "_blocks", lambda hq, hk, dd, backward: (2, 2, 1, next_power_of_2(dd // 2), 4))
    torch.manual_seed(0)
    pos = packed_positions(LENGTHS)
    t, hq, hk = pos.numel(), 3, 2
    q, k = fused_qk(t, hq, hk, d)
    qw, kw = torch.randn(d) * 0.5 + (1 - offset), torch.randn(d) * 0.5 + (1 - offset)
    cos, sin = rope_tables(d, 12, half=table == "half")
    if table == "per_token":
        cos, sin, pos = cos[pos], sin[pos], None
    gq, gk = torch.randn(t, hq, d), torch.randn(t, hk, d)
    out = _fwd_bwd(qk_norm_rope, q, k, qw, kw, offset, cos, sin, pos, gq, gk)
    ref = _fwd_bwd(qk_norm_rope_reference, q, k, qw, kw, offset, cos, sin, pos, gq, gk)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_triton
def test_uses_triton_function_and_frozen_weights():
    torch.manual_seed(1)
    pos = packed_positions(LENGTHS)
    t, d = pos.numel(), 16
    q, k = fused_qk(t, 4, 2, d)
    qw, kw = torch.randn(d), torch.randn(d)
    cos, sin = rope_tables(d, 8)
    gq, gk = torch.randn(t, 4, d), torch.randn(t, 2, d)
    out = _fwd_bwd(qk_norm_rope, q, k, qw, kw, 0.0, cos, sin, pos, gq, gk, w_grad=False)
    ref = _fwd_bwd(qk_norm_rope_reference, q, k, qw, kw, 0.0, cos, sin, pos, gq, gk, w_grad=False)
    assert len(out) == 4
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    qo, _ = qk_norm_rope(q.requires_grad_(True), k, qw, kw, 1e-6, 0.0, cos, sin, pos)
    assert "QKNormRope" in type(qo.grad_fn).__name__


@needs_triton
@pytest.mark.parametrize("which", ["q", "k"])
def test_only_one_weight_trainable(which):
    torch.manual_seed(5)
    pos = packed_positions(LENGTHS)
    t, d = pos.numel(), 8
    q, k = fused_qk(t, 2, 1, d)
    cos, sin = rope_tables(d, 8)
    gq, gk = torch.randn(t, 2, d), torch.randn(t, 1, d)
    res = []
    for fn in (qk_norm_rope, qk_norm_rope_reference):
        qq, kk = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
        qw = torch.linspace(0.5, 1.5, d).requires_grad_(which == "q")
        kw = torch.linspace(1.5, 0.5, d).requires_grad_(which == "k")
        w = qw if which == "q" else kw
        qo, ko = fn(qq, kk, qw, kw, 1e-6, 1.0, cos, sin, pos)
        res.append(torch.autograd.grad((qo, ko), (qq, kk, w), (gq, gk)))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_fp16(offset):
    torch.manual_seed(2)
    pos = packed_positions(LENGTHS)
    t, d = pos.numel(), 16
    q, k = fused_qk(t, 3, 1, d, dtype=torch.float16)
    qw, kw = (torch.randn(d) * 0.3 + 1 - offset).half(), (torch.randn(d) * 0.3 + 1 - offset).half()
    cos, sin = rope_tables(d, 8)
    gq, gk = torch.randn(t, 3, d).half(), torch.randn(t, 1, d).half()
    out = _fwd_bwd(qk_norm_rope, q, k, qw, kw, offset, cos, sin, pos, gq, gk)
    assert all(o.dtype == torch.float16 for o in out)
    ref = _fwd_bwd(qk_norm_rope_reference, q.float(), k.float(), qw.float(), kw.float(), offset, cos, sin, pos,
                   gq.float(), gk.float())
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.float(), b, atol=1e-2, rtol=1e-2)


@needs_triton
def test_empty():
    q, k = torch.randn(0, 2, 8, requires_grad=True), torch.randn(0, 1, 8)
    w = torch.ones(8, requires_grad=True)
    cos, sin = rope_tables(8, 4)
    qo, ko = qk_norm_rope(q, k, w, w, 1e-6, 0.0, cos, sin, torch.zeros(0, dtype=torch.long))
    assert qo.shape == (0, 2, 8)
    (qo.sum() + ko.sum()).backward()
    assert w.grad.shape == (8,) and w.grad.abs().max() == 0


def _pad(x_packed, lengths):
    b, l = len(lengths), max(lengths)
    out = torch.zeros(b, x_packed.shape[1], l, x_packed.shape[2], dtype=x_packed.dtype)
    s = 0
    for i, n in enumerate(lengths):
        out[i, :, :n] = x_packed[s : s + n].transpose(0, 1)
        s += n
    return out


def _unpad(x_pad, lengths):
    return torch.cat([x_pad[i, :, :n].transpose(0, 1) for i, n in enumerate(lengths)])


def test_reference_is_norm_then_rope():
    torch.manual_seed(3)
    pos = packed_positions(LENGTHS)
    t, d = pos.numel(), 8
    q, k = torch.randn(t, 2, d), torch.randn(t, 1, d)
    qw, kw = torch.randn(d), torch.randn(d)
    cos, sin = rope_tables(d, 8)

    def rms(x, w, off):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (off + w)

    for off in (0.0, 1.0):
        qe, ke = apply_rope_reference(rms(q, qw, off), rms(k, kw, off), cos, sin, pos)
        qo, ko = qk_norm_rope_reference(q, k, qw, kw, 1e-6, off, cos, sin, pos)
        torch.testing.assert_close(qo, qe)
        torch.testing.assert_close(ko, ke)


@pytest.mark.parametrize("model", ["qwen3", "gemma3"])
def test_matches_transformers_norm_and_rope(model):
    """HF attention: q = q_norm(q.view(B, L, H, D)).transpose(1, 2); apply_rotary_pos_emb on padded batch."""
    qwen3 = pytest.importorskip("transformers.models.qwen3.modeling_qwen3")
    gemma3 = pytest.importorskip("transformers.models.gemma3.modeling_gemma3")
    torch.manual_seed(4)
    d, eps = 16, 1e-6
    if model == "qwen3":
        qn, kn, offset = qwen3.Qwen3RMSNorm(d, eps), qwen3.Qwen3RMSNorm(d, eps), 0.0
    else:
        qn, kn, offset = gemma3.Gemma3RMSNorm(d, eps), gemma3.Gemma3RMSNorm(d, eps), 1.0
    with torch.no_grad():
        qn.weight.normal_(0.3, 0.5)
        kn.weight.normal_(0.3, 0.5)
    pos = packed_positions(LENGTHS)
    q, k = torch.randn(pos.numel(), 3, d) * 2, torch.randn(pos.numel(), 1, d) * 2
    pos_pad = torch.arange(max(LENGTHS))[None].expand(len(LENGTHS), -1)
    cos_tab, sin_tab = rope_tables(d, 16, theta=1000.0)
    c, s = cos_tab[pos_pad], sin_tab[pos_pad]  # [B, L, D], what the HF rotary module returns
    qp = qn(_pad(q, LENGTHS).transpose(1, 2)).transpose(1, 2)
    kp = kn(_pad(k, LENGTHS).transpose(1, 2)).transpose(1, 2)
    qe, ke = qwen3.apply_rotary_pos_emb(qp, kp, c, s)
    qe, ke = _unpad(qe, LENGTHS).detach(), _unpad(ke, LENGTHS).detach()
    for fn in (qk_norm_rope_reference, qk_norm_rope):
        qo, ko = fn(q, k, qn.weight, kn.weight, eps, offset, cos_tab, sin_tab, pos)
        torch.testing.assert_close(qo.detach(), qe, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ko.detach(), ke, atol=1e-5, rtol=1e-5)


def test_cpu_fallback_without_triton(monkeypatch):
    monkeypatch.setattr(qnr_mod, "use_triton", lambda t: False)
    q, k = torch.randn(4, 2, 8, requires_grad=True), torch.randn(4, 1, 8)
    w = torch.ones(8)
    cos, sin = rope_tables(8, 4)
    qo, _ = qk_norm_rope(q, k, w, w, 1e-6, 0.0, cos, sin, torch.arange(4))
    assert "QKNormRope" not in type(qo.grad_fn).__name__


def test_bad_weights():
    q, k = torch.randn(4, 2, 8), torch.randn(4, 1, 8)
    cos, sin = rope_tables(8, 4)
    with pytest.raises(ValueError):
        qk_norm_rope(q, k, torch.ones(7), torch.ones(8), 1e-6, 0.0, cos, sin, torch.arange(4))
