"""Reversible attribute patches: every change fastst makes to an object can be undone exactly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_MISSING = object()


@dataclass
class PatchSet:
    """Records ``setattr`` calls so that ``revert()`` restores the previous state, in reverse order.

    Instance patches shadow a class attribute with an instance attribute; reverting deletes the
    instance attribute again, so the object falls back to its class's code exactly as before.
    """

    _records: list[tuple[Any, str, Any]] = field(default_factory=list)

    def set(self, obj: Any, name: str, value: Any) -> None:
        previous = obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else getattr(obj, name, _MISSING)
        self._records.append((obj, name, previous))
        setattr(obj, name, value)

    def on_revert(self, undo) -> None:
        """Run ``undo()`` when reverting (for changes that are not a plain attribute)."""
        self._records.append((undo, None, None))

    def revert(self) -> None:
        while self._records:
            obj, name, previous = self._records.pop()
            if name is None:
                obj()
            elif previous is _MISSING:
                try:
                    delattr(obj, name)
                except AttributeError:
                    pass
            else:
                setattr(obj, name, previous)

    def __len__(self) -> int:
        return len(self._records)
