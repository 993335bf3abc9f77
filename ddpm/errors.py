"""The one base class for errors a user can fix.

Every error the library raises for bad input (a config value, a data file, a checkpoint, a diverged run)
derives from `UserError`, and its message names the problem and the fix. The CLI prints such an error in one
line and exits 2; the flow does not retry it. Anything else is a bug or a transient fault.
"""


class UserError(Exception):
    """Bad input the user can fix; the message says which input and how."""


class ConfigError(UserError, ValueError):
    """A config value, file or override that cannot be used; the message says which and how to fix it."""


def first_line(exc: BaseException) -> str:
    """An exception's first line (library messages can run to many), or its type when it has no text."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
