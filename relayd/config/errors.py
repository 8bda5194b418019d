"""Configuration problems, and the key paths that locate them.

A problem is reported as ``path: message``, where the path names the offending key the
way a reader finds it in the file: ``providers[0].backends[1].weight``. Messages never
quote a secret (API keys, token and password file contents, environment values).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ROOT_PATH", "ConfigError", "ConfigErrors", "item_path", "key_path", "os_reason"]

ROOT_PATH = "(top level)"  # the error path used for the document itself


class ConfigError(Exception):
    """One problem in the configuration, located by its key path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(path, message)
        self.path = path
        self.message = message

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ConfigErrors(Exception):  # noqa: N818 (the public name is part of the API)
    """Every problem found in one configuration; ``str()`` lists one per line."""

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        self.errors: list[ConfigError] = list(errors)
        super().__init__(self.errors)

    def __str__(self) -> str:
        return "\n".join(str(error) for error in self.errors)


def key_path(path: str, key: object) -> str:
    """The path of ``key`` inside the mapping at ``path`` ("" is the document)."""
    return f"{path}.{key}" if path else str(key)


def item_path(path: str, index: int) -> str:
    """The path of item ``index`` of the list at ``path``."""
    return f"{path}[{index}]"


def os_reason(exc: OSError | ValueError) -> str:
    """Why a file could not be opened, without repeating its name.

    ``open`` raises ValueError for a path containing a NUL character.
    """
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return "invalid path" if isinstance(exc, ValueError) else type(exc).__name__
