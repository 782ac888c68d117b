"""Varlen attention: Triton kernel (interpreter on CPU) vs the torch reference, forward and gradients.

The interpreter runs 16-token blocks (``_config``), so lengths 1..40 cover: one-block sequences (whole
backward in one program), sequences crossing block boundaries (separate dQ kernel), a zero-length
sequence, GQA, causal and sliding windows.
"""

import pytest
import torch

from fastst_plugin import attention as attn_mod
from fastst_plugin.kernels._backend import use_triton
from fastst_plugin.kernels.varlen_attention import (
    VarlenAttentionFn,
    supported,
    varlen_attention,
    varlen_attention_reference,
)

needs_triton = pytest.mark.skipif(
    not use_triton(torch.empty(0)), reason="Triton path needs CUDA or TRITON_INTERPRET=1"
)

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-2, rtol=2e-2)}


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _make(lengths, hq, hk, d, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    t = sum(lengths)
    q = torch.randn(t, hq, d, dtype=dtype)
    k = torch.randn(t, hk, d, dtype=dtype)
    v = torch.randn(t, hk, d, dtype=dtype)
    g = torch.randn(t, hq, d, dtype=dtype)
    return q, k, v, g


def _run(fn, q, k, v, g, **kw):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    o = fn(q, k, v, **kw)
    grads = torch.autograd.grad(o, (q, k, v), g)
    return o.detach(), grads


def _check(lengths, hq, hk, d, dtype=torch.float32, causal=False, window=None, blocks=None, max_seqlen=None):
    cu = _cu(lengths)
    q, k, v, g = _make(lengths, hq, hk, d, dtype)
    ms = max_seqlen if max_seqlen is not None else max(lengths)
    o, grads = _run(varlen_attention, q, k, v, g, cu_seqlens=cu, max_seqlen=ms, causal=causal, window=window,
                    blocks=blocks)
    # The oracle in fp32 (fp16 inputs: compare against fp32 math on the same rounded values).
    o_ref, grads_ref = _run(varlen_attention_reference, q.float(), k.float(), v.float(), g.float(), cu_seqlens=cu,
                            causal=causal, window=window)
    assert o.dtype == dtype and o.shape == q.shape
    torch.testing.assert_close(o.float(), o_ref, **TOL[dtype], msg=lambda m: f"out: {m}")
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert a.dtype == dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")


@needs_triton
@pytest.mark.parametrize(
    "lengths,hq,hk,d,causal,window",
    [
        ([1, 5, 16, 17, 40], 2, 2, 32, False, None),  # MHA, bidirectional (BERT/MiniLM)
        ([3, 33, 1, 20], 4, 2, 32, True, None),  # GQA, causal (Qwen3)
        ([40, 7, 2], 2, 2, 32, False, (4, 4)),  # ModernBERT-style local window, skipped key blocks
        ([1, 18, 35], 2, 1, 32, True, (5, -1)),  # causal + left window, GQA 2:1
        ([2, 19, 9], 2, 2, 64, False, (-1, 3)),  # one-sided window, D 64
        ([17, 1], 1, 1, 64, True, None),
    ],
)
def test_fp32_matches_reference(lengths, hq, hk, d, causal, window):
    _check(lengths, hq, hk, d, causal=causal, window=window)


@needs_triton
def test_fp16_matches_reference():
    _check([1, 6, 20], 2, 1, 32, dtype=torch.float16, causal=False, window=None)


@needs_triton
def test_other_block_sizes_and_loose_max_seqlen():
    # 32-token blocks (fwd 32 x 16): one-block sequences up to 32, a 40-token one crosses; max_seqlen
    # may overstate the longest sequence (graph buckets pass their cap).
    _check([1, 32, 40, 12], 2, 2, 32, blocks=(32, 16, 1, 1, 32, 1, 1), max_seqlen=64)


@needs_triton
def test_head_dim_not_power_of_two():
    _check([3, 20], 2, 2, 24)


@needs_triton
def test_zero_length_sequences_and_strided_inputs():
    """Empty sequences (as CUDA-graph buckets pad with) and q/k/v as views of a fused projection."""
    lengths = [0, 5, 0, 18, 0]
    cu = _cu(lengths)
    t, hq, hk, d = sum(lengths), 2, 1, 16
    torch.manual_seed(3)
    qkv = torch.randn(t, (hq + 2 * hk) * d)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d: (hq + hk) * d].view(t, hk, d)
    v = qkv[:, (hq + hk) * d:].view(t, hk, d)
    assert not q.is_contiguous()
    g = torch.randn(t, hq, d)
    o, grads = _run(varlen_attention, q, k, v, g, cu_seqlens=cu, max_seqlen=18)
    o_ref, grads_ref = _run(varlen_attention_reference, q, k, v, g, cu_seqlens=cu)
    torch.testing.assert_close(o, o_ref, **TOL[torch.float32])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@needs_triton
