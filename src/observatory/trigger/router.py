"""/trigger: busy, obslist, vcsfree, triggerobs, triggervcs, triggerbuffer, find, show.

Every endpoint takes its parameters from the query string, a form body
(urlencoded or multipart), or a JSON body (merged), answers GET and POST, and has
no trailing-slash redirect (urllib turns a redirected POST into a bodyless GET).
Trigger calls answer 200 with ``success`` and ``errors`` for every parameter
problem: triggerservice.py turns any 4xx or 5xx into None and would lose the
message. Only a request that cannot be read at all (a body that is neither a
form nor a JSON object, NUL characters) is a 400, which no such client sends.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from observatory.core.config import Settings
from observatory.core.database import MAX_SQL_ID
from observatory.core.errors import BadRequest, NotFound
from observatory.core.gpstime import now_gps
from observatory.core.observability import trigger_timer
from observatory.core.web import get_session, templates_for
from observatory.trigger import schemas, service
from observatory.trigger.models import Trigger
from observatory.trigger.params import (
    ParameterError,
    as_bool,
    as_number,
    as_text,
    present,
    read_request_parameters,
)

router = APIRouter(prefix="/trigger", tags=["trigger"])
_ANSWERS_LOCK = threading.Lock()
templates = templates_for(Path(__file__).parent)


async def _parameters(request: Request) -> dict[str, Any]:
    try:
        return await read_request_parameters(request)
    except ParameterError as exc:
        raise BadRequest(str(exc)) from exc


def _endpoint(path: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """GET and POST at ``path`` and ``path/``: a redirect would turn a client's POST into a GET.

    The handlers read their parameters by hand, so /docs learns them from
    ``schemas.ENDPOINT_PARAMETERS``: in the query string for GET, as a body for POST.
    """
    endpoint = path.removeprefix("/")

    def register(handler: Callable[..., Any]) -> Callable[..., Any]:
        router.api_route(path + "/", methods=["GET", "POST"], include_in_schema=False)(handler)
        # One route per method: each gets its own OpenAPI operation id.
        router.get(
            path,
            operation_id=f"trigger_{handler.__name__}_get",
            openapi_extra=schemas.get_openapi(endpoint),
        )(handler)
        return router.post(
            path,
            operation_id=f"trigger_{handler.__name__}_post",
            openapi_extra=schemas.post_openapi(endpoint),
        )(handler)

    return register


ParamsDep = Annotated[dict[str, Any], Depends(_parameters)]
SessionDep = Annotated[Session, Depends(get_session)]


def _json(value: Any, params: dict[str, Any], request: Request) -> Response:
    """JSON as the clients decode it (UTF-8 declared, ASCII-safe); indented with ``pretty``,
    which defaults to true for a web browser (it asks for HTML) and false for a script."""
    pretty = "text/html" in request.headers.get("accept", "")
    if present(params, "pretty"):
        try:
            pretty = as_bool("pretty", params["pretty"], default=pretty)
        except ParameterError:
            pretty = True
    body = json.dumps(value, indent=2 if pretty else None, default=str)
    return Response(body, media_type="application/json; charset=utf-8")


def _number(params: dict[str, Any], name: str, default: float | None = None) -> float:
    if not present(params, name):
        if default is None:
            raise BadRequest(f"{name} is required")
        return default
    try:
        value = as_number(name, params[name])
    except ParameterError as exc:
        raise BadRequest(str(exc)) from exc
    if value < 0:
        raise BadRequest(f"{name}: {value} must not be negative")
    return value


def _answers(request: Request) -> service.RecentAnswers:
    """This app's recent busy/obslist/vcsfree answers (one set per app: one per database)."""
    state = request.app.state
    with _ANSWERS_LOCK:
        if not hasattr(state, "trigger_answers"):
            state.trigger_answers = service.RecentAnswers()
    answers: service.RecentAnswers = state.trigger_answers
    return answers


def _changed(request: Request, result: dict[str, Any]) -> dict[str, Any]:
    """Forget recent answers when a trigger changed the schedule."""
    if result["success"] and not result["params"].get("pretend", True):
        _answers(request).invalidate()
    return result


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _answer(
    request: Request, key: tuple[Any, ...], compute: Callable[[Session, int], Any]
) -> Any:
    """A recent answer from memory, or worked out in a worker thread with a session of its own.

    Polling robots mostly get the answer of this second without a thread hop or a
    database round trip.
    """
    answers, second = _answers(request), now_gps()
    found, answer = answers.known(key, second)
    if found:
        return answer

    def work() -> Any:
        with request.app.state.session_factory() as session:
            return answers.get(key, second, lambda: compute(session, second))

    return await run_in_threadpool(work)


