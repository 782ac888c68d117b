"""Timing, GPU-busy share, memory, peak rate and FLOP counts.

FLOPs per step (model FLOPs of the real, non-pad tokens; what MFU divides by the measured peak)::

    N      = sum of in*out over the backbone's per-token linear layers (attention + MLP projections)
    R      = sum of r*(in+out) over the LoRA-adapted layers
    T      = real tokens in the step (every text of every column, counted once)
    A_fwd  = sum over sequences and layers of 4 * P(n, layer) * heads * head_dim
             P = query-key pairs one sequence of n tokens computes in that layer:
                 n^2 (bidirectional), n(n+1)/2 (causal), or the pairs within the sliding window
                 (|i-j| <= w: n + 2*sum_{d=1..min(w,n-1)} (n-d); causal: half of the off-diagonal)
             (QK^T: 2*P*head_dim per head, PV: 2*P*head_dim per head)

    train, full fine-tuning:  6*N*T            + 3*A_fwd
    train, LoRA / QLoRA:      4*N*T + 6*R*T    + 3*A_fwd
        (forward 2N; backward 2N for the activation gradients only, the frozen weights get none;
        each adapter costs 2r(in+out) forward and 4r(in+out) backward per token)
    encode / predict:         2*N*T            + A_fwd

Attention backward is counted as twice its forward (dQ, dK, dV, dP); FlashAttention's recompute of
QK^T in the backward, gradient checkpointing's recompute, CachedMNRL's extra no-grad pass, embedding
lookups, norms, activations and the pooler/heads (per sequence, not per token) are not counted:
these are model FLOPs, not hardware FLOPs. The peak is measured in the same run by a bf16
8192x8192x8192 matrix product (median of 10 after 3 warm-ups, random data).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def sync(device: str) -> None:
    if is_cuda(device):
        import torch

        torch.cuda.synchronize()


class StepTimer:
    """Times a sequence of steps without synchronizing between them: CUDA events on a GPU
    (each step's span on the GPU timeline, host gaps included), ``perf_counter`` on the CPU."""

    def __init__(self, device: str):
        self.cuda = is_cuda(device)
        self.device = device
        self._marks: list = []

    def mark(self) -> None:
        if self.cuda:
            import torch

            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self._marks.append(e)
        else:
            self._marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if len(self._marks) < 2:
            return []
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self._marks, self._marks[1:])]
        return [(b - a) * 1000.0 for a, b in zip(self._marks, self._marks[1:])]


def measure_peak_tflops(device: str, n: int = 8192) -> float | None:
    """bf16 matmul rate of this card (TFLOP/s), or None off the GPU."""
    if not is_cuda(device):
        return None
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / (statistics.median(times) / 1000.0) / 1e12


def gpu_kernel_time(fn: Callable[[], object], device: str) -> tuple[float | None, int | None]:
    """(GPU busy ms, kernels launched) for one call of ``fn``, by torch.profiler's CUDA activity:
    the union of the kernel / memcpy / memset intervals (overlapping streams counted once)."""
    if not is_cuda(device):
        return None, None
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    spans = None
    try:  # the raw kineto events: cheap even for ~30k kernels (no FunctionEvent tree is built)
        raw = prof.profiler.kineto_results.events()
        spans = [(e.start_ns() / 1000.0, e.end_ns() / 1000.0) for e in raw if e.device_type() == DeviceType.CUDA]
    except Exception:
        spans = None
    if not spans:
        spans = []
        for ev in prof.events():
            if getattr(ev, "device_type", None) == DeviceType.CUDA:
                tr = ev.time_range
                spans.append((tr.start, tr.end))
    spans = [(a, b) for a, b in spans if b > a]
    if not spans:  # other profiler layouts: the summed device time (no overlap removal)
        total = sum(getattr(e, "self_device_time_total", 0.0) or 0.0 for e in prof.key_averages())
        return (total / 1000.0 if total else None), None
    return union_ms(spans), len(spans)


