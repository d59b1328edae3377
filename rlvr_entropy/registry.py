"""A name -> object registry with a duplicate guard and helpful lookup errors.

Used for entropy-control methods (``rlvr_entropy.methods.METHODS``). Registry keys are the
snake_case file names of the methods; there are no hyphenated aliases, so one spelling works
everywhere (YAML, CLI, logs).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


def closest(name: str, choices: list[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest valid choice, or an empty string."""
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


class Registry(Generic[T]):
    """Maps names to objects registered with the :meth:`register` decorator.

    Registering a different object under a taken name raises (registering the same object twice
    is a no-op, so re-importing a module is harmless). A name containing a dot is imported as
    ``package.module.Object`` (or ``package.module:Object``), so out-of-tree methods need no edit
    here.
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
        if "." in name or ":" in name:
            module_name, _, attr = name.replace(":", ".").rpartition(".")
            try:
                return getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as err:
                raise ValueError(f"cannot import {self.kind} '{name}': {err}") from err
        valid = sorted(self._items)
        raise ValueError(
            f"unknown {self.kind} '{name}'.{closest(name, valid)} Valid names: {', '.join(valid) or '(none)'}"
        )

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
