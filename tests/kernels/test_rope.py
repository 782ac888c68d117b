"""apply_rope: Triton kernel (interpreter on CPU) vs torch reference, reference vs HF rotary code."""

import pytest
import torch

from fastst_plugin.kernels import rope as rope_mod
from fastst_plugin.kernels._backend import next_power_of_2, use_triton
from fastst_plugin.kernels.rope import apply_rope, apply_rope_reference

needs_triton = pytest.mark.skipif(
    not use_triton(torch.empty(0)), reason="Triton path needs CUDA or TRITON_INTERPRET=1"
)

LENGTHS = [3, 5, 1]  # packed sequences; positions restart per sequence


def packed_positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths])


def rope_tables(d, max_pos, theta=10000.0, half=False):
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq
    if not half:
        freqs = torch.cat((freqs, freqs), dim=-1)
    return freqs.cos(), freqs.sin()


def fused_qkv(t, hq, hk, d, dtype=torch.float32):
    """q, k as strided views of one [T, (Hq + 2 Hk) * D] projection output (like a fused QKV)."""
    qkv = torch.randn(t, (hq + 2 * hk) * d, dtype=dtype)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    return qkv, q, k


def _fwd_bwd(fn, q, k, cos, sin, pos, gq, gk):
    q = q.detach().clone().requires_grad_(True) if q.is_contiguous() else q.detach().requires_grad_(True)
    k = k.detach().requires_grad_(True)
    qo, ko = fn(q, k, cos, sin, pos)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (gq, gk))
    return qo.detach(), ko.detach(), dq, dk


