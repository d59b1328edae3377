"""Names in YAML -> objects: one registry class and one importer for every ``pkg.module:attr`` lookup.

Used for entropy-control methods (``rlvr_entropy.methods.METHODS``) and reward functions
(``rlvr_entropy.tasks.rewards.REWARDS``); ``import_object`` also resolves the answer extractor.
Registry keys are the snake_case file or function names; there are no hyphenated aliases, so one
spelling works everywhere (YAML, CLI, logs).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def closest(name: str, choices: list[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest valid choice, or an empty string."""
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def is_import_path(name: str) -> bool:
    """Whether ``name`` reads as an import path rather than a registry key."""
    return "." in name or ":" in name


def import_object(path: str, kind: str = "object") -> Any:
    """Import ``"pkg.module:attr"`` or ``"pkg.module.attr"``; a ValueError naming ``kind`` if that fails."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"cannot import {kind} '{path}': expected 'pkg.module:name' or 'pkg.module.name'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {kind} '{path}': {err}") from err


class Registry(Generic[T]):
    """Maps names to objects registered with the :meth:`register` decorator.

    Registering a different object under a taken name raises (registering the same object twice
    is a no-op, so re-importing a module is harmless). A name containing a dot or a colon is
    imported (:func:`import_object`), so out-of-tree objects need no edit here.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            owner = self._items.get(name)
            if owner is not None and owner is not obj:
                raise ValueError(f"{self.kind} name '{name}' is already registered to {owner!r}")
            self._items[name] = obj
            if isinstance(obj, type):
                obj.name = name  # type: ignore[attr-defined]
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        if is_import_path(name):
            return import_object(name, self.kind)
        valid = sorted(self._items)
        raise ValueError(
            f"unknown {self.kind} '{name}'.{closest(name, valid)} Valid names: {', '.join(valid) or '(none)'}, "
            "or an import path 'pkg.module:name'"
        )

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
