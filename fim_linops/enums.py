"""Names the user may pass as strings, parsed into enums with one error convention."""

from __future__ import annotations

import enum
from typing import TypeVar

E = TypeVar("E", bound="ParsedEnum")


class ParsedEnum(enum.Enum):
    """An enum of lower-case names; :meth:`parse` takes a member or its name (any case)."""

    @classmethod
    def _kind(cls) -> str:
        """What the value is called in messages (the argument name)."""
        return cls.__name__

    @classmethod
    def _choices(cls) -> str:
        """What to use instead, after "use" in the error message."""
        return "one of " + ", ".join(repr(m.value) for m in cls)

    @classmethod
    def parse(cls: type[E], value: str | E) -> E:
        if isinstance(value, cls):
            return value
        if not isinstance(value, str):
            raise TypeError(
                f"{cls._kind()} must be a name or fim_linops.{cls.__name__}, "
                f"got {type(value).__name__}"
            )
        try:
            return cls(value.lower())
        except ValueError:
            raise ValueError(f"unknown {cls._kind()} {value!r}; use {cls._choices()}") from None
