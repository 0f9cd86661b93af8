"""A client of the calibration web services (``/calib``), one call per service users call.

The calls are named after the services of the MWA's "Calibration web services"
document: ``get_cal_solution`` (the best solution for an observation, a zip holding
an AO-cal ``.bin``), ``get_cal_json`` (that fit as JSON: delays and gains per tile),
``get_cal_fits`` (every fit that could calibrate it), ``add_cal_request`` (ask for a
fit, with a callback URL), and the Grafana JSON services (``grafana_metrics``,
``grafana_metric_payload_options``, ``grafana_query``). ``read_cal_solution`` reads
the ``.bin`` of a solution zip with :func:`observatory.calib.formats.read_solutions`.

The service has no endpoint for the state of a fit request: it calls the request's
``callback_url`` when the fit has finished (:func:`parse_callback` reads what it
sends), and ``has_cal_fit`` says whether a fit for an observation exists yet.

Every call makes one HTTP request (no retries) with a timeout (``timeout_s``) and
raises an exception naming the problem: :class:`NoSolutionFound` for "no
calibration fit for this obsid" (404), :class:`NoCalibratorFound` when no fit can be
requested (404 from ``add_cal_request``), :class:`CalibHTTPError` for any other error
reply (with the server's error text), :class:`CalibConnectionError` when no reply
came. The server is ``base_url``, else ``OBSERVATORY_CALIB_URL``, else
``DEFAULT_BASE_URL``.

Example
-------
>>> from observatory.clients import calib
>>> solution = calib.get_cal_solution(1120493008, directory=".")  # doctest: +SKIP
>>> solution.path, solution.cal_obs_id  # doctest: +SKIP
(PosixPath('1120493008_calibration.zip'), 1120493424)
>>> calib.read_cal_solution(solution).jones.shape  # doctest: +SKIP
(1, 128, 768, 4)
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import httpx

from observatory.calib.formats import CalSolutions, read_solutions

#: The environment variable naming the calibration services' URL (``.../calib/``).
BASE_URL_VARIABLE = "OBSERVATORY_CALIB_URL"
DEFAULT_BASE_URL = "http://127.0.0.1:8000/calib/"
#: Seconds to wait for a connection, and then for each read of the reply.
TIMEOUT_S = 60.0
#: Endings of the solution files a solution zip holds (AO-cal; hyperdrive FITS).
SOLUTION_SUFFIXES = (".bin", "_solutions.fits")
FLAGGED_TILES_SUFFIX = "_flagged_tiles.txt"


class CalibError(Exception):
    """A call to the calibration services failed; the message says which call and why.

    Attributes
    ----------
    url
        The URL called, when the failure was a call.
    """

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class CalibConnectionError(CalibError):
    """No reply: the server could not be reached, or did not answer within the timeout."""


class CalibHTTPError(CalibError):
    """The server answered with an error status.

    Attributes
    ----------
    status_code
        The HTTP status (400 a faulty request, 404 nothing found, 409, 500...).
    error
        The server's message: its JSON ``error``, else the body's text.
    error_code
        The server's JSON ``error_code``, if any.
    response_text
        The body of the reply, as sent.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str,
        status_code: int,
        error: str,
        error_code: int | None,
        response_text: str,
    ) -> None:
        super().__init__(message, url=url)
        self.status_code = status_code
        self.error = error
        self.error_code = error_code
        self.response_text = response_text


class NoSolutionFound(CalibHTTPError):
    """404 from a fit lookup: no valid calibration fit for the obsid (within the time asked)."""


class NoCalibratorFound(CalibHTTPError):
    """404 from ``add_cal_request``: no calibrator observation in range, so no fit can be made."""


class CandidateFit(NamedTuple):
    """One fit that could calibrate an observation (``get_cal_fits``)."""

    #: The calibrator observation the fit is of.
    cal_obs_id: int
    #: |obsid - calibrator obsid|, seconds.
    offset_s: int
    #: The fit's hyperdrive FITS file, by its key in the calibration store.
    filename: str


