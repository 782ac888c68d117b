"""DDP on the CPU: ``torchrun --nproc_per_node 2`` (gloo) of ``fastst_plugin.bench.ddp`` against the
same run in one process.

The runner trains a tiny random BERT (the bench's ``--smoke`` config, fp32, no dropout) with the real
``SentenceTransformerTrainer`` and MNRL (``gather_across_devices=True``), fastst enabled, full
fine-tuning (BERT's pooler is then a trainable parameter that gets no gradient: DDP's unused-parameter
path). With the same global batch and seed, every step of the 2-process run must see the same rows
(same real-token count) and give the same loss as the 1-process run, to fp32 rounding — which also
checks that the gradients were all-reduced (without it the ranks' weights would drift apart after the
first step). The fast path must have run under DDP: one packed forward per loss call on every rank,
called through the DDP wrapper, with and without the trainer's gradient checkpointing. Also: LoRA
checkpoints written under DDP resume to the same losses, and CachedMNRL with gathered negatives
matches its 1-process run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("datasets")
pytest.importorskip("accelerate")

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
ARGS = [
    "--model", "bert-base", "--smoke", "--lora-r", "0", "--global-batch", "8", "--steps", str(STEPS),
    "--warmup", "1", "--max-seq-length", "64", "--no-dropout", "--seed", "0",
]


def _with_lora(args: list[str], r: int = 16) -> list[str]:
    """``args`` with ``--lora-r R`` instead of full fine-tuning (only that flag's value changes)."""
    out = list(args)
    out[out.index("--lora-r") + 1] = str(r)
    return out


def _env() -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        # Torch reference ops in both runs (the DDP logic is what is tested; Triton's CPU interpreter
        # would only make the ranks slower).
        FASTST_KERNELS="torch",
        PYTHONPATH=os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])),
    )
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read(path: Path):
    steps, summary = [], None
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["record"] == "step":
            steps.append(r)
        else:
            summary = r
    return steps, summary


def _one_process_run(out: Path, monkeypatch) -> None:
    """The reference, in this process (no second interpreter start-up on a 2-CPU runner)."""
    _one_process_run_args(out, monkeypatch, ARGS)