def union_ms(spans_us: list[tuple[float, float]]) -> float:
    """Total length (ms) of the union of [start, end) intervals given in microseconds."""
    if not spans_us:
        return 0.0
    spans = sorted(spans_us)
    busy = 0.0
    cur_s, cur_e = spans[0]
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return busy / 1000.0


class MemoryWatch:
    """Peak device memory of one contender, net of what other live contenders hold.

    ``start()`` empties the cache and notes allocated/reserved bytes (the other contenders' resident
    state); ``stop()`` returns the peaks above those baselines, in GB (1e9 bytes).

    One-time allocations of the process land on the contender that makes them: the first fastst
    contender built also carries the CUDA-graph capture stream's cuBLAS workspaces (~0.07 GB; H200,
    MiniLM LoRA at 128 tokens, 0.52 vs 0.45 GB for the same configuration built second). They cannot
    be cleared between contenders (the first one's graphs point into them): compare fastst variants
    knowing their build order, or in separate processes."""

    def __init__(self, device: str):
        self.cuda = is_cuda(device)

    def start(self) -> None:
        if not self.cuda:
            return
        import gc

        import torch

        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        self.alloc0 = torch.cuda.memory_allocated()
        self.res0 = torch.cuda.memory_reserved()
        torch.cuda.reset_peak_memory_stats()

    def stop(self) -> tuple[float | None, float | None]:
        if not self.cuda:
            return None, None
        import torch

        torch.cuda.synchronize()
        return (
            (torch.cuda.max_memory_allocated() - self.alloc0) / 1e9,
            (torch.cuda.max_memory_reserved() - self.res0) / 1e9,
        )


# ------------------------------------------------------------------------------------------------ FLOPs


CAUSAL_MODEL_TYPES = {"qwen3", "qwen2", "llama", "mistral", "gemma3_text", "gemma2", "gemma", "phi3", "qwen3_moe"}


def attention_layout(config) -> tuple[int, int, bool, list[int | None]]:
    """(heads, head_dim, causal, per-layer half window w (|i-j| <= w) or None for full)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    mt = getattr(config, "model_type", "")
    causal = mt in CAUSAL_MODEL_TYPES and not getattr(config, "use_bidirectional_attention", False)
    if getattr(config, "is_causal", None) is False:
        causal = False
    n_layers = config.num_hidden_layers
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * n_layers)
    windows: list[int | None] = []
    for t in types[:n_layers]:
        if t != "sliding_attention":
            windows.append(None)
        elif mt == "modernbert":
            windows.append(config.local_attention // 2)
        elif getattr(config, "sliding_window", None):
            # transformers' flash convention: window (sliding_window - 1) each side
            windows.append(int(config.sliding_window) - 1)
        else:
            windows.append(None)
    return heads, head_dim, causal, windows


def attention_pairs(n: int, causal: bool, w: int | None) -> float:
    if w is None or w >= n - 1:
        return n * (n + 1) / 2 if causal else float(n * n)
    m = w
    off = m * n - m * (m + 1) / 2  # pairs at distance 1..m on one side
    return n + off if causal else n + 2 * off


def attention_flops_fwd(config, seq_lens: list[int]) -> float:
    heads, head_dim, causal, windows = attention_layout(config)
    total = 0.0
    for w in windows:
        total += sum(attention_pairs(n, causal, w) for n in seq_lens)
    return 4.0 * total * heads * head_dim


def linear_sizes(hf_model, names: list[str]) -> list[tuple[int, int]]:
    out = []
    for n in names:
        m = hf_model.get_submodule(n)
        out.append((m.in_features, m.out_features))
    return out


def step_flops(*, workload: str, mode: str, n_lin: int, lora_rank_sum: int, tokens: int, attn_fwd: float) -> float:
    if workload == "encode":
        return 2.0 * n_lin * tokens + attn_fwd
    if mode == "full":
        return 6.0 * n_lin * tokens + 3.0 * attn_fwd
    return 4.0 * n_lin * tokens + 6.0 * lora_rank_sum * tokens + 3.0 * attn_fwd


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None
