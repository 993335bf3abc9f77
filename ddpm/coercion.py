"""How a value written by hand becomes a config field's declared type: a `--set` string, or a TOML or JSON value
(a config file, or a config saved by `Config.to_json`), each refused in one line naming the key when it cannot."""

from __future__ import annotations

import re
import types
import typing
from typing import Any

from ddpm.schema import ConfigError


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Turn a parsed file value or a `--set` string into the field's declared type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        unset = ("none", "null", "", "auto") if inner is bool else ("none", "null", "")  # bool | None: None is auto
        if value is None or (isinstance(value, str) and value.lower() in unset):
            return None
        if inner is bool and not isinstance(value, bool) and str(value).lower() not in BOOL_WORDS:
            raise ConfigError(f"{key}={value!r}: use true, false or auto")
        return coerce(value, inner, key)
    if origin is typing.Literal:  # its choices are checked, with their one-line refusal, by `validate`
        return str(value)
    if origin is tuple and args[-1] is not Ellipsis:
        return _pair(value, key)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("()[] ").split(",") if v.strip()]
        return tuple(coerce(v, args[0], key) for v in value)
    if isinstance(value, bool) and annotation is not bool:  # JSON's true is no number of epochs
        raise ConfigError(f"{key}={value!r} is not a valid {annotation.__name__}")
    if isinstance(value, (dict, list)) and annotation in (bool, int, float, str):
        raise ConfigError(f"{key}={value!r} is not a valid {annotation.__name__}")
    try:
        if annotation is bool:
            return value if isinstance(value, bool) else BOOL_WORDS[str(value).lower()]
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(str(value).replace("_", "")) if isinstance(value, str) else int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return str(value)
    except (TypeError, ValueError, KeyError):
        raise ConfigError(f"{key}={value!r} is not a valid {annotation.__name__}") from None
    return value


BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _pair(value: Any, key: str) -> tuple[int, int]:
    """A (min, max) pair as written by hand: 2, [1, 4], "1-4" (the old train.num_workers form) or "(1, 4)"."""
    if isinstance(value, str):
        found = re.fullmatch(r"\s*[\[(]?\s*(\d+)\s*(?:[-,]\s*(\d+)\s*)?[\])]?\s*", value)
        if found:
            return int(found[1]), int(found[2] or found[1])
    elif isinstance(value, int) and not isinstance(value, bool):
        return value, value
    elif isinstance(value, (list, tuple)) and len(value) in (1, 2) and \
            all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value[0], value[-1]
    raise ConfigError(f"{key}={value!r}: write a count (2), or a range MIN-MAX for elastic training ([1, 4] or "
                      '"1-4")')
