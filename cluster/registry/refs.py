"""Model names, aliases and references: ``name``, ``name:3``, ``name@production``.

Names and aliases are single path components from a small alphabet, so a name can never
escape the registry root (``../x``, ``/etc``, ``a/b`` and the empty string are refused).
``latest`` is a virtual alias (the highest version) and cannot be promoted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cluster.errors import RetortError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
ALIAS_RE = NAME_RE
LATEST = "latest"


class RefError(RetortError):
    """A malformed name, alias or reference (exit 2)."""


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise RefError(
            f"invalid model name {name!r}: use 1-64 of a-z 0-9 . _ - starting with a letter or digit "
            "(no slashes, no '..')"
        )
    return name


def check_alias(alias: object) -> str:
    if not isinstance(alias, str) or not ALIAS_RE.match(alias) or alias.isdigit():
        raise RefError(
            f"invalid alias {alias!r}: use 1-64 of a-z 0-9 . _ - starting with a letter or digit, not all digits"
        )
    return alias


@dataclass(frozen=True, order=True)
class ModelRef:
    """One immutable version of a model; ``str(ref) == "name:3"``."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class ParsedRef:
    """A reference as written: exactly one of ``version`` / ``alias`` or neither (= latest)."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def parse_ref(ref: object) -> ParsedRef:
    """``"m"`` -> latest, ``"m:3"`` -> version 3, ``"m@prod"`` -> alias (``"m@latest"`` = latest)."""
    if isinstance(ref, ModelRef):
        return ParsedRef(ref.name, version=ref.version)
    if not isinstance(ref, str) or not ref.strip():
        raise RefError(f"invalid model reference {ref!r}: expected NAME, NAME:VERSION or NAME@ALIAS")
    ref = ref.strip()
    if "@" in ref:
        name, _, alias = ref.partition("@")
        check_name(name)
        if alias == LATEST:
            return ParsedRef(name)
        return ParsedRef(name, alias=check_alias(alias))
    if ":" in ref:
        name, _, v = ref.partition(":")
        check_name(name)
        if v == LATEST:
            return ParsedRef(name)
        if not v.isdigit() or int(v) < 1:
            raise RefError(f"invalid version {v!r} in {ref!r}: versions are integers >= 1")
        return ParsedRef(name, version=int(v))
    return ParsedRef(check_name(ref))