@dataclasses.dataclass(frozen=True)
class CalSolutionZip:
    """The best solution for an observation, as ``get_cal_solution`` sent it.

    Attributes
    ----------
    obs_id
        The observation to calibrate.
    fitid
        The fit chosen (Unix microseconds when it ran), from ``X-Calibration-Fit-Id``.
    cal_obs_id
        The calibrator observation of that fit, from ``X-Calibrator-Obs-Id``.
    content
        The zip: ``<cal_obs_id>.bin`` (or ``<cal_obs_id>_solutions.fits``),
        ``<obs_id>_flagged_tiles.txt`` and ``<obs_id>_flags.py``.
    path
        Where the zip was saved, if it was.
    """

    obs_id: int
    fitid: int
    cal_obs_id: int
    content: bytes
    path: Path | None = None

    def names(self) -> list[str]:
        """The names of the files in the zip."""
        with zipfile.ZipFile(io.BytesIO(self.content)) as archive:
            return archive.namelist()

    def flagged_tiles(self) -> list[int]:
        """Tile ids of the tiles that did not calibrate (``*_flagged_tiles.txt``, one a line)."""
        with zipfile.ZipFile(io.BytesIO(self.content)) as archive:
            found = [name for name in archive.namelist() if name.endswith(FLAGGED_TILES_SUFFIX)]
            if not found:
                raise CalibError(f"the zip of obs_id {self.obs_id} has no *{FLAGGED_TILES_SUFFIX}")
            lines = archive.read(found[0]).decode("ascii", errors="replace").split()
        try:
            return [int(line) for line in lines]
        except ValueError as exc:
            raise CalibError(f"{found[0]} is not one tile id a line: {lines[:5]}") from exc


@dataclasses.dataclass(frozen=True)
class FitCallback:
    """What the service POSTs to a fit request's ``callback_url`` when the fit has finished.

    Attributes
    ----------
    cal_id
        The calibrator observation that was fitted.
    asvo_job_id
        The ASVO job the request was for, if any.
    target_obs_id
        The observation that needed the fit.
    finished
        When the fit finished (or failed), timezone-aware; None if not sent.
    success
        Whether a fit was stored.
    message
        The result, with the reason when it failed.
    """

    cal_id: int
    asvo_job_id: int | None
    target_obs_id: int
    finished: datetime | None
    success: bool
    message: str


def base_url_from_environment(environ: Mapping[str, str] | None = None) -> str:
    """``OBSERVATORY_CALIB_URL`` when set and not blank, else ``DEFAULT_BASE_URL``."""
    env = os.environ if environ is None else environ
    return env.get(BASE_URL_VARIABLE, "").strip() or DEFAULT_BASE_URL


def get_cal_solution(
    obs_id: int | str,
    *,
    directory: str | Path | None = None,
    prefer_fitid: int | None = None,
    max_time_separation_s: int | None = None,
    allow_after: bool | None = None,
    nocache: bool | None = None,
    output_format: str | None = None,
    base_url: str | None = None,
    timeout_s: float = TIMEOUT_S,
) -> CalSolutionZip:
    """The best calibration solution for ``obs_id``: a zip with the AO-cal ``.bin``.

    Parameters
    ----------
    obs_id
        The observation to calibrate (GPS seconds). A calibrator's obsid with
        ``max_time_separation_s=0`` gives that calibrator's own fit.
    directory
        If given, the zip is also saved there as ``<obs_id>_calibration.zip``
        (replacing a file of that name).
    prefer_fitid
        A fit to use instead of the service's choice.
    max_time_separation_s
        The furthest the calibrator may be from ``obs_id``, seconds (server default 86400).
    allow_after
        Whether calibrators after ``obs_id`` may be used (server default True).
    nocache
        Whether to rebuild the solutions from the stored fits (server default False).
    output_format
        ``aocal`` (the default), ``auto`` or ``hyperdrive``.
    base_url, timeout_s
        The server (see the module) and the seconds to wait for it.

    Returns
    -------
    CalSolutionZip
        The zip, the fit and calibrator chosen, and where it was saved.

    Raises
    ------
    NoSolutionFound
        No valid fit for ``obs_id`` (404).
    CalibHTTPError
        Any other error reply, e.g. 400 for an obsid not in the schedule or a bad parameter.
    CalibConnectionError
        No reply.
    """
    params = _params(
        obs_id=obs_id, prefer_fitid=prefer_fitid, max_time_separation=max_time_separation_s,
        allow_after=allow_after, nocache=nocache, output_format=output_format,
    )  # fmt: skip
    what = f"get_cal_solution for obs_id {obs_id}"
    reply = _call("GET", "get_cal_solution", what, base_url, timeout_s, params=params)
    if not zipfile.is_zipfile(io.BytesIO(reply.content)):
        raise CalibError(f"{what}: the reply is not a zip file", url=str(reply.url))
    solution = CalSolutionZip(
        obs_id=int(obs_id),
        fitid=_header_number(reply, "X-Calibration-Fit-Id", what),
        cal_obs_id=_header_number(reply, "X-Calibrator-Obs-Id", what),
        content=reply.content,
    )
    if directory is None:
        return solution
    path = Path(directory) / f"{solution.obs_id}_calibration.zip"
    partial = path.with_name(path.name + ".part")
    partial.write_bytes(solution.content)
    partial.replace(path)
    return dataclasses.replace(solution, path=path)


