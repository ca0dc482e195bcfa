"""The errors a user can fix, at the bottom of the layers (docs/architecture.md).

A ``UserError`` means the input, an option or the set-up is wrong and its message says what to
do; the app and the CLI show exactly these as messages. Any other exception is a bug and keeps
its traceback. The subclasses below also derive from the built-in type their callers expect.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

E = TypeVar("E", bound=Enum)


class UserError(Exception):
    """Something the user can fix; the message says how."""


class OptionError(UserError, ValueError):
    """An option, argument or setting with a value that is not allowed."""


class GenerationStopped(RuntimeError):
    """A generation was asked to stop (its step callback returned ``False``: Stop was pressed, or no
    one waits for the answer any more). Every model family raises this one; it is no error."""


def enum_option(cls: type[E], value, name: str) -> E:
    """``cls(value)``, or an ``OptionError`` that names the option and lists the allowed values."""
    try:
        return cls(value)
    except ValueError:
        raise OptionError(f"{name} must be one of {', '.join(m.value for m in cls)}; got {value!r}") from None
