"""Errors a user can act on. The CLI prints them without a traceback and exits with code 2."""

from __future__ import annotations


class FedshiftError(Exception):
    """Base class of every error caused by the user's input rather than by a bug."""


class ScenarioError(FedshiftError):
    """A scenario is invalid. ``problems`` holds one ``(key path, message)`` pair per problem."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"{source}: " if source else ""
        lines = [f"{path or '<root>'}: {msg}" for path, msg in problems]
        super().__init__(head + ("invalid scenario\n  " if len(lines) > 1 else "") + "\n  ".join(lines))


class DatasetUnavailable(FedshiftError):
    """A dataset cannot be loaded here (offline, missing optional package, missing local files)."""


class PluginError(FedshiftError):
    """A dotted plugin path could not be imported or does not name the right kind of object."""
