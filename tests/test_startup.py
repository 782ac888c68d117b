"""The startup file (``fastst_plugin.pth``) and the ``FASTST`` environment variable, in child processes.

The child-process tests need the package installed (``pip install -e .`` or ``pip install .``), so
that the startup file sits in site-packages; ``.ci/run`` installs it. Without it they skip.
"""

import os
import timeit

import pytest

from conftest import parse_report  # tests/ is on sys.path under pytest
from fastst_plugin.cli import _startup_file

STARTUP_FILE_IN_REPO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fastst_plugin", "_fastst.pth")
HEAVY = ("torch", "sentence_transformers", "transformers", "wrapt", "fastst_plugin")

needs_installed = pytest.mark.skipif(
    _startup_file() is None,
    reason="fastst_plugin.pth is not in site-packages: install the package (pip install -e .) to test start-up",
)


def _imported(importtime_stderr: str) -> set[str]:
    """Module names from ``python -X importtime`` output."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name)
    return names


def test_startup_file_is_one_cheap_line():
    with open(STARTUP_FILE_IN_REPO) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("import "), "site only executes lines starting with 'import'"
    code = compile(lines[0], "fastst_plugin.pth", "exec")

    env_before = os.environ.pop("FASTST", None)
    try:
        import sys

        before = set(sys.modules)
        exec(code, {})
        assert set(sys.modules) == before, "with FASTST unset the line imports nothing"
        per_run = min(timeit.repeat(lambda: exec(code, {}), number=200, repeat=3)) / 200
    finally:
        if env_before is not None:
            os.environ["FASTST"] = env_before
    assert per_run < 1e-3, f"the startup line takes {per_run * 1e6:.0f} us with FASTST unset"


@needs_installed
def test_installed_startup_file_is_current():
    with open(_startup_file()) as installed, open(STARTUP_FILE_IN_REPO) as ours:
        assert installed.read() == ours.read(), "site-packages has a stale fastst_plugin.pth: reinstall"


@needs_installed
def test_interpreter_start_imports_nothing_without_the_variable(run_python):
    proc, _ = run_python(["-X", "importtime", "-c", "pass"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = _imported(proc.stderr)
    assert imported, "no -X importtime output"
    assert not {name for name in imported if name.split(".")[0] in HEAVY}


@needs_installed
def test_interpreter_start_with_the_variable_registers_the_hook_only(run_python):
    proc, _ = run_python(["-X", "importtime", "-c", "pass"], env={"FASTST": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = _imported(proc.stderr)
    assert "fastst_plugin.autopatch" in imported
    # torch & co. load when the script imports sentence_transformers, not at every interpreter start
    # (dataloader workers, helper processes): fastst_plugin/__init__ and autopatch must stay light.
    assert not {name for name in imported if name.split(".")[0] in ("torch", "sentence_transformers", "transformers")}


@needs_installed
def test_env_variable_patches_an_unmodified_training_script(run_python, unmodified_train_script):
    proc, report = run_python(unmodified_train_script, env={"FASTST": "1", "FASTST_LORA": "8"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert report["STEPS"] == "2"
    assert float(report["LOSS"]) == float(report["LOSS"])  # not NaN
    assert report["FASTST_IMPORTED"] == "True"
    assert report["IS_FAST"] == "True"
    assert report["LORA"] == "True", "FASTST_LORA=8 adds LoRA adapters"
    assert "[fastst] patched SentenceTransformer" in proc.stderr and "LoRA r=8" in proc.stderr


@needs_installed
def test_env_variable_under_torchrun(run_python, unmodified_train_script, tmp_path):
    """``FASTST=1 torchrun --nproc_per_node 2 train.py``: every rank's model is fast (with LoRA) and
    trains inside DistributedDataParallel (gloo on the CPU; the script asks for the CPU)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs = tmp_path / "ranks"
    launcher = [
        "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
        "--log-dir", str(logs), "--redirects", "3",  # each rank's output in its own files
    ]
    proc, _ = run_python(launcher + unmodified_train_script, env={"FASTST": "1", "FASTST_LORA": "8", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [parse_report(p.read_text()) for p in sorted(logs.rglob("stdout.log"))]
    assert len(reports) == 2, sorted(logs.rglob("*"))
    for report in reports:
        assert report["IS_FAST"] == "True" and report["LORA"] == "True", report
        assert report["WRAPPED"] == "DistributedDataParallel" and report["STEPS"] == "2", report
    assert reports[0]["LOSS"] == reports[1]["LOSS"]  # the trainer's loss, averaged over the ranks


@needs_installed
def test_without_the_variable_nothing_is_patched_or_imported(run_python, unmodified_train_script):
    proc, report = run_python(unmodified_train_script)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert report["STEPS"] == "2"
    assert report["FASTST_IMPORTED"] == "False"
    assert report["LORA"] == "False"
    assert "[fastst]" not in proc.stderr