def test_deterministic_and_inference_path():
    lengths = [4, 21]
    cu = _cu(lengths)
    q, k, v, g = _make(lengths, 2, 2, 16)
    o1, g1 = _run(varlen_attention, q, k, v, g, cu_seqlens=cu, max_seqlen=21)
    o2, g2 = _run(varlen_attention, q, k, v, g, cu_seqlens=cu, max_seqlen=21)
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    qg = q.clone().requires_grad_()
    out = varlen_attention(qg, k, v, cu, 21)
    assert "VarlenAttentionFn" in type(out.grad_fn).__name__
    with torch.no_grad():
        o3 = varlen_attention(q, k, v, cu, 21)
    assert o3.grad_fn is None
    torch.testing.assert_close(o3, o1, atol=0, rtol=0)


@needs_triton
def test_empty_batch():
    q = torch.zeros(0, 2, 16, requires_grad=True)
    k = torch.zeros(0, 1, 16, requires_grad=True)
    v = torch.zeros(0, 1, 16, requires_grad=True)
    cu = torch.zeros(1, dtype=torch.int32)
    o = varlen_attention(q, k, v, cu, 0)
    assert o.shape == (0, 2, 16)
    o.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


def test_supported():
    q, k = torch.zeros(4, 4, 64), torch.zeros(4, 2, 64)
    cu = _cu([4])
    if use_triton(q):
        assert supported(q, k, cu)
    assert not supported(q, k, cu, dropout_p=0.1)
    assert not supported(torch.zeros(4, 4, 256), torch.zeros(4, 2, 256), cu)  # Gemma3's 256 falls back
    assert not supported(q, torch.zeros(4, 3, 64), cu)  # Hq not a multiple of Hkv
    assert not supported(q.bfloat16(), k.bfloat16(), cu) or q.is_cuda  # no bf16 in the interpreter


# -------------------------------------------------------------------------------------------
# The reference itself, and the wiring into fastst_plugin.attention.


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (False, (3, 3)), (True, (2, -1))])
def test_reference_matches_dense_reference(causal, window):
    lengths = [1, 7, 0, 12]
    cu = _cu(lengths)
    q, k, v, _ = _make(lengths, 4, 2, 8)
    a = varlen_attention_reference(q, k, v, cu, causal=causal, window=window, scale=0.3)
    b = attn_mod.attention_reference(q, k, v, cu, causal=causal, window=window, scale=0.3)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_auto_picks_triton_only_when_enabled(monkeypatch):
    q, k = torch.zeros(4, 2, 32), torch.zeros(4, 2, 32)
    cu = _cu([4])
    monkeypatch.setenv("FASTST_TRITON_ATTENTION", "0")  # the opt-out
    assert attn_mod.choose_backend("auto", q, None, 0.0, k, cu, 4) != "triton"
    monkeypatch.delenv("FASTST_TRITON_ATTENTION", raising=False)  # default: on where it applies
    # 'auto' only considers it on CUDA with fp16/bf16 (CPU keeps sdpa even in the interpreter).
    assert attn_mod.choose_backend("auto", q, None, 0.0, k, cu, 4) == "sdpa"
    if use_triton(q):
        assert attn_mod.choose_backend("triton", q, None, 0.0, k, cu, 4) == "triton"
    # Dropout is not supported: a forced 'triton' falls back.
    assert attn_mod.choose_backend("triton", q, None, 0.1, k, cu, 4) != "triton"
    assert "triton" in attn_mod.available_backends()


@needs_triton
def test_backend_through_attention_module():
    lengths = [3, 17]
    cu = _cu(lengths)
    q, k, v, g = _make(lengths, 2, 1, 16)
    kw = dict(cu_seqlens=cu, max_seqlen=17, causal=True, window=(4, 4), scale=0.2)
    o, grads = _run(attn_mod.varlen_attention, q, k, v, g, backend="triton", **kw)
    o_ref, grads_ref = _run(attn_mod.varlen_attention, q, k, v, g, backend="reference", **kw)
    torch.testing.assert_close(o, o_ref, **TOL[torch.float32])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (False, (3, 3)), (True, (2, -1))])