def read_cal_solution(solution: CalSolutionZip | str | Path) -> CalSolutions:
    """The solutions in a solution zip (its ``.bin``, or hyperdrive FITS), as ``CalSolutions``.

    Parameters
    ----------
    solution
        What ``get_cal_solution`` returned, or the path of a saved zip.

    Returns
    -------
    CalSolutions
        Read by ``observatory.calib.formats.read_solutions``; ``obsid`` is the
        calibrator observation's (the solution file is named after it).

    Raises
    ------
    CalibError
        If the zip holds no solution file, or more than one.
    observatory.calib.formats.CalFormatError
        If the solution file is malformed.
    """
    content = (
        solution.content if isinstance(solution, CalSolutionZip) else Path(solution).read_bytes()
    )
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        found = [name for name in archive.namelist() if name.endswith(SOLUTION_SUFFIXES)]
        if len(found) != 1:
            raise CalibError(
                f"the solution zip holds {len(found)} solution files ({', '.join(found) or 'none'}); "
                f"one ({' or '.join(SOLUTION_SUFFIXES)}) was expected"
            )
        name = found[0]
        data = archive.read(name)
    with tempfile.TemporaryDirectory(prefix="calib-solution-") as scratch:
        path = Path(scratch) / Path(name).name
        path.write_bytes(data)
        solutions = read_solutions(path)
    stem = Path(name).name.removesuffix("_solutions.fits").removesuffix(".bin")
    if solutions.obsid is None and stem.isascii() and stem.isdigit():
        solutions.obsid = int(stem)
    return solutions


def get_cal_json(
    obs_id: int | str,
    *,
    prefer_fitid: int | None = None,
    max_time_separation_s: int | None = None,
    allow_after: bool | None = None,
    base_url: str | None = None,
    timeout_s: float = TIMEOUT_S,
) -> dict[str, Any]:
    """The fit ``get_cal_solution`` would choose for ``obs_id``, as JSON.

    Parameters are those of :func:`get_cal_solution`.

    Returns
    -------
    dict
        ``obs_id``, ``fitid``, ``cal_obs_id``, ``time_separation_s``, ``creator``,
        ``code_version``, ``fit_time``, ``coarse_chans``, ``flagged_tiles``,
        ``reference_tileid`` and ``reference_tile_name`` (the tile the delays are
        referenced to; None when not recorded)... and
        ``solutions``: per tile (Antenna order) ``tileid``, ``tile_name``, ``antenna``,
        ``x_delay_m``, ``x_intercept``, ``x_gains`` (per coarse channel), their ``y_``
        twins and fit qualities; None where the fit has no value.

    Raises
    ------
    NoSolutionFound, CalibHTTPError, CalibConnectionError
        As :func:`get_cal_solution`.
    """
    params = _params(
        obs_id=obs_id, prefer_fitid=prefer_fitid, max_time_separation=max_time_separation_s,
        allow_after=allow_after,
    )  # fmt: skip
    what = f"get_cal_json for obs_id {obs_id}"
    body = _json(_call("GET", "get_cal_json", what, base_url, timeout_s, params=params), what)
    if not isinstance(body, dict):
        raise CalibError(f"{what}: the reply is not a JSON object")
    return body


def get_cal_fits(
    obs_id: int | str,
    *,
    max_time_separation_s: int | None = None,
    allow_after: bool | None = None,
    base_url: str | None = None,
    timeout_s: float = TIMEOUT_S,
) -> dict[int, CandidateFit]:
    """Every fit that could calibrate ``obs_id``, best first, by fit id.

    Parameters are those of :func:`get_cal_solution`.

    Returns
    -------
    dict
        fit id -> ``CandidateFit(cal_obs_id, offset_s, filename)``, in the server's order.

    Raises
    ------
    NoSolutionFound
        No fit at all (404).
    CalibHTTPError, CalibConnectionError
        As :func:`get_cal_solution`.
    """
    params = _params(
        obs_id=obs_id, max_time_separation=max_time_separation_s, allow_after=allow_after
    )
    what = f"get_cal_fits for obs_id {obs_id}"
    body = _json(_call("GET", "get_cal_fits", what, base_url, timeout_s, params=params), what)
    try:
        return {
            int(fitid): CandidateFit(int(c), int(o), str(f)) for fitid, (c, o, f) in body.items()
        }
    except (AttributeError, TypeError, ValueError) as exc:
        raise CalibError(f"{what}: the reply is not {{fitid: [calid, offset, filename]}}") from exc


