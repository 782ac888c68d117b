"""The ``fastst`` command: ``run``, ``info``, ``demo`` and ``bench``.

::

    fastst run train.py --epochs 1      # an unmodified script, with every model made fast
    fastst run -m my_package.train       # the same for a module, like ``python -m``
    fastst info [MODEL_PATH]             # versions, backends, kernels, environment; what would be patched
    fastst demo [--steps N]              # fine-tune all-MiniLM-L6-v2 on bundled Debian pairs, NDCG before/after
    fastst bench ...                     # the benchmark harness (fastst_plugin.bench)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

ENV_VARS_SHOWN = ("TRITON_INTERPRET", "HF_HUB_OFFLINE", "CUDA_VISIBLE_DEVICES")
PACKAGES_SHOWN = (
    "torch",
    "transformers",
    "sentence-transformers",
    "peft",
    "triton",
    "bitsandbytes",
    "wrapt",
    "accelerate",
    "datasets",
)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    # `run` and `bench` hand everything after them on untouched, options included.
    if argv and argv[0] in ("run", "bench"):
        args = parser.parse_args(argv[:1])
        args.rest = argv[1:]
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args) or 0


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="fastst",
        description="sentence-transformers, fast on NVIDIA GPUs, without changing how you use it.",
    )
    parser.add_argument("--version", action="version", version=f"fastst_plugin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="run an unmodified script with every model made fast",
        description="Run SCRIPT (or -m MODULE) as __main__ with FASTST=1: every SentenceTransformer, "
        "CrossEncoder and SparseEncoder it builds gets enable_fast(); FASTST_LORA and the other "
        "FASTST_* variables set the defaults.",
        usage="fastst run SCRIPT [ARGS ...] | fastst run -m MODULE [ARGS ...]",
    )
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("info", help="versions, attention backends, kernels, environment; what a model would get")
    p.add_argument("model", nargs="?", help="a SentenceTransformer folder (loaded on the CPU) to inspect")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "demo",
        help="fine-tune all-MiniLM-L6-v2 on bundled Debian pairs and show NDCG@10 before/after",
        description="Fine-tune the bundled all-MiniLM-L6-v2 with enable_fast(model, lora=16) on query/description "
        "pairs of Debian packages (MultipleNegativesRankingLoss, SentenceTransformerTrainer), and report retrieval "
        "NDCG@10 on 500 held-out pairs before and after. Works offline.",
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 250 = one epoch on a GPU; 40 on a CPU)")
    p.add_argument(
        "--time-budget", type=float, default=None, metavar="SECONDS",
        help="end training early so that the whole demo takes at most this long "
        "(default: 270 on a CPU when --steps is not given; none on a GPU)",
    )
    p.add_argument("--output", default="fastst-demo-output", help="where the trained model and results.json go")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--eval-pairs", type=int, default=None, metavar="N", help="score on the first N test pairs (default: all 500)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--lora", type=int, default=16, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--learning-rate", type=float, default=None, help="default: 1e-3 for LoRA on CPU, 2e-4 on GPU, 3e-5 full")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="the benchmark harness (see `fastst bench --help`)", add_help=False)
    p.set_defaults(func=_cmd_bench)
    return parser


# --------------------------------------------------------------------------------------------------
# fastst run


def _cmd_run(args) -> int:
    import runpy

    rest = args.rest
    if not rest or rest[0] in ("-h", "--help"):
        print("usage: fastst run SCRIPT [ARGS ...] | fastst run -m MODULE [ARGS ...]", file=sys.stderr)
        return 0 if rest else 2
    if rest[0] == "-m":
        if len(rest) < 2:
            print("fastst run: -m needs a module name", file=sys.stderr)
            return 2
    elif not os.path.isfile(rest[0]):
        print(f"fastst run: {rest[0]}: no such file", file=sys.stderr)
        return 2

    os.environ["FASTST"] = "1"  # child processes (dataloader workers, torchrun) are patched too
    from .autopatch import register_import_hook

    register_import_hook()

    if rest[0] == "-m":
        sys.argv = [rest[1], *rest[2:]]
        sys.path[0:1] = [os.getcwd()]  # as `python -m` does
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(rest)
        # As `python script.py` does: the script's folder is sys.path[0] (instead of fastst's bin/).
        sys.path[0:1] = [os.path.dirname(os.path.abspath(rest[0]))]
        runpy.run_path(rest[0], run_name="__main__")
    return 0


# --------------------------------------------------------------------------------------------------
# fastst info


def _cmd_info(args) -> int:
    import platform
    from importlib import metadata

    from . import __version__

    def row(key: str, value) -> None:
        print(f"  {key:<24} {value}")

    print(f"fastst_plugin {__version__}")
    print("versions:")
    row("python", f"{platform.python_version()} ({sys.executable})")
    for name in PACKAGES_SHOWN:
        try:
            row(name, metadata.version(name))
        except metadata.PackageNotFoundError:
            row(name, "not installed")
    try:
        from .versions import version_problems

        problems = version_problems()
        row("supported", "yes" if not problems else "NO: " + "; ".join(problems))
    except Exception as exc:  # noqa: BLE001
        row("supported", f"? ({exc})")

    print("device:")
    try:
        import torch

        row("CUDA (torch built for)", torch.version.cuda or "none (CPU build)")
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                cap = ".".join(map(str, torch.cuda.get_device_capability(i)))
                row(f"GPU {i}", f"{torch.cuda.get_device_name(i)} (sm {cap})")
            row("bf16", "yes" if torch.cuda.is_bf16_supported() else "no")
        else:
            row("GPU", "none visible: the fast path needs an NVIDIA GPU; CPU runs use reference ops")
    except Exception as exc:  # noqa: BLE001
        row("torch", f"cannot import: {exc}")

    print("attention backends:")
    try:
        from .attention import available_backends

        for name, note in available_backends().items():
            row(name, note)
    except Exception as exc:  # noqa: BLE001
        row("?", f"unavailable ({type(exc).__name__}: {exc})")

    print("kernels:")
    row("modules", ", ".join(_kernel_modules()) or "none")
    row("triton", _triton_note())

    print("environment:")
    shown = sorted(k for k in os.environ if k.startswith("FASTST")) + [k for k in ENV_VARS_SHOWN if k in os.environ]
    for key in shown:
        row(key, os.environ[key])
    if not shown:
        row("(none set)", "FASTST, FASTST_LORA, FASTST_KERNELS, FASTST_ATTENTION, ... see fastst_plugin.config")
    row("startup file", _startup_file() or "not found in site-packages: FASTST=1 has no effect (fastst run still works)")
    from .autopatch import env_enabled

    row("import-time patching", "on (FASTST is set)" if env_enabled() else "off (set FASTST=1 or use `fastst run`)")

    if args.model:
        print(f"model {args.model}:")
        _describe_model(args.model, row)
    return 0


def _kernel_modules() -> list[str]:
    import pkgutil

    try:
        from . import kernels
    except Exception:  # noqa: BLE001
        return []
    return sorted(m.name for m in pkgutil.iter_modules(kernels.__path__) if not m.name.startswith("_"))


def _triton_note() -> str:
    try:
        from importlib import metadata

        version = metadata.version("triton")
    except Exception:  # noqa: BLE001
        return "not installed: kernels use torch reference ops"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return f"{version}, interpreter (TRITON_INTERPRET=1)"
    try:
        import torch

        if torch.cuda.is_available():
            return f"{version}, compiled for the GPU"
    except Exception:  # noqa: BLE001
        pass
    return f"{version}, unused without a GPU (torch reference ops)"


def _startup_file() -> str | None:
    import site

    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    for d in dirs:
        path = os.path.join(d, "fastst_plugin.pth")
        if os.path.exists(path):
            return path
    return None


def _describe_model(path: str, row) -> None:
    try:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(path, device="cpu")
    except Exception as exc:  # noqa: BLE001
        row("load", f"failed: {type(exc).__name__}: {exc}")
        return
    row("modules", " -> ".join(type(m).__name__ for m in model))
    hf_model = getattr(model[0], "model", None)
    if hf_model is None:
        row("backbone", f"{type(model[0]).__name__} has no HF model: stays stock")
        return
    config = getattr(hf_model, "config", None)
    row("backbone", f"{type(hf_model).__name__} (model_type={getattr(config, 'model_type', '?')!r})")
    row("max_seq_length", getattr(model, "max_seq_length", "?"))
    try:
        from .backbones import find_spec

        spec = find_spec(hf_model)
    except Exception as exc:  # noqa: BLE001
        row("family", f"? (backbone registry unavailable: {type(exc).__name__}: {exc})")
        spec = None
    else:
        if spec is None:
            row("family", "not supported: enable_fast leaves the forward stock (LoRA and checkpointing still apply)")
        else:
            row("family", spec.family)
            row("lora=True targets", ", ".join(spec.lora_targets) or "-")
            for note in getattr(spec, "notes", ()):
                row("note", note)
    try:
        from .api import enable_fast, get_state

        if get_state(model) is None:
            enable_fast(model)
        row("enable_fast here", get_state(model).summary)
    except Exception as exc:  # noqa: BLE001
        row("enable_fast here", f"failed: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------------------------------
# fastst demo / bench


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(
        steps=args.steps,
        output_dir=args.output,
        device=args.device,
        batch_size=args.batch_size,
        max_seq_length=args.max_seq_length,
        lora=args.lora or None,
        learning_rate=args.learning_rate,
        time_budget=args.time_budget,
        eval_pairs=args.eval_pairs,
    )
    return 0


def _cmd_bench(args) -> int:
    try:
        from .bench import main as bench_main
    except ImportError as exc:
        print(
            f"fastst bench: the benchmark harness is not available in this install ({exc}). "
            "It lives in fastst_plugin/bench/; install fastst_plugin with its bench extra: pip install 'fastst_plugin[bench]'",
            file=sys.stderr,
        )
        return 2
    return bench_main(args.rest) or 0


if __name__ == "__main__":
    sys.exit(main())
