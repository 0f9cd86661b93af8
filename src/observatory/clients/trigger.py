"""A client of the triggering web services, call for call like the MWA's ``triggerservice.py``.

The functions ``busy``, ``vcsfree``, ``obslist``, ``trigger`` and ``triggerbuffer``
take the arguments of the MWA's client library and send what it sends:
``project_id`` and ``obsname`` in the query string, everything else as a
form-encoded body labelled ``application/json``, lists of names as Python
``str()`` lists, ``freqspecs`` and subarrays as JSON. Like it, they return the
decoded JSON reply, or None (logged) on an HTTP or network error. The one
addition is ``base_url`` (default ``BASE_URL``, or ``OBSERVATORY_TRIGGER_URL``).

Example
-------
>>> from observatory.clients import trigger as ts
>>> ts.busy(project_id="G0055", obstime=600, base_url="http://127.0.0.1:8000/trigger/")  # doctest: +SKIP
False
"""

from __future__ import annotations

import http.client
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import urlencode
from urllib.request import Request, urlopen

log = logging.getLogger(__name__)

BASE_URL = os.environ.get("OBSERVATORY_TRIGGER_URL", "http://127.0.0.1:8000/trigger/")
TIMEOUT_S = 60.0


def web_api(
    url: str,
    urldict: Mapping[str, Any] | None = None,
    postdict: Mapping[str, Any] | None = None,
    logger: logging.Logger = log,
) -> Any:
    """GET (no ``postdict``) or POST a call; the decoded JSON reply, the text, or None on error."""
    if urldict:
        url += "?" + urlencode(urldict)
    data = urlencode(postdict).encode("latin-1") if postdict else None
    request = Request(url, data, {"Content-Type": "application/json", "Accept": "application/json"})
    try:
        with urlopen(request, timeout=TIMEOUT_S) as reply:
            text = reply.read().decode(reply.headers.get_content_charset() or "latin-1")
    except HTTPError as error:
        try:
            body = error.read()[:2000]
        except (OSError, http.client.HTTPException) as cut:  # the error's body cut short
            body = f"(unreadable: {cut!r})".encode()
        logger.error("HTTP error from %s: code=%d, response: %s", url, error.code, body)
        return None
    except (URLError, OSError, http.client.HTTPException) as error:
        # HTTPException: a reply cut short (IncompleteRead) or malformed.
        logger.error("URL or network error for %s: %s", url, error)
        return None
    except (UnicodeDecodeError, LookupError) as error:  # not the text (or charset) it says
        logger.error("unreadable reply from %s: %s", url, error)
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _url(base_url: str | None, endpoint: str) -> str:
    base = base_url or BASE_URL
    return (base if base.endswith("/") else base + "/") + endpoint


def busy(
    project_id: str | None = None,
    obstime: int | None = None,
    logger: logging.Logger = log,
    *,
    base_url: str | None = None,
) -> bool | None:
    """False if ``project_id`` may override the schedule for ``obstime`` seconds from now."""
    if project_id is None:
        logger.error("busy() must be passed a valid project_id")
        return None
    urldict: dict[str, Any] = {"project_id": project_id}
    if obstime is not None:
        urldict["obstime"] = obstime
    result: bool | None = web_api(_url(base_url, "busy"), urldict, logger=logger)
    return result


def vcsfree(logger: logging.Logger = log, *, base_url: str | None = None) -> int | None:
    """The most seconds of voltage capture a trigger may ask for now."""
    result: int | None = web_api(_url(base_url, "vcsfree"), {}, logger=logger)
    return result


def obslist(
    obstime: int | None = None, logger: logging.Logger = log, *, base_url: str | None = None
) -> list[list[Any]] | None:
    """Observations from now to now + ``obstime``: [start, stop, obsname, creator, project_id, mode, groupid]."""
    urldict = {"obstime": obstime} if obstime is not None else {}
    result: list[list[Any]] | None = web_api(_url(base_url, "obslist"), urldict, logger=logger)
    return result


