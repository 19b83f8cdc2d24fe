"""The ``key=value`` words of every command: the command's own keys and Hydra overrides."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from m2diff.config import ConfigError


def truthy(value: str | None) -> bool:
    """``1``, ``true``, ``yes``, ``on`` (any case) are true; anything else is false."""
    return str(value).lower() in ("1", "true", "yes", "on")


def parse_words(
    words: Sequence[str], keys: Collection[str], dashes: bool = True, what: str = ""
) -> tuple[dict[str, str], list[str]]:
    """Split ``key=value`` words into the command's own ``keys`` and the rest (Hydra
    overrides, in their order). With ``dashes`` a key may be spelled with ``_`` or ``-``
    (``log_dir=`` is ``log-dir=``). ConfigError for a word without ``=`` (``what`` says
    where to look for help)."""
    args: dict[str, str] = {}
    overrides: list[str] = []
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            raise ConfigError(f"'{word}' is not key=value{what}")
        name = key.replace("_", "-") if dashes else key
        if name in keys:
            args[name] = value
        else:
            overrides.append(word)
    return args, overrides
