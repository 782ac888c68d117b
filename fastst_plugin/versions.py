"""The version range fastst is built and tested for, checked when a model is enabled."""

from __future__ import annotations

import functools
from importlib import metadata

from packaging.version import Version

# name: (minimum inclusive, maximum exclusive)
SUPPORTED = {
    "sentence-transformers": ("6.0", "7"),
    "transformers": ("5.0", "6"),
    "torch": ("2.6", "3"),
    "peft": ("0.17", "1"),
}


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def version_problems() -> tuple[str, ...]:
    problems = []
    for name, (low, high) in SUPPORTED.items():
        got = installed(name)
        if got is None:
            problems.append(f"{name} is not installed (fastst needs {name}>={low},<{high})")
            continue
        v = Version(Version(got).base_version)
        if not (Version(low) <= v < Version(high)):
            problems.append(f"{name} {got} is outside the supported range >={low},<{high}")
    return tuple(problems)


def check_versions() -> None:
    """Raise a clear ``RuntimeError`` when a library we patch is outside the tested range."""
    problems = version_problems()
    if problems:
        raise RuntimeError(
            "fastst cannot patch this environment: " + "; ".join(problems) + ". "
            "Install a supported version (pip install 'fastst_plugin' pulls them) or call enable_fast(model, kernels='off')"
            " to use only LoRA/checkpointing."
        )
