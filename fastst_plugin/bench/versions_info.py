"""Library versions recorded with every benchmark run."""

from __future__ import annotations

from importlib import metadata

PACKAGES = ("torch", "transformers", "sentence-transformers", "peft", "triton", "flash-attn", "unsloth", "bitsandbytes", "fastst_plugin")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if out.get("fastst_plugin") is None:
        try:
            import fastst_plugin

            out["fastst_plugin"] = getattr(fastst_plugin, "__version__", None)
        except Exception:
            pass
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except Exception:
        pass
    return out