@pytest.mark.parametrize("hk", [4, 2])  # MHA and GQA
def test_cpu_sdpa_per_sequence_matches_reference(causal, window, hk):
    # The CPU's 'sdpa' runs each packed sequence on its own rows (no padding, no mask unless a
    # window needs one): values and gradients equal the block-diagonal reference, zero-length
    # sequences included.
    lengths = [1, 7, 0, 12, 5]
    cu = _cu(lengths)
    q, k, v, g = _make(lengths, 4, hk, 8)
    kw = dict(cu_seqlens=cu, max_seqlen=12, causal=causal, window=window, scale=0.3)
    o, grads = _run(attn_mod.varlen_attention, q, k, v, g, backend="sdpa", **kw)
    o_ref, grads_ref = _run(attn_mod.varlen_attention, q, k, v, g, backend="reference", **kw)
    torch.testing.assert_close(o, o_ref, atol=1e-6, rtol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _fake_varlen(calls):
    """A stand-in for torch.nn.attention.varlen.varlen_attn (windows, no enable_gqa: torch 2.11's)."""

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        calls.append(("varlen_attn", tuple(k.shape), tuple(window_size)))
        return torch.zeros_like(q)

    return varlen_attn, True, False, False


def test_direct_flash_call_args_and_gqa_without_repeat(monkeypatch):
    """The direct ATen call gets K/V with their own head count, the window, causal=True with the right
    edge 0 only under a window (FlashAttention sets it itself otherwise)."""
    calls = []

    def fwd(q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug, *, scale, window_size_left, window_size_right):
        calls.append((tuple(k.shape), causal, window_size_left, window_size_right, scale))
        t = torch.zeros(2)
        return torch.zeros_like(q), torch.zeros(q.shape[1], q.shape[0]), t, t, None

    monkeypatch.setattr(attn_mod, "_aten_flash_ops", lambda: (fwd, None))
    monkeypatch.setattr(attn_mod, "_torch_varlen", lambda: _fake_varlen(calls))
    monkeypatch.setattr(attn_mod, "_ATEN_FLASH_BROKEN", [])
    q, k = torch.randn(10, 4, 8), torch.randn(10, 1, 8)
    cu = torch.tensor([0, 6, 10], dtype=torch.int32)
    attn_mod._run_torch_varlen(q, k, k, cu, 6, False, (3, 3), 0.5)
    attn_mod._run_torch_varlen(q, k, k, cu, 6, True, None, 0.5)
    attn_mod._run_torch_varlen(q, k, k, cu, 6, True, (3, 0), 0.5)
    assert calls == [((10, 1, 8), False, 3, 3, 0.5), ((10, 1, 8), True, -1, -1, 0.5), ((10, 1, 8), True, 3, 0, 0.5)]


def test_direct_flash_failure_falls_back_to_varlen_attn_once(monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append("aten")
        raise TypeError("_flash_attention_forward() got an unexpected keyword argument")

    monkeypatch.setattr(attn_mod, "_aten_flash_ops", lambda: (broken, None))
    monkeypatch.setattr(attn_mod, "_torch_varlen", lambda: _fake_varlen(calls))
    monkeypatch.setattr(attn_mod, "_ATEN_FLASH_BROKEN", [])
    q, k = torch.randn(10, 4, 8), torch.randn(10, 2, 8)
    cu = torch.tensor([0, 6, 10], dtype=torch.int32)
    for _ in range(2):
        attn_mod._run_torch_varlen(q, k, k, cu, 6, False, None, 0.5)
    # one failed direct call, then varlen_attn with K/V repeated to the query heads (no enable_gqa)
    assert calls == ["aten", ("varlen_attn", (10, 4, 8), (-1, -1)), ("varlen_attn", (10, 4, 8), (-1, -1))]
    assert attn_mod._ATEN_FLASH_BROKEN and "varlen_attn" in attn_mod.available_backends()["torch_varlen"]


def test_direct_flash_backward_gets_the_forward_state(monkeypatch):
    """The backward call receives the forward's output, log-sum-exp and RNG state, the same window and
    causal flag, and a grad with a unit last stride; K/V gradients keep K/V's head count."""
    seen = {}

    def fwd(q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug, *, scale, window_size_left, window_size_right):
        seen["out"] = torch.full_like(q, 2.0)
        seen["lse"] = torch.ones(q.shape[1], q.shape[0])
        seen["seed"], seen["offset"] = torch.tensor([7]), torch.tensor([9])
        return seen["out"], seen["lse"], seen["seed"], seen["offset"], None

    def bwd(g, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout, causal, seed, offset, *, scale,
            window_size_left, window_size_right):
        for got, name in ((out, "out"), (lse, "lse"), (seed, "seed"), (offset, "offset")):
            assert got.data_ptr() == seen[name].data_ptr(), name  # the forward's own tensors, saved
        assert g.stride(-1) == 1 and causal and (window_size_left, window_size_right) == (4, 0) and scale == 0.25
        return torch.ones_like(q), torch.ones_like(k), torch.ones_like(v)

    monkeypatch.setattr(attn_mod, "_aten_flash_ops", lambda: (fwd, bwd))
    monkeypatch.setattr(attn_mod, "_torch_varlen", lambda: _fake_varlen([]))
    monkeypatch.setattr(attn_mod, "_ATEN_FLASH_BROKEN", [])
    q = torch.randn(10, 4, 8, requires_grad=True)
    k = torch.randn(10, 2, 8, requires_grad=True)
    v = torch.randn(10, 2, 8, requires_grad=True)
    cu = torch.tensor([0, 6, 10], dtype=torch.int32)
    out = attn_mod._run_torch_varlen(q, k, v, cu, 6, True, (4, 0), 0.25)
    out.backward(torch.randn(10, 8, 4).transpose(1, 2))  # a grad without unit last stride
    assert q.grad.shape == q.shape and k.grad.shape == (10, 2, 8) and v.grad.shape == (10, 2, 8)


def test_block_map_enumerates_every_sequences_blocks_in_order():
    from fastst_plugin.kernels.varlen_attention import _block_map

    lengths, block = [0, 5, 16, 17, 0, 40, 1], 16
    cu = _cu(lengths)
    want = [(i, b) for i, n in enumerate(lengths) for b in range(-(-n // block))]
    n_prog = len(want) + 3  # the grid's upper bound leaves programs past the last block
    seq, first = _block_map(cu, n_prog, block)
    got = [(int(s), pid - int(first[s])) for pid, s in enumerate(seq[: len(want)])]
    assert got == want
    assert all(int(s) == len(lengths) for s in seq[len(want):])  # past the end: invalid


@needs_triton
@pytest.mark.parametrize(
    "lengths,hq,hk,d,causal,window,blocks",
    [
        ([1, 5, 16, 17, 40], 2, 2, 32, False, None, None),
        ([3, 33, 1, 20], 4, 2, 32, True, None, None),
        ([40, 7, 2], 2, 2, 32, False, (4, 4), None),
        ([1, 32, 40, 12], 2, 2, 32, False, None, (32, 16, 1, 1, 32, 1, 1)),
    ],
)
def test_boundary_scan_path_matches_reference(monkeypatch, lengths, hq, hk, d, causal, window, blocks):
    # FASTST_ATTN_BLOCK_MAP=0: every program scans cu_seqlens instead of reading the block map (the
    # default, which the other tests here run).
    monkeypatch.setenv("FASTST_ATTN_BLOCK_MAP", "0")
    _check(lengths, hq, hk, d, causal=causal, window=window, blocks=blocks, max_seqlen=64 if blocks else None)
    _check([0, 5, 0, 18, 0], 2, 1, 16)  # empty sequences (graph buckets)


def test_supported_seq_limit_only_without_the_map(monkeypatch):
    from fastst_plugin.kernels import varlen_attention as va

    q, k = torch.zeros(3, 2, 16), torch.zeros(3, 2, 16)
    cu = torch.zeros(va.MAX_SEQS + 2, dtype=torch.int32)
    cu[-1] = 3
    if not use_triton(q):
        pytest.skip("Triton path needs CUDA or TRITON_INTERPRET=1")
    assert supported(q, k, cu)
    monkeypatch.setenv("FASTST_ATTN_BLOCK_MAP", "0")
    assert not supported(q, k, cu)


@needs_triton
def test_shared_block_maps_built_once_per_forward(monkeypatch):
    """Inside shared_block_maps() the layers' calls over one cu_seqlens build each map once (forward
    block and backward block), the backward reads the map saved in the forward, and values and
    gradients equal the per-call maps'."""
    from fastst_plugin.kernels import varlen_attention as va

    built = []
    real = va._block_map
    monkeypatch.setattr(va, "_block_map", lambda *a: built.append(a[1:]) or real(*a))
    lengths = [3, 33, 1, 20, 0]
    cu = _cu(lengths)
    q, k, v, g = _make(lengths, 4, 2, 32)

    def two_layers():
        q1, k1, v1 = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        o = varlen_attention(q1, k1, v1, cu_seqlens=cu, max_seqlen=33, causal=True)
        o = varlen_attention(o, k1, v1, cu_seqlens=cu, max_seqlen=33, causal=True)
        return o.detach(), torch.autograd.grad(o, (q1, k1, v1), g)

    per_call = two_layers()
    assert len(built) == 4  # per call: the forward's map and the backward's (saved); none at backward time
    keys = set(built)  # (programs, block): one key when the forward's and backward's blocks agree
    built.clear()
    with va.shared_block_maps():
        shared = two_layers()
    assert sorted(built) == sorted(keys)  # each map once
    for a, b in zip((per_call[0], *per_call[1]), (shared[0], *shared[1])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
