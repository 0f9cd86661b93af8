"""Reading trigger parameters the way the real clients send them.

triggerservice.py (the MWA's client library) puts ``project_id`` and ``obsname``
in the query string and the rest in a form-encoded body that it labels
``Content-Type: application/json``; it writes Python lists with ``str()``, so
source names arrive single-quoted (``['Sun', 'Moon']``) and numpy floats may
arrive as ``np.float64(1.5)``. Other callers send real JSON, or everything in
the URL, or a multipart form (``curl -F``). All of these are merged here
(specs/trigger.md section 4.1). A body that is none of these is refused, never
read as nothing: the caller would otherwise get errors about default values.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import Message

from observatory.core.text import is_ascii_integer
from observatory.core.web import loads_request_json
from observatory.telescope.instrument import metafits_text_problem

TRUE_WORDS = frozenset({"true", "1", "y", "yes", "on", "t"})
FALSE_WORDS = frozenset({"false", "0", "n", "no", "off", "f"})
#: What a client writes for a value it did not set: Python's ``str(None)`` (a client that
#: passes an unset argument on), JSON's null, nothing. They mean "the default", never false:
#: ``pretend=None`` must not trigger for real.
UNSET_WORDS = frozenset({"", "none", "null"})
#: A form field's name (every trigger parameter is one); random bytes labelled JSON are not.
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_MULTIPART = "multipart/form-data"
#: A trigger takes some 25 parameters; a form (multipart or urlencoded) is refused far
#: beyond that.
MAX_FORM_FIELDS = 1000
_NUMPY_SCALAR = re.compile(r"np\.(?:float|int)\d*\(([^()]*)\)")
#: Bodies above this many bytes are parsed in a worker thread: unescaping a form is Python
#: work per %-escape (some 0.7 s for a 1 MiB form of raw UTF-8), which must not hold up
#: the event loop.
_PARSE_IN_THREAD_BYTES = 64 << 10
#: No trigger parameter is meaningful beyond this (2**53, the largest whole number a float
#: holds exactly); it keeps times and ids computed from them inside a database integer.
LARGEST_NUMBER = 2.0**53


class ParameterError(ValueError):
    """A parameter that cannot be read; the message names it."""


async def read_request_parameters(request: Request) -> dict[str, Any]:
    """The parameters of a request: its query string merged with its body.

    A ``multipart/form-data`` body (``curl -F``) is read as a form; any other body by
    :func:`merge_request_parameters`, whatever its ``Content-Type`` says. Any body is read
    only up to :data:`~observatory.core.errors.MAX_FORM_BODY_BYTES` as sent (by
    :class:`~observatory.core.errors.CheckFormParameters`).

    Parameters
    ----------
    request
        The HTTP request.

    Returns
    -------
    dict
        Parameter name to value (a list for a key given several times).

    Raises
    ------
    ParameterError
        If the body cannot be read, or a multipart field is a file.
    observatory.core.errors.PayloadTooLarge
        If the body is larger than any request's may be.
    """
    query = list(request.query_params.multi_items())
    content_type = request.headers.get("content-type", "").strip().lower()
    # Held to the limit as sent by the middleware, whatever its type (triggerservice.py
    # labels its forms JSON); a form may have been made up to three times longer there,
    # by the escape of its raw UTF-8.
    body = await request.body()
    if not content_type.startswith(_MULTIPART):
        if len(body) > _PARSE_IN_THREAD_BYTES:
            return await run_in_threadpool(merge_request_parameters, query, body)
        return merge_request_parameters(query, body)
    replayed = False

    async def replay() -> Message:  # the body already read, for the multipart parser
        nonlocal replayed
        if replayed:
            return {"type": "http.disconnect"}
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(
            max_files=MAX_FORM_FIELDS, max_fields=MAX_FORM_FIELDS
        )
    except HTTPException as exc:  # starlette's answer to a malformed multipart body
        raise ParameterError(f"the multipart/form-data body cannot be read: {exc.detail}") from exc
    try:
        fields: list[tuple[str, str]] = []
        for key, value in form.multi_items():
            if not isinstance(value, str):
                raise ParameterError(f"{key}: a file was uploaded; give the value as text")
            fields.append((key, value))
    finally:
        await form.close()  # an uploaded file's spool: this Request is not closed for us
    return merge_request_parameters(query, b"", form=fields)


def merge_request_parameters(
    query: Sequence[tuple[str, str]], body: bytes, *, form: Sequence[tuple[str, str]] = ()
) -> dict[str, Any]:
    """Query-string and body parameters in one dict (the body wins on a clash).

    The body is read as JSON when it is a JSON object, otherwise as a form
    (whatever ``Content-Type`` says: triggerservice.py labels its forms JSON). A key given
    several times becomes a list. ``group_id`` (triggerservice.py's name) is renamed
    ``groupid`` (the wiki's); given both, with values that differ, both are kept, for the
    trigger to refuse (:func:`conflicting_group_ids`) rather than one silently winning.

    Parameters
    ----------
    query
        The query string's (name, value) pairs.
    body
        The request body, unread.
    form
        Fields already read from a multipart body (then ``body`` is empty).

    Returns
    -------
    dict
        Parameter name to value.

    Raises
    ------
    ParameterError
        If the body is neither a JSON object nor a form (invalid JSON, another JSON
        value, text that is not ``name=value&...``, bytes that are not UTF-8), or a
        value holds NUL.
    """
    merged: dict[str, Any] = {}
    _add_pairs(merged, query)
    _add_pairs(merged, form)
    try:
        text = body.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ParameterError(
            "the request body is not UTF-8 text: neither a JSON object nor a form"
        ) from None
    if text:
        merged.update(_read_body(text))
    _merge_group_id(merged)
    if _holds_nul(merged):  # PostgreSQL refuses NUL in text
        raise ParameterError("parameters must not contain NUL characters")
    return merged


def _merge_group_id(merged: dict[str, Any]) -> None:
    """``group_id`` renamed ``groupid``, unless both were given with different values."""
    if "group_id" not in merged:
        return
    if not present(merged, "group_id"):  # unset: as if not sent, whatever groupid says
        del merged["group_id"]
    elif not present(merged, "groupid"):
        merged["groupid"] = merged.pop("group_id")
    elif same_value(merged["group_id"], merged["groupid"]):
        del merged["group_id"]


def same_value(first: Any, second: Any) -> bool:
    """Whether two sendings of a parameter say the same (``"111"`` and JSON's 111 do)."""
    return bool(decode_value(first) == decode_value(second))


def conflicting_group_ids(params: Mapping[str, Any]) -> str | None:
    """The error when ``group_id`` and ``groupid`` were both given, with different values.

    They are one parameter under two names (the client posts ``group_id``, the wiki
    documents ``groupid``): two values for it are refused, as one parameter given twice is.

    Parameters
    ----------
    params
        The merged parameters (:func:`merge_request_parameters`).

    Returns
    -------
    str or None
        The message naming both and their values, or None when there is no conflict.
    """
    if not (present(params, "group_id") and present(params, "groupid")):
        return None
    first, second = params["group_id"], params["groupid"]
    if same_value(first, second):
        return None
    return (f"group_id and groupid: given both, with different values ({echo_text(first)!r} "
            f"and {echo_text(second)!r}); they are one parameter, the obsid of the group's "
            "first observation: give one")  # fmt: skip


def _read_body(text: str) -> dict[str, Any]:
    """A body's parameters: a JSON object, or a form; anything else is refused."""
    try:
        document = loads_request_json(text)
    except ValueError as exc:
        if text.startswith(("{", "[")):
            raise ParameterError(f"the request body is not valid JSON: {exc}") from exc
    else:
        # A JSON string or number is never a form either ('"project_id=D0000"').
        if not isinstance(document, dict):
            raise ParameterError("a JSON request body must be an object")
        return document
    pieces = [piece for piece in text.split("&") if piece]
    if len(pieces) > MAX_FORM_FIELDS:  # as a multipart form (each field is Python work)
        raise ParameterError(
            f"the request body is a form of {len(pieces)} fields; at most {MAX_FORM_FIELDS} "
            "are allowed"
        )
    for piece in pieces:
        name, equals, _ = piece.partition("=")
        if not equals or not _FIELD_NAME.fullmatch(unquote_plus(name)):
            raise ParameterError(
                f"the request body is neither a JSON object nor a form (name=value&...): "
                f"{piece[:40]!r} is not a form field"
            )
    try:
        pairs = parse_qsl(text, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise ParameterError(
            "the request body is a form whose %-escapes are not UTF-8 text"
        ) from None
    merged: dict[str, Any] = {}
    _add_pairs(merged, pairs)
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
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        # TypeError: a literal that cannot be built ("[{[]: 1}]", an unhashable key)
        return text


def as_bool(name: str, value: Any, *, default: bool | None = None) -> bool:
    """A boolean, an integer (non-zero is true) or a word: true/false, y/n, yes/no, on/off, t/f.

    The wiki's rule for ``current`` ("true: a non-zero integer") and for ``pretend``,
    ``avoidsun`` and ``calibrator`` ("Boolean, integer, or string").

    Parameters
    ----------
    name
        The parameter, for messages.
    value
        What was sent.
    default
        The value of an unset one: None, or empty, ``none`` or ``null`` in any case
        (``UNSET_WORDS``). Without a default these are refused.

    Raises
    ------
    ParameterError
        For anything else, and for a number that is not finite or is beyond 2**53.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in UNSET_WORDS):
        if default is None:
            raise ParameterError(f"{name}: {value!r} is not a boolean (use true or false)")
        return default
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
    if is_ascii_integer(text):  # at most MAX_DIGITS: int() refuses over 4,300
        if abs(int(text)) > LARGEST_NUMBER:
            raise ParameterError(f"{name}: {value!r} is out of range")
        return int(text) != 0
    raise ParameterError(
        f"{name}: {value!r} is not a boolean (use true/false, an integer, y/n, on/off)"
    )


def is_bool_word(value: Any) -> bool:
    """Whether ``value`` is meant as a boolean (``calibrator`` is a boolean or a source name).

    Booleans, numbers, integers written out, the words ``as_bool`` knows, and the
    words of an unset value (``calibrator=None`` is the default, not a source named None).
    """
    if value is None or isinstance(value, bool | int | float):
        return True
    text = str(value).strip().lower()
    return text in TRUE_WORDS | FALSE_WORDS | UNSET_WORDS or is_ascii_integer(text)


def as_text(
    name: str, value: Any, *, max_chars: int | None = None, printable_ascii: bool = False
) -> str:
    """One text value (a name), without the spaces around it.

    Parameters
    ----------
    name
        The parameter, for messages.
    value
        What was sent: a string, or a JSON number (written as JSON).
    max_chars
        The most characters it may have (a column's width, a metafits card's), if limited.
    printable_ascii
        Whether it ends up in a FITS header, which holds printable ASCII only.

    Returns
    -------
    str
        The value.

    Raises
    ------
    ParameterError
        For a list (several values, or a JSON list) or object, a character a FITS header
        cannot hold, or more than ``max_chars`` characters. Never cut short in silence.
    """
    if isinstance(value, list | tuple):
        raise ParameterError(f"{name}: given {len(value)} values ({echo_text(value)}); give one")
    if isinstance(value, dict):
        raise ParameterError(f"{name}: {echo_text(value)} is a JSON object, not one value")
    text = (value if isinstance(value, str) else echo_text(value)).strip()
    limit = len(text) if max_chars is None else max_chars
    if printable_ascii:
        problem = metafits_text_problem(text, limit)
    else:
        problem = (
            f"{len(text)} characters; at most {limit} are allowed" if len(text) > limit else None
        )
    if problem:
        raise ParameterError(f"{name}: {problem}")
    return text


def echo_text(value: Any) -> str:
    """A value as text for the reply and the record: itself if a string, else its JSON.

    Never a Python repr (``['D0000']``), which no client reads back.
    """
    return value if isinstance(value, str) else json.dumps(value, default=str)


def as_float_list(name: str, value: Any, *, max_items: int | None = None) -> list[float]:
    """One number or a list of numbers (JSON, Python list, or repeated keys).

    Parameters
    ----------
    name
        The parameter, for messages.
    value
        What was sent.
    max_items
        The most values it may hold, if limited.

    Raises
    ------
    ParameterError
        Naming the value that is not a number, or the number of values and ``max_items``
        when there are more (before any is read as a number).
    """
    return [float(as_number(name, item)) for item in _as_list(name, value, max_items)]


def as_str_list(
    name: str, value: Any, *, max_items: int | None = None, blank_ok: bool = True
) -> list[str]:
    """One string or a list of strings (JSON, single-quoted Python list, repeated keys).

    Parameters
    ----------
    name
        The parameter, for messages.
    value
        What was sent.
    max_items
        The most values it may hold, if limited.
    blank_ok
        Whether an item that is empty or only spaces is left out (else it is refused: a
        source name lost on its way must not be read as no source).

    Raises
    ------
    ParameterError
        Naming a value that is not a name (or is blank, unless ``blank_ok``), or the number
        of values and ``max_items`` when there are more.
    """
    items = _as_list(name, value, max_items)
    strings = []
    for item in items:
        if not isinstance(item, str | int | float) or isinstance(item, bool):
            raise ParameterError(f"{name}: {item!r} is not a name")
        text = str(item).strip()
        if text:
            strings.append(text)
        elif not blank_ok:
            raise ParameterError(f"{name}: {item!r} is a blank name (nothing but spaces)")
    return strings


def is_blank(value: Any) -> bool:
    """Whether ``value`` is text of spaces only (``" "``, a no-break space): not empty.

    :func:`present` reads it as not given, as it reads ``""``; where that would change
    what is done (a target lost makes ``triggervcs`` capture the whole sky) it is refused.
    """
    return isinstance(value, str) and value != "" and not value.strip()


def _as_list(name: str, value: Any, max_items: int | None = None) -> list[Any]:
    """The values of a list parameter, refused as soon as there are more than ``max_items``:
    counted before each repeated key's value is decoded, and again once flattened."""
    if isinstance(value, list | tuple):
        _check_count(name, len(value), max_items)
        items = [item for part in value for item in _as_list(name, decode_value(part), max_items)]
    else:
        decoded = decode_value(value)
        if isinstance(decoded, list | tuple):
            items = list(decoded)
        elif decoded is None or decoded == "":
            items = []
        else:
            items = [decoded]
    _check_count(name, len(items), max_items)
    return items


def _check_count(name: str, count: int, max_items: int | None) -> None:
    if max_items is not None and count > max_items:
        raise ParameterError(f"{name}: {count} values; at most {max_items} are allowed")


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
    """Whether ``name`` was given with a value: empty, ``None`` or ``null``
    (``UNSET_WORDS``, what a client sends for an argument it did not set) mean "not given",
    so the parameter takes its default."""
    value = params.get(name)
    return value is not None and not (
        isinstance(value, str) and value.strip().lower() in UNSET_WORDS
    )