def has_cal_fit(
    obs_id: int | str,
    *,
    max_time_separation_s: int | None = None,
    allow_after: bool | None = None,
    base_url: str | None = None,
    timeout_s: float = TIMEOUT_S,
) -> bool:
    """Whether any fit could calibrate ``obs_id`` yet (``get_cal_fits``, 404 meaning no).

    One call, no waiting: after ``add_cal_request``, call it again later (or wait for
    the callback). Parameters are those of :func:`get_cal_fits`.

    Raises
    ------
    CalibHTTPError
        A faulty request (400), or a server error.
    CalibConnectionError
        No reply.
    """
    try:
        get_cal_fits(
            obs_id, max_time_separation_s=max_time_separation_s, allow_after=allow_after,
            base_url=base_url, timeout_s=timeout_s,
        )  # fmt: skip
    except NoSolutionFound:
        return False
    return True


def add_cal_request(
    obs_id: int | str,
    *,
    callback_url: str | None = None,
    asvo_job_id: int | None = None,
    max_time_separation_s: int | None = None,
    base_url: str | None = None,
    timeout_s: float = TIMEOUT_S,
) -> None:
    """Ask for a fit of the calibrator observation nearest ``obs_id`` (sent as a form POST).

    Parameters
    ----------
    obs_id
        The observation that needs calibrating; a calibrator's own obsid with
        ``max_time_separation_s=0`` asks for a fit of that calibrator.
    callback_url
        Called (a JSON POST, see :func:`parse_callback`) when the fit has finished,
        hours later perhaps. It must be http(s) and reachable by the server.
    asvo_job_id
        The ASVO job the fit is for (an existing job).
    max_time_separation_s
        The furthest the calibrator may be from ``obs_id``, seconds (server default 86400).
    base_url, timeout_s
        The server (see the module) and the seconds to wait for it.

    Raises
    ------
    NoCalibratorFound
        No calibrator observation in range (404): no fit can be made.
    CalibHTTPError
        400 (unknown obsid, a bad parameter or callback URL), 409 (not stored), 500.
    CalibConnectionError
        No reply.
    """
    form = _params(
        obs_id=obs_id, callback_url=callback_url, asvo_job_id=asvo_job_id,
        max_time_separation=max_time_separation_s,
    )  # fmt: skip
    _call("POST", "add_cal_request", f"add_cal_request for obs_id {obs_id}", base_url, timeout_s,
          data=form)  # fmt: skip


def parse_callback(body: bytes | str | Mapping[str, Any]) -> FitCallback:
    """Read the JSON a fit request's ``callback_url`` receives.

    Parameters
    ----------
    body
        The POST's body, or its decoded JSON object.

    Raises
    ------
    CalibError
        If it is not the callback's JSON object.
    """
    try:
        data = json.loads(body) if isinstance(body, bytes | str) else body
        finished = data.get("finished_datetime")
        job = data.get("asvo_job_id")
        return FitCallback(
            cal_id=int(data["cal_id"]),
            asvo_job_id=None if job is None else int(job),
            target_obs_id=int(data["target_obs_id"]),
            finished=None if finished is None else datetime.fromisoformat(str(finished)),
            success=_boolean(data["success"]),
            message=str(data.get("message") or ""),
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise CalibError(f"not a calibration callback ({exc!r}): {str(body)[:200]}") from exc


def grafana_metrics(
    *, base_url: str | None = None, timeout_s: float = TIMEOUT_S
) -> list[dict[str, Any]]:
    """The targets ``grafana_query`` takes: ``recNN`` per receiver and ``sources``, with their payloads."""
    return _grafana("metrics", {}, base_url, timeout_s)


def grafana_metric_payload_options(
    metric: str,
    name: str,
    payload: Mapping[str, Any] | None = None,
    *,
    base_url: str | None = None,
    timeout_s: float = TIMEOUT_S,
) -> list[dict[str, Any]]:
    """The choices (``[{label, value}]``) of payload option ``name`` (channel, source, style, clip)."""
    body = {"metric": metric, "payload": dict(payload or {}), "name": name}
    return _grafana("metric-payload-options", body, base_url, timeout_s)


def grafana_query(
    target: str,
    start: datetime | str,
    end: datetime | str,
    payload: Mapping[str, Any] | None = None,
    *,
    base_url: str | None = None,
    timeout_s: float = TIMEOUT_S,
) -> list[dict[str, Any]]:
    """Calibration data of one target from ``start`` to ``end`` (by observation time).

    Parameters
    ----------
    target
        ``recNN`` (a receiver's tiles) or ``sources`` (the calibrators observed).
    start, end
        Timezone-aware datetimes, or ISO-8601 text (``2025-12-21T00:00:00Z``).
    payload
        ``channel`` (ANY or a coarse channel), ``source``, ``style`` (full, Y-X,
        recmean, tilemean, quality), ``clip`` (None or metres).

    Returns
    -------
    list
        Grafana data frames: ``{"schema": {...}, "data": {"values": [times_ms, values]}}``.
    """
    span = {
        key: t.isoformat() if isinstance(t, datetime) else t
        for key, t in (("from", start), ("to", end))
    }
    body = {
        "range": span,
        "targets": [{"target": target, "refId": "A", "payload": dict(payload or {})}],
    }
    return _grafana("query", body, base_url, timeout_s)


def _grafana(
    endpoint: str, body: Mapping[str, Any], base_url: str | None, timeout_s: float
) -> list[dict[str, Any]]:
    what = f"grafana/{endpoint}"
    reply = _json(_call("POST", what, what, base_url, timeout_s, json_body=body), what)
    if not isinstance(reply, list):
        raise CalibError(f"{what}: the reply is not a JSON list")
    return reply


def _params(**values: object) -> dict[str, str]:
    """Query or form values as the services take them: booleans 0/1, None left out."""
    return {
        key: ("1" if value else "0") if isinstance(value, bool) else str(value)
        for key, value in values.items()
        if value is not None
    }


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"success is {value!r}, not true or false")


