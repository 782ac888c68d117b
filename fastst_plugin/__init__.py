"""fastst: sentence-transformers, several times faster on NVIDIA GPUs, without changing how you use it.

The whole public API::

    from fastst_plugin import enable_fast
    model = SentenceTransformer("all-MiniLM-L6-v2")
    enable_fast(model, lora=32)            # same object, patched in place
    ...                                    # train / encode / save exactly as before

    disable_fast(model)                    # back to stock forward code
    is_fast(model)
    patch(); unpatch()                     # every model built from now on gets enable_fast
    save_pretrained_merged(model, path)    # adapters merged into a plain model folder
    push_to_hub_merged(model, repo_id)

Setting ``FASTST=1`` in the environment does ``patch()`` at import time of sentence_transformers,
for unmodified scripts (see :mod:`fastst_plugin.autopatch`).
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import disable_fast, enable_fast, is_fast, patch, unpatch  # noqa: E402


def __getattr__(name: str):
    # PEP 562: the adapter helpers pull in peft and huggingface_hub; load them on first use so that
    # ``import fastst_plugin`` (done by the FASTST=1 startup hook) stays cheap.
    if name in ("save_pretrained_merged", "push_to_hub_merged"):
        from . import adapters

        return getattr(adapters, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "enable_fast",
    "disable_fast",
    "is_fast",
    "patch",
    "unpatch",
    "save_pretrained_merged",
    "push_to_hub_merged",
    "__version__",
]
