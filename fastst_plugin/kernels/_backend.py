"""When to run a Triton kernel and when to run its torch reference.

Every op in this package has two implementations: a Triton kernel (forward and backward) and a
plain-torch reference that is also the CPU fallback and the test oracle. ``use_triton(t)`` decides
per call:

* CUDA tensors take the Triton kernel when Triton imports (and ``FASTST_KERNELS`` is not
  ``torch``).
* CPU tensors take the torch reference, except under ``TRITON_INTERPRET=1`` (the tests), where the
  Triton kernel runs in Triton's CPU interpreter so that CI exercises the real kernel code.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - triton missing or broken on this platform
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_forced_off() -> bool:
    """``FASTST_KERNELS=torch`` (or ``enable_fast(kernels="torch")``, which sets the module flag)."""
    return os.environ.get("FASTST_KERNELS", "").lower() == "torch" or _FORCE_TORCH[0]


_FORCE_TORCH = [False]


def force_torch_reference(flag: bool) -> None:
    """Process-wide switch used by tests and by ``kernels="torch"``."""
    _FORCE_TORCH[0] = bool(flag)


def use_triton(t: torch.Tensor) -> bool:
    if kernels_forced_off() or not triton_available():
        return False
    if t.is_cuda:
        return True
    return interpreter_on()


def on_device(device: torch.device):
    """Make ``device`` the current CUDA device for the block (a no-op off CUDA).

    Triton launches on the *current* device, not on its arguments' device: a model on ``cuda:1`` in a
    process whose current device is ``cuda:0`` (every torchrun rank but 0 before the trainer calls
    ``set_device``, e.g. an evaluator run before training) fails with "Pointer argument cannot be
    accessed from Triton". Torch's own ops guard themselves; the fast path's entry points use this."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def next_power_of_2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()
