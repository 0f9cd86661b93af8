"""Reading trigger parameters the way the real clients send them.

triggerservice.py (the MWA's client library) puts ``project_id`` and ``obsname``
in the query string and the rest in a form-encoded body that it labels
``Content-Type: application/json``; it writes Python lists with ``str()``, so
source names arrive single-quoted (``['Sun', 'Moon']``) and numpy floats may
arrive as ``np.float64(1.5)``. Other callers send real JSON, or everything in
the URL. All of these are merged here (specs/trigger.md section 4.1).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

from observatory.core.web import loads_request_json

TRUE_WORDS = frozenset({"true", "1", "y", "yes", "on", "t"})
FALSE_WORDS = frozenset({"false", "0", "n", "no", "off", "f", "", "none"})
#: An integer written out (ASCII digits only: int() also reads other scripts' digits).
_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMPY_SCALAR = re.compile(r"np\.(?:float|int)\d*\(([^()]*)\)")
#: No trigger parameter is meaningful beyond this (2**53, the largest whole number a float
#: holds exactly); it keeps times and ids computed from them inside a database integer.
LARGEST_NUMBER = 2.0**53


class ParameterError(ValueError):
    """A parameter that cannot be read; the message names it."""


def merge_request_parameters(query: Sequence[tuple[str, str]], body: bytes) -> dict[str, Any]:
    """Query-string and body parameters in one dict (the body wins on a clash).

    The body is read as JSON when it is a JSON object, otherwise as a form
    (whatever ``Content-Type`` says: triggerservice.py labels its forms JSON). A key given several times becomes a list.
    ``group_id`` is renamed ``groupid``.

    Raises
    ------
    ParameterError
        If the body is neither a JSON object nor a form.
    """
    merged: dict[str, Any] = {}
    _add_pairs(merged, query)
    text = body.decode("utf-8", "replace").strip()
    if text.startswith(("{", "[")):
        try:
            document = loads_request_json(text)
        except ValueError as exc:
            raise ParameterError(f"the request body is not valid JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise ParameterError("a JSON request body must be an object")
        merged.update(document)
    elif text:
        _add_pairs(merged, parse_qsl(text, keep_blank_values=True))
    if "group_id" in merged:
        merged.setdefault("groupid", merged.pop("group_id"))
    if _holds_nul(merged):  # PostgreSQL refuses NUL in text
        raise ParameterError("parameters must not contain NUL characters")
    return merged


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(key) or _holds_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_holds_nul(item) for item in value)
    return False


def _add_pairs(merged: dict[str, Any], pairs: Sequence[tuple[str, str]]) -> None:
    seen: dict[str, list[str]] = {}
    for key, value in pairs:
        seen.setdefault(key, []).append(value)
    for key, values in seen.items():
        merged[key] = values[0] if len(values) == 1 else values


def decode_value(value: Any) -> Any:
    """A parameter's value: JSON, then a Python list literal (never eval), then the text itself.

    ``np.float64(1.5)`` (numpy >= 2's repr of a float) is read as 1.5.
    """
    if not isinstance(value, str):
        return value
    text = _NUMPY_SCALAR.sub(r"\1", value.strip())
    try:
        return loads_request_json(text)
    except ValueError:
        pass
    if not text.startswith("["):
        return text  # "145,24" is a freqspec, not a Python tuple
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def as_bool(name: str, value: Any) -> bool:
    """A boolean, an integer (non-zero is true) or a word: true/false, y/n, yes/no, on/off, t/f.

    The wiki's rule for ``current`` ("true: a non-zero integer") and for ``pretend``,
    ``avoidsun`` and ``calibrator`` ("Boolean, integer, or string").

    Raises
    ------
    ParameterError
        For anything else, and for a number that is not finite or is beyond 2**53.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        if not abs(value) <= LARGEST_NUMBER:  # NaN, infinities, huge
            raise ParameterError(f"{name}: {value!r} is out of range")
        return value != 0
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    if _INTEGER.fullmatch(text):
        if abs(int(text)) > LARGEST_NUMBER:
            raise ParameterError(f"{name}: {value!r} is out of range")
        return int(text) != 0
    raise ParameterError(
        f"{name}: {value!r} is not a boolean (use true/false, an integer, y/n, on/off)"
    )


def is_bool_word(value: Any) -> bool:
    """Whether ``value`` is meant as a boolean (``calibrator`` is a boolean or a source name).

    Booleans, numbers, integers written out and the words ``as_bool`` knows.
    """
    if isinstance(value, bool | int | float):
        return True
    text = str(value).strip().lower()
    return text in TRUE_WORDS | FALSE_WORDS or bool(_INTEGER.fullmatch(text))


def as_float_list(name: str, value: Any) -> list[float]:
    """One number or a list of numbers (JSON, Python list, or repeated keys).

    Raises
    ------
    ParameterError
        Naming the value that is not a number.
    """
    return [float(as_number(name, item)) for item in _as_list(value)]


def as_str_list(name: str, value: Any) -> list[str]:
    """One string or a list of strings (JSON, single-quoted Python list, repeated keys)."""
    items = _as_list(value)
    strings = []
    for item in items:
        if not isinstance(item, str | int | float) or isinstance(item, bool):
            raise ParameterError(f"{name}: {item!r} is not a name")
        text = str(item).strip()
        if text:
            strings.append(text)
    return strings


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, list | tuple):
        return [item for part in value for item in _as_list(decode_value(part))]
    decoded = decode_value(value)
    if isinstance(decoded, list | tuple):
        return list(decoded)
    if decoded is None or decoded == "":
        return []
    return [decoded]


def as_number(name: str, value: Any, *, integer: bool = False) -> float:
    """A single number (an integer when ``integer``).

    Raises
    ------
    ParameterError
        If the value is not one number (or not a whole number when required).
    """
    decoded = decode_value(value) if not isinstance(value, list) else value
    if isinstance(decoded, bool) or not isinstance(decoded, int | float):
        raise ParameterError(f"{name}: {value!r} is not a number")
    if not abs(decoded) <= LARGEST_NUMBER:  # json reads NaN and Infinity
        raise ParameterError(f"{name}: {value!r} is out of range")
    if integer and float(decoded) != int(decoded):
        raise ParameterError(f"{name}: {value!r} is not a whole number")
    return int(decoded) if integer else float(decoded)


def present(params: Mapping[str, Any], name: str) -> bool:
    """Whether ``name`` was given with a non-empty value (empty means "not given")."""
    value = params.get(name)
    return value is not None and not (isinstance(value, str) and not value.strip())
