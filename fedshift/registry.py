"""Name registries: schedules, datasets, models, server strategies, client training strategies.

Every pluggable component is found by a short name written in the scenario YAML. A name that contains a dot
(``mypkg.module:Class`` or ``mypkg.module.Class``) is imported instead, and only then: plugins load from
dotted paths the user wrote, nothing else is imported implicitly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import PluginError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to components of one kind, filled by the ``register`` decorator."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._items or _is_dotted(name))

    def __iter__(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._items.items()))

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        if _is_dotted(name):
            return load_dotted(name, self.kind)
        raise KeyError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names()) or '(none)'}")


def _is_dotted(name: str) -> bool:
    return ":" in name or "." in name


def load_dotted(path: str, kind: str = "plugin"):
    """Import ``package.module:attr`` (or ``package.module.attr``) and return the attribute."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise PluginError(f"{kind} {path!r} is not a dotted path of the form 'package.module:Name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"{kind} {path!r}: cannot import module {module_name!r} ({exc})") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise PluginError(f"{kind} {path!r}: module {module_name!r} has no attribute {attr!r}") from None


def first_doc_line(obj: object) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""

