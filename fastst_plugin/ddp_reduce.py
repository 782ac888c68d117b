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
``BUCKET_BYTES`` each, in parameter order, through persistent buffers (as DDP's own buckets). Each bucket carries one count per parameter of the ranks
that produced a gradient, so that a parameter without a gradient on every rank keeps ``None``
(DDP's ``find_unused_parameters`` semantics); reading those counts waits for the GPU, which
happens only in a step where this rank had a parameter without a gradient.

Checked: one H200, one rank inside DDP (NCCL), bert-base LoRA 64 pairs, 40 steps: losses identical
to the run without DDP and to DDP's own reduction; 19.4 ms per step without DDP, 26.9 ms with DDP's
reduction, 20.2 ms with this one (2026-11-29). CPU, 2 processes (gloo): full fine-tuning with and
without checkpointing, LoRA, and gradient accumulation give the 1-process / DDP-reduced losses.

Memory: the flat buffers hold one copy of the trainable gradients (LoRA: megabytes; full
fine-tuning: the size of the gradients, beside DDP's own bucket buffers, which stay allocated).

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
        stats["reductions"] += 1
        for bucket in self.buckets:
            bucket.reduce(self.world, self.group)


class _Bucket:
    """Parameters reduced together: one persistent flat buffer, the gradients copied in and out
    through views of it shaped like the parameters, then one count per parameter (1 where this
    rank has a gradient)."""

    def __init__(self, params: list):
        self.params = params
        sizes = [p.numel() for p in params]
        self.values = sum(sizes)
        self.flat = torch.empty(self.values + len(params), dtype=params[0].dtype, device=params[0].device)
        self.views = [v.view_as(p) for v, p in zip(torch.split(self.flat[: self.values], sizes), params)]
        self.counts = self.flat[self.values:]

    def reduce(self, world: int, group) -> None:
        import torch.distributed as dist

        grads, views, missing = [], [], []
        for i, (p, v) in enumerate(zip(self.params, self.views)):
            if p.grad is None:
                missing.append(i)
            else:
                grads.append(p.grad)
                views.append(v)
        if grads:
            torch._foreach_copy_(views, grads)
        self.counts.fill_(1)
        for i in missing:  # fill kernels, no host round trip
            self.views[i].zero_()
            self.counts[i] = 0
        dist.all_reduce(self.flat, group=group)
        self.flat[: self.values].div_(world)
        if grads:
            torch._foreach_copy_(grads, views)
        if missing:  # which of them did another rank produce? (waits for the GPU: rare)
            seen = self.counts.tolist()
            for i in missing:
                if seen[i] > 0:
                    self.params[i].grad = self.views[i].clone()


def _buckets(params: list, cap_bytes: int) -> list[_Bucket]:
    """Consecutive parameters of one dtype and device, at most ``cap_bytes`` per bucket (one
    parameter larger than that is a bucket of its own)."""
    return [_Bucket(group) for group in _groups(params, cap_bytes)]


def _groups(params: list, cap_bytes: int) -> list[list]:
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