@_endpoint("/busy")
async def busy(request: Request, params: ParamsDep) -> Response:
    """``true`` if a trigger by ``project_id`` now, observing for ``obstime`` s, would be refused
    by the override rules (judged over the window it would clear: from its first start, for
    obstime rounded up to 8 s); always ``true`` for a project that cannot trigger, unless
    nothing is scheduled then."""
    if not present(params, "project_id"):
        raise BadRequest("project_id is required")
    try:
        project_id = as_text("project_id", params["project_id"])
    except ParameterError as exc:
        raise BadRequest(str(exc)) from exc
    # mwa_trigger's busy() and obslist() may leave obstime out: now, then.
    obstime = _number(params, "obstime", 0.0)
    # The answer serves the whole GPS second: it is worked out for its middle, where a trigger
    # made at any moment after the second's start would begin (at its very start it could
    # begin 8 s sooner).
    answer = await _answer(
        request, ("busy", project_id, obstime),
        lambda session, second: service.is_busy(session, project_id, obstime, now=second + 0.5),
    )  # fmt: skip
    return _json(answer, params, request)


@_endpoint("/obslist")
async def obslist(request: Request, params: ParamsDep) -> Response:
    """Observations from now to now + obstime: [start, stop, obsname, creator, project_id, mode, groupid]."""
    current = False
    if present(params, "current"):
        try:
            current = as_bool("current", params["current"], default=False)
        except ParameterError as exc:
            raise BadRequest(str(exc)) from exc
    obstime = _number(params, "obstime", 0.0)
    answer = await _answer(
        request, ("obslist", obstime, current),
        lambda session, second: service.obslist(session, obstime, current=current, now=second),
    )  # fmt: skip
    return _json(answer, params, request)


@_endpoint("/vcsfree")
async def vcsfree(request: Request, params: ParamsDep) -> Response:
    """Seconds of voltage capture the VCS disk can still take (whole 8 s blocks)."""
    settings = _settings(request)
    answer = await _answer(
        request,
        ("vcsfree",),
        lambda session, second: service.vcsfree_answer_s(session, settings, now=second),
    )
    return _json(answer, params, request)


@_endpoint("/triggerobs")
def triggerobs(request: Request, session: SessionDep, params: ParamsDep) -> Response:
    """Trigger correlator observations (pretend by default)."""
    with trigger_timer(request, "triggerobs"):
        result = service.trigger_observations(session, _settings(request), params, vcs=False)
    return _json(_changed(request, result), params, request)


@_endpoint("/triggervcs")
def triggervcs(request: Request, session: SessionDep, params: ParamsDep) -> Response:
    """Trigger voltage-capture observations (pretend by default; all-sky with no target)."""
    with trigger_timer(request, "triggervcs"):
        result = service.trigger_observations(session, _settings(request), params, vcs=True)
    return _json(_changed(request, result), params, request)


@_endpoint("/triggerbuffer")
def triggerbuffer(request: Request, session: SessionDep, params: ParamsDep) -> Response:
    """Dump the voltage buffer and keep capturing (pretend by default)."""
    with trigger_timer(request, "triggerbuffer"):
        result = service.trigger_buffer(session, _settings(request), params)
    return _json(_changed(request, result), params, request)


@_endpoint("/show")
def show(request: Request, session: SessionDep, params: ParamsDep) -> Response:
    """One past trigger call."""
    if not present(params, "trigger_id"):
        raise BadRequest("trigger_id is required")
    try:
        trigger_id = int(as_number("trigger_id", params["trigger_id"], integer=True))
    except ParameterError as exc:
        raise BadRequest(str(exc)) from exc
    trigger = session.get(Trigger, trigger_id) if 0 < trigger_id <= MAX_SQL_ID else None
    if trigger is None:
        raise NotFound(f"no trigger with trigger_id {trigger_id}")
    return _json(service.trigger_summary(trigger), params, request)


@_endpoint("/find")
def find(request: Request, session: SessionDep, params: ParamsDep) -> Response:
    """Past trigger calls: a search form without parameters; JSON, or HTML with ``html``.

    Any parameter, even one without a value (``find?desc``, ``find?pretty=1``), asks
    for results; empty filters mean "no filter".
    """
    # Links are relative to /trigger/: from /trigger/find/ (where TraceT links) one level up.
    up = "../" if request.url.path.endswith("/") else ""
    if not params:
        return templates.TemplateResponse(
            request, "find.html", {"query": None, "values": {}, "up": up}
        )
    try:
        query = service.read_find_query(params)
    except ParameterError as exc:
        raise BadRequest(str(exc)) from exc
    triggers, has_more = service.find_triggers(session, query)
    summaries = [service.trigger_summary(t) for t in triggers]
    if "html" not in params:
        return _json(summaries, params, request)
    values = {k: str(params.get(k) or "") for k in (*service.FIND_FILTERS, "pagesize")}
    return templates.TemplateResponse(
        request, "find.html",
        {"query": query, "values": values, "triggers": summaries, "has_more": has_more,
         "page_links": _page_links(params, query.page, has_more), "up": up},
    )  # fmt: skip


def _page_links(params: dict[str, Any], page: int, has_more: bool) -> dict[str, str]:
    """Query strings of the previous and next pages (same filters)."""
    links = {}
    for label, number in (("previous", page - 1), ("next", page + 1)):
        if (label == "previous" and page > 1) or (label == "next" and has_more):
            links[label] = urlencode(
                {**{k: str(v) for k, v in params.items()}, "page": number, "html": 1}
            )
    return links
