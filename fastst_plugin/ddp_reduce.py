"""fastst's own gradient all-reduce under DDP (``FASTST_DDP_REDUCE=ddp`` leaves it to DDP's hooks).

Why: DistributedDataParallel reduces gradients from hooks on each parameter's AccumulateGrad node,
so under DDP a replayed (CUDA-graphed) step hands autograd one gradient edge per trainable
parameter (``graphs._GraphedStep``). On one GPU the replayed step writes ``.grad`` itself
(``graphs._GraphedStepDirect``), which removed most of a small step's host time (H200, MiniLM LoRA:
6.9 -> 4.2 ms per step); on 2 x H200 a 64-pair bert-base LoRA step still takes 19.8 ms against
16.4 ms on one GPU (2026-11-29).

How: for the trainer's ``train()`` call, DDP's reducer is idled (the wrapper's
``require_backward_grad_sync`` off, as inside ``no_sync()``; DDP still broadcasts the parameters at
construction), the replayed steps write ``.grad`` directly, and after every training step that
synchronises gradients (``accelerator.sync_gradients``: the last micro-step of an accumulation)
the trainable gradients are averaged over the ranks in flat all-reduces of at most
``BUCKET_BYTES`` each, in parameter order. Each bucket carries one count per parameter of the ranks
that produced a gradient, so that a parameter without a gradient on every rank keeps ``None``
(DDP's ``find_unused_parameters`` semantics); reading those counts waits for the GPU, which
happens only in a step where this rank had a parameter without a gradient.

Checked: one H200, one rank inside DDP (NCCL), bert-base LoRA 64 pairs, 40 steps: losses identical
to the run without DDP and to DDP's own reduction; 19.4 ms per step without DDP, 26.9 ms with DDP's
reduction, 20.2 ms with this one (2026-11-29). CPU, 2 processes (gloo): full fine-tuning with and
without checkpointing, LoRA, and gradient accumulation give the 1-process / DDP-reduced losses.

Left to DDP (``why_not``): a registered communication hook, sparse parameters, parameters on
several devices; and any loop outside the trainer.
"""

from __future__ import annotations

import os

import torch

from .log import logger

BUCKET_BYTES = 256 << 20
_taken_over = 0  # reducers alive in this process (graphs reads it: direct gradient writes allowed)
stats = {"reductions": 0}  # steps reduced here, this process (read by the DDP bench and its tests)


def wanted() -> bool:
    """On unless ``FASTST_DDP_REDUCE=ddp`` (DDP's own hooks reduce, graphed steps keep one autograd
    edge per parameter)."""
    return os.environ.get("FASTST_DDP_REDUCE", "fastst").strip().lower() != "ddp"


def why_not(wrapper) -> str | None:
    """Why DDP keeps reducing this wrapper's gradients itself, or None."""
    if getattr(wrapper, "_comm_hooks", None) or getattr(wrapper, "_comm_hook", None):
        return "a communication hook is registered (it would be bypassed)"
    if any(p.requires_grad and p.is_sparse for p in wrapper.module.parameters()):
        return "sparse parameters"
    if len({p.device for p in wrapper.module.parameters() if p.requires_grad}) > 1:
        return "parameters on several devices"
    return None


def taken_over() -> bool:
    """Whether gradients are reduced here rather than by DDP's hooks (graphed steps may then write
    ``.grad`` directly under torch.distributed)."""
    return _taken_over > 0


def is_ddp_wrapper(model) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


class FastReducer:
    """Idles ``wrapper``'s reducer and averages its module's trainable gradients in :meth:`reduce`."""

    def __init__(self, wrapper: torch.nn.parallel.DistributedDataParallel):
        global _taken_over
        import torch.distributed as dist

        ignored = set(getattr(wrapper, "parameters_to_ignore", ()) or ())
        self.params = [p for n, p in wrapper.module.named_parameters() if p.requires_grad and n not in ignored]
        self.group = getattr(wrapper, "process_group", None)
        self.world = dist.get_world_size(self.group)
        self.buckets = _buckets(self.params, BUCKET_BYTES)
        self.wrapper = wrapper
        self.find_unused = wrapper.find_unused_parameters
        # With the reducer idle, find_unused_parameters would only make every DDP forward pass its
        # outputs through _DDPSink (a clone of each output tensor that requires grad: the packed
        # token embeddings among them, three times per MNRL step) for nothing.
        wrapper.find_unused_parameters = False
        self.arm()
        _taken_over += 1
        logger.info(f"DDP: gradients of {len(self.params)} parameters reduced by fastst "
                    f"({len(self.buckets)} all-reduce buckets per step; DDP's hooks idle)")

    def arm(self) -> None:
        """Keep DDP's reducer idle for the coming step (called before every training step:
        accelerate's ``no_sync`` around an accumulation micro-step restores the flag it found on
        entry, which is True when this reducer was made inside it, at the first step)."""
        self.wrapper.require_backward_grad_sync = False

    def close(self) -> None:
        global _taken_over
        if self.wrapper is not None:
            # True is DDP's value outside no_sync(), where train() returns.
            self.wrapper.require_backward_grad_sync = True
            self.wrapper.find_unused_parameters = self.find_unused
            self.wrapper = None
            _taken_over -= 1

    def reduce(self) -> None:
        """Average every trainable gradient over the ranks (call on every rank after the backward)."""
        import torch.distributed as dist

        stats["reductions"] += 1
        for bucket in self.buckets:
            missing = [i for i, p in enumerate(bucket) if p.grad is None]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
            counts = torch.ones(len(bucket), dtype=grads[0].dtype, device=grads[0].device)
            for i in missing:
                counts[i] = 0  # a fill kernel, no host round trip
            flat = torch.cat([g.reshape(-1) for g in grads] + [counts])
            dist.all_reduce(flat, group=self.group)
            values = flat[: flat.numel() - len(bucket)].div_(self.world)
            reduced = list(torch.split(values, [g.numel() for g in grads]))
            absent = set(missing)
            present = [i for i in range(len(bucket)) if i not in absent]
            if present:
                torch._foreach_copy_([grads[i] for i in present], [reduced[i].view_as(grads[i]) for i in present])
            if missing:  # which of them did another rank produce? (waits for the GPU: rare)
                seen = flat[flat.numel() - len(bucket):].tolist()
                for i in missing:
                    if seen[i] > 0:
                        bucket[i].grad = reduced[i].view_as(bucket[i]).clone()


def _buckets(params: list, cap_bytes: int) -> list[list]:
    """Consecutive parameters of one dtype and device, at most ``cap_bytes`` per bucket (one
    parameter larger than that is a bucket of its own)."""
    out: list[list] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        last = out[-1] if out else None
        if last is None or last[0].dtype != p.dtype or last[0].device != p.device or size + nbytes > cap_bytes:
            out.append([p])
            size = nbytes
        else:
            last.append(p)
            size += nbytes
    return out