def _url(base_url: str | None, endpoint: str) -> str:
    base = base_url or base_url_from_environment()
    return (base if base.endswith("/") else base + "/") + endpoint


def _call(
    method: str,
    endpoint: str,
    what: str,
    base_url: str | None,
    timeout_s: float,
    *,
    params: Mapping[str, str] | None = None,
    data: Mapping[str, str] | None = None,
    json_body: Mapping[str, Any] | None = None,
) -> httpx.Response:
    """One request (no retries); its reply if 2xx, else the exception naming the problem."""
    url = _url(base_url, endpoint)
    try:
        reply = httpx.request(
            method, url, params=params, data=data, json=json_body, timeout=timeout_s,
            headers={"Accept": "application/json, application/zip"},
        )  # fmt: skip
    except httpx.TimeoutException as exc:
        raise CalibConnectionError(
            f"{what}: the calibration service at {url} did not answer within {timeout_s:g} s",
            url=url,
        ) from exc
    except httpx.TransportError as exc:
        raise CalibConnectionError(
            f"{what}: the calibration service at {url} could not be reached: {exc}", url=url
        ) from exc
    except httpx.InvalidURL as exc:
        raise CalibError(f"{what}: {url!r} is not a usable URL: {exc}", url=url) from exc
    if not reply.is_success:
        raise _reply_error(reply, what, endpoint)
    return reply


def _reply_error(reply: httpx.Response, what: str, endpoint: str) -> CalibHTTPError:
    """The exception for an error reply, carrying the server's JSON ``error`` text."""
    text = reply.text
    error, error_code = text.strip()[:2000] or reply.reason_phrase, None
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("error"):
        error = str(body["error"])
        error_code = body["error_code"] if isinstance(body.get("error_code"), int) else None
    status = reply.status_code
    kind: type[CalibHTTPError] = CalibHTTPError
    if status == 404 and endpoint == "add_cal_request":
        kind, meaning = NoCalibratorFound, "no calibrator observation to fit: "
    elif status == 404 and endpoint.startswith("get_cal_"):
        kind, meaning = NoSolutionFound, "no calibration solution: "
    else:
        meaning = ""
    return kind(
        f"{what}: HTTP {status}: {meaning}{error}", url=str(reply.url), status_code=status,
        error=error, error_code=error_code, response_text=text,
    )  # fmt: skip


def _json(reply: httpx.Response, what: str) -> Any:
    try:
        return reply.json()
    except ValueError as exc:
        raise CalibError(
            f"{what}: the reply is not JSON: {reply.text[:200]!r}", url=str(reply.url)
        ) from exc


def _header_number(reply: httpx.Response, name: str, what: str) -> int:
    value = reply.headers.get(name, "")
    if not (value.isascii() and value.isdigit()):
        raise CalibError(
            f"{what}: the reply's {name} header is {value!r}, not a number", url=str(reply.url)
        )
    return int(value)
