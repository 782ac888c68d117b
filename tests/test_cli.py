"""The ``fastst`` command line."""

import json
import os
import shutil
import sys
import types

import pytest

from fastst_plugin import cli


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "run" in capsys.readouterr().out


def test_version(capsys):
    from fastst_plugin import __version__

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_console_script_is_installed(subprocess_env):
    fastst = shutil.which("fastst", path=os.path.dirname(sys.executable))
    if fastst is None:
        pytest.skip("the fastst console script is not installed next to this Python (pip install -e .)")
    import subprocess

    proc = subprocess.run([fastst, "--version"], capture_output=True, text=True, env=subprocess_env, timeout=120)
    assert proc.returncode == 0 and "fastst_plugin" in proc.stdout


def test_run_patches_an_unmodified_script(run_python, tmp_path, tiny_bert_path):
    script = tmp_path / "build_model.py"
    script.write_text(
        "import json, sys\n"
        "from sentence_transformers import SentenceTransformer\n"
        "model = SentenceTransformer(sys.argv[1], device='cpu')\n"
        "print('NAME', __name__)\n"
        "print('ARGV', json.dumps(sys.argv))\n"
        "import fastst_plugin\n"
        "print('IS_FAST', fastst_plugin.is_fast(model))\n"
        "print('SHAPE', tuple(model.encode(['a query', 'a longer document text']).shape))\n"
    )
    proc, report = run_python(["-m", "fastst_plugin.cli", "run", str(script), tiny_bert_path, "--flag"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert report["NAME"] == "__main__"
    assert json.loads(report["ARGV"]) == [str(script), tiny_bert_path, "--flag"]
    assert report["IS_FAST"] == "True"
    assert report["SHAPE"] == "(2, 32)"
    assert "[fastst] patched SentenceTransformer" in proc.stderr


def test_run_module(run_python, tmp_path):
    (tmp_path / "my_job.py").write_text(
        "import os, sys\n"
        "from fastst_plugin import autopatch\n"
        "print('NAME', __name__)\n"
        "print('ARGS', ' '.join(sys.argv[1:]))\n"
        "print('FASTST', os.environ.get('FASTST'))\n"
        "print('HOOK', autopatch._hook_registered)\n"
    )
    proc, report = run_python(["-m", "fastst_plugin.cli", "run", "-m", "my_job", "a", "--b"], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report == {"NAME": "__main__", "ARGS": "a --b", "FASTST": "1", "HOOK": "True"}


def test_run_missing_script(capsys, monkeypatch):
    monkeypatch.delenv("FASTST", raising=False)
    assert cli.main(["run", "no-such-script.py"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert "FASTST" not in os.environ


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in ("python", "torch", "sentence-transformers", "transformers", "peft", "triton", "bitsandbytes",
                   "attention backends:", "kernels:", "environment:", "startup file"):
        assert needle in out, needle
    assert "layernorm" in out  # kernel modules are listed


def test_info_with_a_model(capsys, tiny_bert_path):
    assert cli.main(["info", tiny_bert_path]) == 0
    out = capsys.readouterr().out
    assert "BertModel" in out
    assert "family" in out and "bert" in out
    assert "enable_fast here" in out


def test_bench_missing_says_so(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastst_plugin.bench", None)  # as if the harness were not installed
    assert cli.main(["bench", "--anything"]) == 2
    assert "benchmark harness" in capsys.readouterr().err


def test_bench_delegates_argv(monkeypatch):
    seen = []
    fake = types.ModuleType("fastst_plugin.bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "fastst_plugin.bench", fake)
    assert cli.main(["bench", "train", "--smoke", "-h"]) == 0
    assert seen == [["train", "--smoke", "-h"]]


def test_demo_arguments(monkeypatch):
    from fastst_plugin import demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: seen.update(kwargs))
    assert cli.main(["demo", "--steps", "3", "--output", "out", "--device", "cpu", "--lora", "0"]) == 0
    assert seen["steps"] == 3 and seen["output_dir"] == "out" and seen["device"] == "cpu" and seen["lora"] is None


def test_demo_end_to_end_small(run_python, tmp_path, minilm_path):
    """The real demo (MiniLM, fastst, trainer, evaluator, saving) on a tiny schedule, as a CPU user runs it."""
    out = tmp_path / "out"
    proc, _ = run_python(
        ["-m", "fastst_plugin.cli", "demo", "--steps", "2", "--batch-size", "8", "--max-seq-length", "32",
         "--eval-pairs", "40", "--device", "cpu", "--output", str(out)]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2
    assert 0.0 < results["ndcg@10_before"] <= 1.0 and 0.0 < results["ndcg@10_after"] <= 1.0
    assert "NDCG@10 on 40 held-out Debian queries" in proc.stdout
    assert (out / "modules.json").exists()


def test_bench_ddp_forwards_to_the_multi_gpu_runner(capsys):
    """`fastst bench ddp ...` is the DDP runner (fastst_plugin.bench.ddp), options and all."""
    import pytest

    from fastst_plugin import bench

    with pytest.raises(SystemExit) as exc:
        bench.main(["ddp", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--per-device-batch" in out and "--grad-accum" in out