def _one_process_run_args(out: Path, monkeypatch, args: list) -> None:
    import torch

    from fastst_plugin import training
    from fastst_plugin.bench import ddp

    for name, value in _env().items():
        if os.environ.get(name) != value:
            monkeypatch.setenv(name, value)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    installed = training.is_installed()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert ddp.main([*args, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
        if not installed:
            training.uninstall_trainer_integration()


def _torchrun(tmp_path, name: str, *args: str, meanwhile=None, env: dict | None = None) -> None:
    """``torchrun --nproc_per_node 2 -m fastst_plugin.bench.ddp ARGS``; ``meanwhile()`` runs here while
    it does (the 1-process reference: no second interpreter start-up on a 2-CPU runner)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "-m", "fastst_plugin.bench.ddp", *args,
    ]
    log = tmp_path / f"{name}.log"
    with open(log, "w") as sink:
        # Own session: on failure the launcher and its two workers go down together.
        proc = subprocess.Popen(cmd, cwd=REPO, env={**_env(), **(env or {})}, stdout=sink, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            if meanwhile is not None:
                meanwhile()
            rc = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if rc != 0:
        pytest.fail(f"{name}: torchrun --nproc_per_node 2 exited {rc}:\n{log.read_text()[-6000:]}")


def test_two_processes_match_one(tmp_path, monkeypatch):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    one, two = tmp_path / "one", tmp_path / "two"
    # The 2-process run does both checkpointing settings in one launch (one start-up, one import);
    # the 1-process reference runs here meanwhile.
    _torchrun(
        tmp_path, "torchrun", *ARGS, "--gradient-checkpointing", "off,on", "--out", str(two),
        meanwhile=lambda: _one_process_run(one, monkeypatch),
    )

    ref_steps, ref = _read(one / "ddp-bert-base-full-1gpu-nockpt.jsonl")
    assert ref["world_size"] == 1 and ref["steps"] == STEPS
    assert ref_steps[-1]["loss"] != ref_steps[0]["loss"]  # the optimizer did change the weights
    for ckpt in ("nockpt", "ckpt"):
        steps, summary = _read(two / f"ddp-bert-base-full-2gpu-{ckpt}.jsonl")
        assert summary["world_size"] == 2 and summary["per_device_batch"] == 4 and summary["steps"] == STEPS
        for a, b in zip(steps, ref_steps):
            assert a["tokens"] == b["tokens"], (ckpt, a, b)  # the ranks together hold the 1-process batch
            assert abs(a["loss"] - b["loss"]) < 2e-5, (ckpt, a, b)
        assert summary["find_unused_parameters"] is True  # the trainer's default for ST models
        # the pooler (never read by the fast forward) is left out of DDP: no unused-parameter sync per step
        assert summary["ddp_ignored_params"] == ["0.model.pooler.dense.bias", "0.model.pooler.dense.weight"], summary
        ranks = summary["fast_path_per_rank"]
        assert len(ranks) == 2
        for r in ranks:
            assert r["packed_forwards"] == STEPS, r  # one packed forward per loss call, through DDP
            assert r["ckpt_option"] == ("layer" if ckpt == "ckpt" else "off"), r

    from fastst_plugin.bench.ddp import compare

    table, ok = compare(sorted(str(p) for p in list(one.glob("*.jsonl")) + list(two.glob("*.jsonl"))), max_loss_diff=2e-5)
    assert ok, table


def test_two_process_lora_checkpoint_resumes(tmp_path):
    """Under DDP, LoRA: the checkpoint of step 2 is written once (rank 0) as an adapter folder, and a
    run resumed from it gives steps 3-4 the losses of the uninterrupted run."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    lora = _with_lora(ARGS)
    lora[lora.index("--steps") + 1] = "4"
    full_run, resumed = tmp_path / "full", tmp_path / "resumed"
    _torchrun(tmp_path, "full", *lora, "--out", str(full_run), "--output-dir", str(full_run / "ckpt"), "--save-steps", "2")
    checkpoint = full_run / "ckpt" / "checkpoint-2"
    assert (checkpoint / "adapter_config.json").exists() and (full_run / "ckpt" / "checkpoint-4").exists()
    _torchrun(tmp_path, "resumed", *lora, "--out", str(resumed), "--resume-from", str(checkpoint))

    all_steps, _ = _read(full_run / "ddp-bert-base-lora16-2gpu-nockpt.jsonl")
    after, summary = _read(resumed / "ddp-bert-base-lora16-2gpu-nockpt.jsonl")
    assert len(all_steps) == 4 and len(after) == 2 and summary["world_size"] == 2
    for a, b in zip(after, all_steps[2:]):
        assert a["tokens"] == b["tokens"], (a, b)  # the same rows, in the same order, after the resume
        assert abs(a["loss"] - b["loss"]) < 2e-5, (a, b)


def test_two_process_cached_mnrl_matches_one(tmp_path, monkeypatch):
    """CachedMultipleNegativesRankingLoss under DDP (gather_across_devices, LoRA, mini-batches of 2):
    the 2-process losses equal the 1-process run's, step by step."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    args = _with_lora(ARGS) + ["--loss", "cached-mnrl", "--mini-batch-size", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    _torchrun(tmp_path, "two", *args, "--out", str(two), meanwhile=lambda: _one_process_run_args(one, monkeypatch, args))
    ref, _ = _read(one / "ddp-bert-base-lora16-1gpu-nockpt-cached-mnrl.jsonl")
    steps, summary = _read(two / "ddp-bert-base-lora16-2gpu-nockpt-cached-mnrl.jsonl")
    assert summary["loss"] == "cached-mnrl" and len(steps) == len(ref) == STEPS
    for a, b in zip(steps, ref):
        assert a["tokens"] == b["tokens"] and abs(a["loss"] - b["loss"]) < 2e-5, (a, b)


def test_two_processes_with_fastst_reducing_gradients_match_one(tmp_path, monkeypatch):
    """fastst's reduction (the default; FASTST_DDP_REDUCE=ddp for DDP's own): DDP's hooks idle, fastst averages the gradients after each step
    (flat all-reduces; the pooler, read by nothing, stays out). Full fine-tuning with and without
    checkpointing, and LoRA: the 2-process losses equal the 1-process run's, step by step."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    lora = list(ARGS)
    lora[lora.index("--lora-r") + 1] = "0,16"  # full fine-tuning and LoRA r=16, one launch
    one, two = tmp_path / "one", tmp_path / "two"
    _torchrun(
        tmp_path, "two", *lora, "--gradient-checkpointing", "off,on", "--out", str(two),
        meanwhile=lambda: _one_process_run_args(one, monkeypatch, lora),
    )
    for mode in ("full", "lora16"):
        ref, _ = _read(one / f"ddp-bert-base-{mode}-1gpu-nockpt.jsonl")
        for ckpt in ("nockpt", "ckpt"):
            steps, summary = _read(two / f"ddp-bert-base-{mode}-2gpu-{ckpt}.jsonl")
            assert summary["fastst_reductions"] == STEPS, summary  # every step reduced by fastst
            assert summary["ddp_reducer_calls"] == 0, summary  # and DDP's hooks idle
            assert len(steps) == len(ref) == STEPS
            for a, b in zip(steps, ref):
                assert a["tokens"] == b["tokens"] and abs(a["loss"] - b["loss"]) < 2e-5, (mode, ckpt, a, b)


def test_fastst_reduction_with_gradient_accumulation_matches_ddp(tmp_path):
    """Gradient accumulation (2 micro-batches per step): fastst reduces once per optimizer step, at
    the micro-batch the trainer syncs; the losses equal DDP's own reduction of the same run."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    args = [*ARGS, "--grad-accum", "2"]
    ddp_run, own = tmp_path / "ddp", tmp_path / "own"
    _torchrun(tmp_path, "ddp", *args, "--out", str(ddp_run), env={"FASTST_DDP_REDUCE": "ddp"})
    _torchrun(tmp_path, "own", *args, "--out", str(own))
    ref, ref_summary = _read(ddp_run / "ddp-bert-base-full-2gpu-nockpt-accum2.jsonl")
    steps, summary = _read(own / "ddp-bert-base-full-2gpu-nockpt-accum2.jsonl")
    assert ref_summary["fastst_reductions"] == 0 and summary["fastst_reductions"] == STEPS, (ref_summary, summary)
    # DDP's reducer: in each step's syncing micro-step with FASTST_DDP_REDUCE=ddp, never otherwise
    assert ref_summary["ddp_reducer_calls"] == STEPS and summary["ddp_reducer_calls"] == 0, (ref_summary, summary)
    assert summary["grad_accum"] == 2 and len(steps) == len(ref) == STEPS
    assert ref[-1]["loss"] != ref[0]["loss"]
    for a, b in zip(steps, ref):
        assert a["tokens"] == b["tokens"] and abs(a["loss"] - b["loss"]) < 2e-5, (a, b)


def test_fastst_reduction_keeps_never_used_parameters_without_gradient(tmp_path, monkeypatch):
    """With the unread parameters kept in the reduction (FASTST_DDP_IGNORE_UNREAD=0), the pooler has
    no gradient on any rank: the reduction's missing-gradient path (zeros in the buffer, the counts
    read back) runs every step, and the losses still equal the 1-process run's. (The pooler feeds
    nothing, so the losses cannot tell whether its .grad stayed None.)"""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    one, two = tmp_path / "one", tmp_path / "two"
    _torchrun(tmp_path, "two", *ARGS, "--out", str(two), env={"FASTST_DDP_IGNORE_UNREAD": "0"},
              meanwhile=lambda: _one_process_run(one, monkeypatch))
    ref, _ = _read(one / "ddp-bert-base-full-1gpu-nockpt.jsonl")
    steps, summary = _read(two / "ddp-bert-base-full-2gpu-nockpt.jsonl")
    assert summary["ddp_ignored_params"] == [] and summary["fastst_reductions"] == STEPS, summary
    for a, b in zip(steps, ref):
        assert a["tokens"] == b["tokens"] and abs(a["loss"] - b["loss"]) < 2e-5, (a, b)