@needs_triton
@pytest.mark.parametrize(
    "d,table,small_blocks",
    [(8, "full", False), (10, "half", False), (16, "per_token", False), (10, "full", True),
     (16, "half", True), (8, "per_token", True)],
)
def test_fp32_matches_reference(d, table, small_blocks, monkeypatch):
    if small_blocks:  # several token blocks and a loop over head blocks
        monkeypatch.setattr(rope_mod, "_rope_blocks", lambda hq, hk, dd: (2, 2, 1, next_power_of_2(dd // 2), 4))
    torch.manual_seed(0)
    pos = packed_positions(LENGTHS)
    t, hq, hk = pos.numel(), 3, 2
    _, q, k = fused_qkv(t, hq, hk, d)
    cos, sin = rope_tables(d, 12, half=table == "half")
    if table == "per_token":
        cos, sin, pos = cos[pos], sin[pos], None
    gq, gk = torch.randn(t, hq, d), torch.randn(t, hk, d)
    out = _fwd_bwd(apply_rope, q, k, cos, sin, pos, gq, gk)
    ref = _fwd_bwd(apply_rope_reference, q, k, cos, sin, pos, gq, gk)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_triton
def test_arbitrary_tables_and_int32_positions():
    """Both halves of a [max_pos, D] table are read (not assumed duplicated)."""
    torch.manual_seed(1)
    t, d = 6, 8
    q, k = torch.randn(t, 2, d), torch.randn(t, 1, d)
    cos, sin = torch.randn(9, d), torch.randn(9, d)
    pos = torch.tensor([0, 8, 3, 3, 1, 0], dtype=torch.int32)
    gq, gk = torch.randn(t, 2, d), torch.randn(t, 1, d)
    out = _fwd_bwd(apply_rope, q, k, cos, sin, pos, gq, gk)
    ref = _fwd_bwd(apply_rope_reference, q, k, cos, sin, pos, gq, gk)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_triton
def test_fp16_and_fused_qkv_grad():
    torch.manual_seed(2)
    pos = packed_positions(LENGTHS)
    t, hq, hk, d = pos.numel(), 4, 2, 16
    qkv, _, _ = fused_qkv(t, hq, hk, d, dtype=torch.float16)
    cos, sin = rope_tables(d, 16)
    grads = []
    for fn in (apply_rope, apply_rope_reference):
        x = qkv.detach().clone().requires_grad_(True)
        q = x[:, : hq * d].view(t, hq, d)
        k = x[:, hq * d : (hq + hk) * d].view(t, hk, d)
        qo, ko = fn(q, k, cos, sin, pos)
        assert qo.dtype == ko.dtype == torch.float16 and qo.is_contiguous()
        (qo.float().sum() * 0.5 + (ko.float() ** 2).sum() * 0.1).backward()
        grads.append((qo.detach().float(), ko.detach().float(), x.grad.float()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)
    assert grads[0][2][:, (hq + hk) * d :].abs().max() == 0  # v part gets no grad


@needs_triton
def test_backward_is_rotation_by_minus_angle():
    torch.manual_seed(3)
    pos = packed_positions(LENGTHS)
    t, d = pos.numel(), 8
    cos, sin = rope_tables(d, 8)
    q = torch.randn(t, 2, d, requires_grad=True)
    k = torch.randn(t, 1, d, requires_grad=True)
    gq, gk = torch.randn(t, 2, d), torch.randn(t, 1, d)
    qo, ko = apply_rope(q, k, cos, sin, pos)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (gq, gk))
    eq, ek = apply_rope_reference(gq, gk, cos, -sin, pos)
    torch.testing.assert_close(dq, eq, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dk, ek, atol=1e-6, rtol=1e-5)


@needs_triton
def test_empty():
    q, k = torch.randn(0, 2, 8, requires_grad=True), torch.randn(0, 1, 8)
    cos, sin = rope_tables(8, 4)
    qo, ko = apply_rope(q, k, cos, sin, torch.zeros(0, dtype=torch.long))
    assert qo.shape == (0, 2, 8) and ko.shape == (0, 1, 8)


def _hf_rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _pad(x_packed, lengths):
    """[T, H, D] packed -> [B, H, L, D] right-padded."""
    b, l = len(lengths), max(lengths)
    out = torch.zeros(b, x_packed.shape[1], l, x_packed.shape[2], dtype=x_packed.dtype)
    s = 0
    for i, n in enumerate(lengths):
        out[i, :, :n] = x_packed[s : s + n].transpose(0, 1)
        s += n
    return out


def _unpad(x_pad, lengths):
    return torch.cat([x_pad[i, :, :n].transpose(0, 1) for i, n in enumerate(lengths)])


@pytest.mark.parametrize("half", [False, True])
def test_reference_matches_hf_style_padded(half):
    """Packed reference == HF formula on a padded [B, H, L, D] batch with per-sequence positions."""
    torch.manual_seed(4)
    d, theta = 16, 500.0
    pos = packed_positions(LENGTHS)
    q, k = torch.randn(pos.numel(), 3, d), torch.randn(pos.numel(), 1, d)
    qp, kp = _pad(q, LENGTHS), _pad(k, LENGTHS)
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))
    pos_pad = torch.arange(max(LENGTHS))[None].expand(len(LENGTHS), -1)
    freqs = pos_pad[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    c, s = emb.cos()[:, None], emb.sin()[:, None]  # [B, 1, L, D]
    qe = _unpad(qp * c + _hf_rotate_half(qp) * s, LENGTHS)
    ke = _unpad(kp * c + _hf_rotate_half(kp) * s, LENGTHS)
    cos, sin = rope_tables(d, 8, theta, half=half)
    qo, ko = apply_rope_reference(q, k, cos, sin, pos)
    torch.testing.assert_close(qo, qe, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ko, ke, atol=1e-6, rtol=1e-5)


def test_reference_and_kernel_match_transformers_qwen3():
    qwen3 = pytest.importorskip("transformers.models.qwen3.modeling_qwen3")
    from transformers import Qwen3Config

    torch.manual_seed(5)
    d = 16
    cfg = Qwen3Config(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, head_dim=d,
                      max_position_embeddings=32, rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    rot = qwen3.Qwen3RotaryEmbedding(cfg)
    pos = packed_positions(LENGTHS)
    q, k = torch.randn(pos.numel(), 3, d), torch.randn(pos.numel(), 1, d)
    qp, kp = _pad(q, LENGTHS), _pad(k, LENGTHS)
    pos_pad = torch.arange(max(LENGTHS))[None].expand(len(LENGTHS), -1)
    c, s = rot(qp, pos_pad)  # [B, L, D]
    qe, ke = qwen3.apply_rotary_pos_emb(qp, kp, c, s)
    qe, ke = _unpad(qe, LENGTHS), _unpad(ke, LENGTHS)
    cos_tab, sin_tab = rot(qp, torch.arange(32)[None])  # HF table [1, max_pos, D]
    for fn in (apply_rope_reference, apply_rope):
        qo, ko = fn(q, k, cos_tab[0], sin_tab[0], pos)
        torch.testing.assert_close(qo, qe, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ko, ke, atol=1e-5, rtol=1e-5)
    # HF's per-token output for a packed batch (position_ids [1, T]) works with position_ids=None
    c_tok, s_tok = rot(q, pos[None])
    qo, ko = apply_rope(q, k, c_tok[0], s_tok[0], None)
    torch.testing.assert_close(qo, qe, atol=1e-5, rtol=1e-5)


def test_cpu_fallback_without_triton(monkeypatch):
    monkeypatch.setattr(rope_mod, "use_triton", lambda t: False)
    q, k = torch.randn(4, 2, 8, requires_grad=True), torch.randn(4, 1, 8)
    cos, sin = rope_tables(8, 4)
    qo, _ = apply_rope(q, k, cos, sin, torch.arange(4))
    assert "Rope" not in type(qo.grad_fn).__name__


def test_bad_args():
    q, k = torch.randn(4, 2, 8), torch.randn(4, 1, 8)
    cos, sin = rope_tables(8, 4)
    with pytest.raises(ValueError):
        apply_rope(q, k, cos[:, :3], sin[:, :3], torch.arange(4))
    with pytest.raises(ValueError):
        apply_rope(q, k, cos, sin, torch.arange(3))
    with pytest.raises(ValueError):
        apply_rope(q, torch.randn(4, 1, 6), cos, sin, torch.arange(4))
