"""Name registries: schedules, datasets, models, server strategies, client training strategies.

Every pluggable component is found by a short name written in the scenario YAML. A name that contains a dot
(``mypkg.module:Class`` or ``mypkg.module.Class``) is imported instead, and only then: plugins load from
dotted paths the user wrote, nothing else is imported implicitly. A plugin path is Python identifiers only: a
module path (``pkg.sub``, no leading dot, so never a relative import) and one attribute name; anything else
(``../x``, ``.foo``, ``a..b:C``, ``:C``, ``x:``) is an unknown name like any other.
"""

from __future__ import annotations

import importlib
import keyword
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from fedshift.core.errors import PluginError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to components of one kind, filled by the ``register`` decorator."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, obj: T | str) -> T | Callable[[T], T]:
        """``@REGISTRY.register`` on a class registers it under its ``name`` attribute (one spelling of the
        name); ``@REGISTRY.register("name")`` names a component that has no ``name`` attribute (a function)."""
        if isinstance(obj, str):
            return lambda target: self._add(obj, target)
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{obj!r} has no 'name' attribute to register it under; give it one, or write "
                            f"@register('<name>')")
        return self._add(name, obj)

    def _add(self, name: str, obj: T) -> T:
        own = getattr(obj, "name", name)
        if isinstance(own, str) and own != name:
            raise ValueError(f"{self.kind} {obj!r} is registered as {name!r} but its name attribute is {own!r}")
        if name in self._items and self._items[name] is not obj:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj
        return obj

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


PLUGIN_PATH_FORM = "package.module:Class"


def _is_dotted(name: str) -> bool:
    return split_plugin_path(name) is not None


def _is_identifier(part: str) -> bool:
    return part.isidentifier() and not keyword.iskeyword(part)


def split_plugin_path(path: object) -> tuple[str, str] | None:
    """``(module, attribute)`` of a legal plugin path, else None. Legal: ``pkg.mod:Name`` or ``pkg.mod.Name``
    where every part is a Python identifier (not a keyword): no empty part, no leading dot (a relative
    import), no slashes, spaces or second colon."""
    if not isinstance(path, str) or path.count(":") > 1:
        return None
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not _is_identifier(attr) or not all(_is_identifier(p) for p in module_name.split(".")):
        return None
    return module_name, attr


def load_dotted(path: str, kind: str = "plugin"):
    """Import ``package.module:attr`` (or ``package.module.attr``) and return the attribute.

    Raises PluginError, never anything else, for a path that is not of that form, a module that cannot be
    imported (or raises while it is imported) and a missing attribute."""
    parts = split_plugin_path(path)
    if parts is None:
        raise PluginError(f"{kind} {path!r} is not a dotted path of the form {PLUGIN_PATH_FORM!r} "
                          "(Python identifiers separated by dots, then ':' and a name)")
    module_name, attr = parts
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"{kind} {path!r}: cannot import module {module_name!r} ({exc})") from exc
    except Exception as exc:  # a plugin module that fails while it is imported
        raise PluginError(f"{kind} {path!r}: importing module {module_name!r} failed "
                          f"({type(exc).__name__}: {exc})") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise PluginError(f"{kind} {path!r}: module {module_name!r} has no attribute {attr!r}") from None
    except Exception as exc:  # a module __getattr__ that raises something else
        raise PluginError(f"{kind} {path!r}: reading {attr!r} from module {module_name!r} failed "
                          f"({type(exc).__name__}: {exc})") from exc


def first_doc_line(obj: object) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""

