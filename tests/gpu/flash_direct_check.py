"""ATen's FlashAttention-2 called directly (``attention._FlashVarlenFn``, K/V heads as they are) against
``torch.nn.attention.varlen.varlen_attn`` with K/V repeated to the query heads (the path before), and
against the fp32 reference on short texts. Run on the GPU machine:

    python tests/gpu/flash_direct_check.py        # JSON lines on stdout and in $OUT/flash_direct.jsonl

Shapes: the four families' attention (bert-base 12 x 64; ModernBERT local ±64; EmbeddingGemma 3/1 x 256
with its ±511 window and global layers; Qwen3 16/8 x 128 causal) over a 64-pair step's texts at 256
tokens, and over 64 pairs with 1,024-token documents (timed: forward + backward, CUDA events, median).
q/k/v are strided views of one fused projection, as in the encoder.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from fastst_plugin import attention as A  # noqa: E402

OUT = os.environ.get("OUT", "gpu-out")
os.makedirs(OUT, exist_ok=True)
DEV = "cuda"


def _lengths(long_docs: bool, gen) -> list[int]:
    queries = torch.randint(4, 24, (64,), generator=gen)
    if long_docs:
        docs = torch.randint(300, 1025, (64,), generator=gen)
    else:
        docs = torch.clamp(torch.randint(20, 200, (64,), generator=gen), max=256)
    return [int(x) for x in torch.cat([queries, docs])]


def _inputs(lengths, hq, hkv, d, gen):
    t = sum(lengths)
    qkv = (torch.randn(t, (hq + 2 * hkv) * d, generator=gen) * 0.5).to(DEV, torch.bfloat16)
    qkv.requires_grad_(True)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEV)
    return qkv, cu, max(lengths)


def _split(qkv, hq, hkv, d):
    t = qkv.shape[0]
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], -1)
    return q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)


def _run(qkv, cu, max_len, hq, hkv, d, causal, window, direct: bool):
    A._ATEN_FLASH_BROKEN.clear()
    if not direct:
        A._ATEN_FLASH_BROKEN.append("forced off for the comparison")
    try:
        q, k, v = _split(qkv, hq, hkv, d)
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        return A._run_torch_varlen(q, k, v, cu, max_len, causal, window, d**-0.5)
    finally:
        A._ATEN_FLASH_BROKEN.clear()


def _fwd_bwd(qkv, cu, max_len, cfg, direct, w):
    qkv.grad = None
    out = _run(qkv, cu, max_len, *cfg, direct=direct)
    (out.float() * w).sum().backward()
    return out.detach().float(), qkv.grad.detach().float().clone()


def _time(qkv, cu, max_len, cfg, direct, w, iters=20):
    for _ in range(3):
        _fwd_bwd(qkv, cu, max_len, cfg, direct, w)
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        qkv.grad = None
        out = _run(qkv, cu, max_len, *cfg, direct=direct)
        (out.float() * w).sum().backward()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


SHAPES = {
    "bert-base": (12, 12, 64, False, None),
    "modernbert-local": (12, 12, 64, False, (64, 64)),
    "gemma3-local": (3, 1, 256, False, (511, 511)),
    "gemma3-global": (3, 1, 256, False, None),
    "qwen3": (16, 8, 128, True, None),
}


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    failed = 0
    for long_docs in (False, True):
        lengths = _lengths(long_docs, gen)
        for name, (hq, hkv, d, causal, window) in SHAPES.items():
            cfg = (hq, hkv, d, causal, window)
            qkv, cu, max_len = _inputs(lengths, hq, hkv, d, gen)
            w = torch.randn(sum(lengths), hq, d, generator=gen).to(DEV)
            new_out, new_g = _fwd_bwd(qkv, cu, max_len, cfg, True, w)
            old_out, old_g = _fwd_bwd(qkv, cu, max_len, cfg, False, w)
            rec = {"shape": name, "tokens": sum(lengths), "long_docs": long_docs,
                   "out_max_diff_vs_varlen_attn": (new_out - old_out).abs().max().item(),
                   "grad_rel_err_vs_varlen_attn": ((new_g - old_g).norm() / old_g.norm()).item()}
            if not long_docs:  # fp32 reference: dense T x T mask, short texts only
                ref_in = qkv.detach().float().requires_grad_(True)
                q, k, v = _split(ref_in, hq, hkv, d)
                ref = A.attention_reference(q, k, v, cu, causal=causal, window=window, scale=d**-0.5)
                (ref.float() * w).sum().backward()
                rec["out_max_diff_vs_fp32"] = (new_out - ref.detach()).abs().max().item()
                rec["varlen_attn_out_max_diff_vs_fp32"] = (old_out - ref.detach()).abs().max().item()
                rec["grad_rel_err_vs_fp32"] = ((new_g - ref_in.grad).norm() / ref_in.grad.norm()).item()
                rec["varlen_attn_grad_rel_err_vs_fp32"] = ((old_g - ref_in.grad).norm() / ref_in.grad.norm()).item()
                ok = rec["grad_rel_err_vs_fp32"] <= 1.5 * rec["varlen_attn_grad_rel_err_vs_fp32"] + 1e-3 \
                    and rec["out_max_diff_vs_fp32"] <= 1.5 * rec["varlen_attn_out_max_diff_vs_fp32"] + 1e-3
            else:
                ok = rec["out_max_diff_vs_varlen_attn"] <= 2e-2 and rec["grad_rel_err_vs_varlen_attn"] <= 1e-2
                rec["fwd_bwd_ms_direct"] = round(_time(qkv, cu, max_len, cfg, True, w), 3)
                rec["fwd_bwd_ms_varlen_attn"] = round(_time(qkv, cu, max_len, cfg, False, w), 3)
            rec["ok"] = bool(ok)
            failed += not ok
            line = json.dumps(rec)
            print(line, flush=True)
            with open(os.path.join(OUT, "flash_direct.jsonl"), "a") as f:
                f.write(line + "\n")
            del qkv, w
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
