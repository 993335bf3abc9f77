"""Settings read from the environment rather than the config: waits a machine sets for its own services
($DDPM_CONNECT_TIMEOUT_S, $DDPM_LOCK_WAIT_S, ...), refused in one line when they are bad input."""

from __future__ import annotations

import os

from ddpm.errors import UserError


def env_seconds(variable: str, default: float, high: float) -> float:
    """A wait read from the environment: unset is `default`; a value that is not a number of seconds in
    (0, high] is bad input like any config value."""
    text = os.environ.get(variable, "")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= high:
        raise UserError(f"{variable}={text!r} must be a number of seconds in (0, {high:g}]")
    return value
