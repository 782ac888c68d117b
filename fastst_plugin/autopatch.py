"""Import-time patching: ``FASTST=1 python train.py`` makes an unmodified script fast.

How it is wired:

1. ``fastst_plugin.pth`` (installed at the top of site-packages) runs at every interpreter start. It
   checks ``FASTST`` and, only when it is set, imports this module and calls
   :func:`register_import_hook`. Unset, it costs one dictionary lookup and imports nothing.
2. :func:`register_import_hook` asks wrapt to call us back right after ``sentence_transformers`` is
   imported (at once, if it already is).
3. The callback runs :func:`patch_classes` with the ``FASTST_*`` defaults: the constructors of
   ``SentenceTransformer``, ``CrossEncoder`` and ``SparseEncoder`` then end with
   ``enable_fast(self, lora=FASTST_LORA, ...)``, and the trainers get the training integration.

Whatever goes wrong on this path is logged and leaves things stock: a model fastst cannot handle is
still built and trained the stock way, and a broken environment never stops the user's import.

This module must stay cheap to import (standard library only at the top): the startup file imports it
at interpreter start when ``FASTST`` is set.
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import Any

from .log import logger, warn_once
from .patching import PatchSet

TARGET_MODULE = "sentence_transformers"
PATCHED_CLASSES = ("SentenceTransformer", "CrossEncoder", "SparseEncoder")
_TRUE = ("1", "true", "yes", "on")

_FROM_ENV = object()  # lora default: read FASTST_LORA when each model is built

_hook_registered = False
_patches: PatchSet | None = None
_lora: Any = _FROM_ENV
_options: dict[str, Any] = {}
# Per thread: ids of the objects whose (outermost) patched __init__ is running, and whether an
# enable_fast call is in progress (a model built inside it is left alone).
_local = threading.local()


def env_enabled(environ=None) -> bool:
    """Whether ``FASTST`` asks for import-time patching (the same test as the startup file's)."""
    import os

    environ = os.environ if environ is None else environ
    return environ.get("FASTST", "").strip().lower() in _TRUE


# --------------------------------------------------------------------------------------------------
# the import hook


def register_import_hook() -> None:
    """Run :func:`patch_classes` (with the ``FASTST_*`` defaults) when ``sentence_transformers`` is
    imported, or now if it already is. Idempotent."""
    global _hook_registered
    if _hook_registered:
        return
    try:
        import wrapt
    except ImportError:
        # At interpreter start the startup file may run before the site directory holding wrapt is on
        # sys.path (a venv with --system-site-packages, a --user install): retry at the next import.
        if not any(isinstance(f, _RegisterWhenImportable) for f in sys.meta_path):
            sys.meta_path.insert(0, _RegisterWhenImportable())
        return
    _hook_registered = True
    wrapt.register_post_import_hook(_on_sentence_transformers_imported, TARGET_MODULE)


def _on_sentence_transformers_imported(module) -> None:
    # An exception here would make `import sentence_transformers` fail: never let one out.
    try:
        from .config import env_defaults

        patch_classes(**env_defaults())
    except Exception as exc:  # noqa: BLE001
        try:
            unpatch_classes()  # all or nothing
        except Exception:  # noqa: BLE001
            pass
        logger.warning(f"FASTST is set but fastst could not patch sentence-transformers ({type(exc).__name__}: {exc}); running stock")


class _RegisterWhenImportable:
    """A meta-path finder that only waits for wrapt to become importable, then registers the hook.

    It finds nothing itself. It retries only when ``sys.path`` has changed since its last failure, so
    in an environment without wrapt an import costs one tuple comparison more.
    """

    def __init__(self) -> None:
        self._busy = False
        self._failed_on: tuple[str, ...] | None = None

    def find_spec(self, fullname, path=None, target=None):
        if _hook_registered or self._busy or self._failed_on == tuple(sys.path):
            return None
        self._busy = True
        try:
            import wrapt.importer
        except ImportError:
            self._failed_on = tuple(sys.path)
            return None
        finally:
            self._busy = False
        register_import_hook()
        # wrapt's finder went in ahead of this one during this very lookup, so the import system will
        # not ask it about this module: ask it here (it answers only for the modules it watches).
        for finder in sys.meta_path:
            if isinstance(finder, wrapt.importer.ImportHookFinder):
                return finder.find_spec(fullname, path, target)
        return None


# --------------------------------------------------------------------------------------------------
# class patching


def is_patched() -> bool:
    """True between :func:`patch_classes` and :func:`unpatch_classes`."""
    return _patches is not None


def patch_classes(**defaults: Any) -> None:
    """Make every ``SentenceTransformer`` / ``CrossEncoder`` / ``SparseEncoder`` built from now on end
    its ``__init__`` with ``enable_fast(self, **defaults)``, and install the trainer integration.

    ``lora`` defaults to ``FASTST_LORA`` (read when each model is built); the other options default to
    the ``FASTST_*`` variables, as in ``enable_fast``. Unknown options raise ``TypeError`` here, once.
    Calling it again only replaces the defaults. :func:`unpatch_classes` undoes it.
    """
    global _patches, _lora, _options
    from .config import resolve_options

    lora = defaults.pop("lora", _FROM_ENV)
    resolve_options(**defaults)  # fail now, loudly, on a misspelt option or a bad value
    _lora, _options = lora, defaults

    if _patches is None:
        import sentence_transformers

        patches = PatchSet()
        for name in PATCHED_CLASSES:
            cls = getattr(sentence_transformers, name)
            patches.set(cls, "__init__", _wrap_init(cls.__init__))
        _patches = patches
        logger.debug(f"patched the constructors of {', '.join(PATCHED_CLASSES)}")

    from . import training

    training.install_trainer_integration()


def unpatch_classes() -> None:
    """Undo :func:`patch_classes`: the constructors are the original functions again and the trainer
    integration is uninstalled. Models already built stay as they are. Idempotent."""
    global _patches, _lora, _options
    if _patches is None:
        return
    _patches.revert()
    _patches, _lora, _options = None, _FROM_ENV, {}

    from . import training

    training.uninstall_trainer_integration()


def _wrap_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        building = _local.__dict__.setdefault("building", set())
        # A subclass __init__ calling super().__init__ (or one patched class building on another)
        # reaches here twice for one object: only the outermost call enables.
        outermost = id(self) not in building
        if outermost:
            building.add(id(self))
        try:
            original(self, *args, **kwargs)
        finally:
            if outermost:
                building.discard(id(self))
        if outermost and not getattr(_local, "enabling", False):
            _enable(self)

    __init__.__fastst_original__ = original
    return __init__


def _enable(model) -> None:
    from .api import disable_fast, enable_fast
    from .config import env_lora

    _local.enabling = True
    try:
        lora = env_lora() if _lora is _FROM_ENV else _lora
        enable_fast(model, lora=lora, **_options)
    except Exception as exc:  # noqa: BLE001 - the user's script must go on with a stock model
        warn_once(f"could not make this {type(model).__name__} fast ({type(exc).__name__}: {exc}); it stays stock")
        try:
            disable_fast(model)
        except Exception:  # noqa: BLE001
            pass
    finally:
        _local.enabling = False
