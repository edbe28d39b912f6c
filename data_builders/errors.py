"""The one base class of a user's mistake (a bad recipe value, row, path or setting), at the lowest layer.

Everything that names a mistake the user can fix derives from `UserError`, so `align` prints it as one
`align: ...` line with exit code 2; anything else is our bug and keeps its traceback. It derives from
`ValueError` so callers that caught ValueError keep working; a subclass may add `KeyError` or `TypeError`
for the same reason.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's recipe, data or paths; the message names the key, file, row or path to fix."""

    def __str__(self) -> str:  # KeyError would print the repr of its message; a user error prints the message
        return str(self.args[0]) if self.args else ""


class UserKeyError(UserError, KeyError):
    """A name the user gave that nothing knows (a condition, a loss); still a KeyError for callers that catch one."""


class UserTypeError(UserError, TypeError):
    """A user's choice of the wrong kind of thing (e.g. a slow tokenizer); still a TypeError for callers that catch one."""