def trigger(
    project_id: str | None = None,
    secure_key: str | None = None,
    group_id: int | None = None,
    ra: float | Sequence[float] | None = None,
    dec: float | Sequence[float] | None = None,
    alt: float | Sequence[float] | None = None,
    az: float | Sequence[float] | None = None,
    source: str | Sequence[str] | None = None,
    subarray_list: Sequence[str] | str | None = None,
    freqspecs: Sequence[str] | str | None = None,
    creator: str | None = None,
    obsname: str | None = None,
    nobs: int | None = None,
    exptime: int | None = None,
    calexptime: int | None = None,
    calibrator: bool | str | None = None,
    freqres: float | None = None,
    inttime: float | None = None,
    avoidsun: bool | None = None,
    vcsmode: bool | None = None,
    buffered: bool | None = None,
    pretend: bool | None = None,
    logger: logging.Logger = log,
    *,
    base_url: str | None = None,
) -> dict[str, Any] | None:
    """Schedule triggered observations (triggerobs, or triggervcs with ``vcsmode``).

    RA is in degrees (what every caller passes, whatever old docstrings said).
    ``vcsmode`` and ``buffered`` together call ``triggerbuffer`` with
    ``obstime = nobs * exptime``. Returns the reply: success, errors, params,
    clear, schedule, trigger_id, obsid_list.

    ``exptime`` is sent as given, with ``vcsmode`` too, as mwa_trigger's
    ``triggerservice.py`` sends it: the server decides, and ``triggervcs`` (or
    ``triggerbuffer``) answers ``success: false`` naming the room the VCS disk has when
    the capture does not fit. A caller that wants the longest capture that fits asks
    :func:`vcsfree` first and passes ``min(exptime, vcsfree())``.
    """
    if vcsmode and buffered:
        # Without exptime no obstime is sent (0 was): the server then says what is missing.
        obstime = None if exptime is None else (nobs or 1) * exptime
        return triggerbuffer(project_id=project_id, secure_key=secure_key, pretend=pretend,
                             obstime=obstime, logger=logger, base_url=base_url)  # fmt: skip
    if project_id is None or secure_key is None:
        logger.error("trigger() must be passed a project_id and a secure_key")
        return None
    if (freqres is None) != (inttime is None):
        logger.error("trigger() must be passed both inttime and freqres, or neither")
        return None
    urldict: dict[str, Any] = {"project_id": project_id}
    if obsname is not None:
        urldict["obsname"] = obsname
    postdict: dict[str, Any] = {"secure_key": secure_key}
    optional = {
        "group_id": group_id, "ra": ra, "dec": dec, "alt": alt, "az": az, "source": source,
        "creator": creator, "nobs": nobs, "exptime": exptime, "calexptime": calexptime,
        "freqres": freqres, "inttime": inttime, "calibrator": calibrator, "avoidsun": avoidsun,
        "pretend": pretend, "vcsmode": vcsmode,
    }  # fmt: skip
    # A tuple is sent as a list is (str() of a tuple is no list the server reads).
    postdict |= {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in optional.items()
        if value is not None
    }
    if subarray_list is not None:
        postdict["subarrays"] = (
            subarray_list if isinstance(subarray_list, str) else json.dumps(list(subarray_list))
        )
    if freqspecs is not None:
        postdict["freqspecs"] = (
            freqspecs if isinstance(freqspecs, str) else json.dumps(list(freqspecs))
        )
    endpoint = "triggervcs" if vcsmode else "triggerobs"
    result: dict[str, Any] | None = web_api(
        _url(base_url, endpoint), urldict, postdict, logger=logger
    )
    return result


def triggerbuffer(
    project_id: str | None = None,
    secure_key: str | None = None,
    pretend: bool | None = None,
    start_time: int | None = None,
    end_time: int | None = None,
    obstime: int | None = None,
    logger: logging.Logger = log,
    *,
    base_url: str | None = None,
) -> dict[str, Any] | None:
    """Dump the voltage buffer from ``start_time`` (0: all of it) and capture to ``end_time`` or now + ``obstime``."""
    if project_id is None or secure_key is None:
        logger.error("triggerbuffer() must be passed a project_id and a secure_key")
        return None
    postdict: dict[str, Any] = {"secure_key": secure_key, "start_time": start_time or 0}
    for key, value in (("pretend", pretend), ("end_time", end_time), ("obstime", obstime)):
        if value is not None:
            postdict[key] = value
    result: dict[str, Any] | None = web_api(
        _url(base_url, "triggerbuffer"), {"project_id": project_id}, postdict, logger=logger
    )
    return result
