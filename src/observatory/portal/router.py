"""The portal's pages (``/``): sign-in, profile and API key, jobs, submission, observations.

Signing in sets the portal's own signed session cookie (``portal_session``: HttpOnly,
SameSite=Lax; over https ``__Host-portal_session``, Secure). Besides these pages it opens only the ``/api`` calls that
change nothing (the jobs page's ``job_results`` websocket, ``get_jobs``): a browser sends it
on top-level navigations from other sites too, so it must not open ``GET /api/cancel_job``.
Signing out ends the user's portal sessions in every browser. Every form carries a forgery
token (an HMAC of a separate HttpOnly anti-forgery cookie and of the sign-in cookie) that the
POST handlers check.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session

from observatory.asvo import service as asvo_service
from observatory.asvo.router import (
    COOKIE_MAX_AGE_S,
    PORTAL_COOKIE_NAME,
    download_url_builder,
    portal_cookie,
)
from observatory.core.accounts import (
    authenticate_password,
    end_portal_sessions,
    portal_session_token,
    reset_api_key,
    session_user,
)
from observatory.core.config import Settings
from observatory.core.errors import BadRequest, ServiceError
from observatory.core.models import User
from observatory.core.security import key_fingerprint, texts_match
from observatory.core.web import (
    get_session,
    host_cookie_name,
    is_secure,
    read_form,
    templates_for,
)
from observatory.portal import service


class _PageRoute(APIRoute):
    """A portal route whose malformed parameters (``?page=abc``) are refused as any other
    error is: a small page for a browser, the JSON shape otherwise (the app's handler for
    validation errors answers JSON only)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def page_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(part) for part in error['loc'][1:])}: {error['msg']}"
                    for error in exc.errors()
                )
                raise BadRequest(f"invalid request: {problems}") from None

        return page_errors


router = APIRouter(tags=["portal"], include_in_schema=False, route_class=_PageRoute)
templates = templates_for(Path(__file__).parent)
#: The anti-forgery cookie (``__Host-portal_csrf`` over https: :func:`host_cookie_name`).
FORGERY_COOKIE = "portal_csrf"

SessionDep = Annotated[Session, Depends(get_session)]


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _signed_in(request: Request, session: Session) -> User | None:
    """The user of the portal's sign-in cookie, while it is valid (not signed out since)."""
    key = _settings(request).secret_key_bytes()
    return session_user(session, portal_cookie(request), key, "portal")


def _set_forgery_cookie(request: Request, response: Response, value: str) -> None:
    # Path "/" and no Domain, as the __Host- prefix requires (Starlette's defaults).
    response.set_cookie(
        host_cookie_name(request, FORGERY_COOKIE),
        value,
        path="/",
        httponly=True,
        samesite="strict",
        secure=is_secure(request),
    )


def _page(
    request: Request, name: str, context: dict[str, Any], *, status_code: int = 200
) -> HTMLResponse:
    """Render a page with a forgery token for its forms (setting the cookie it derives from).

    The token is bound to the sign-in cookie the page is shown with, as
    :func:`_checked_form` checks it.
    """
    cookie = request.cookies.get(host_cookie_name(request, FORGERY_COOKIE))
    fresh = cookie is None
    if cookie is None:
        cookie = service.new_forgery_secret()
    token = service.forgery_token(
        _settings(request).secret_key_bytes(),
        cookie,
        session=portal_cookie(request),
    )
    response = templates.TemplateResponse(
        request, name, {"csrf_token": token, **context}, status_code=status_code
    )
    response.headers["Cache-Control"] = "no-store"  # pages hold keys and tokens
    if fresh:
        _set_forgery_cookie(request, response, cookie)
    return response


async def _checked_form(request: Request) -> dict[str, str]:
    """The posted form of a signed-in page, once its forgery token matches the anti-forgery
    cookie and the sign-in cookie this request carries (the one the handler acts for).

    A request without a sign-in cookie passes unchecked: its handler acts for nobody and
    sends the browser to the sign-in form, then back to the form's page. That is where a
    form sent after this browser signed out (in another tab) or its cookie expired must
    lead, not to an error losing what was filled in; its token was bound to the cookie
    the browser no longer sends, so it cannot match.
    """
    form = await read_form(request)
    token = form.pop("csrf_token", None)
    signed_in_cookie = portal_cookie(request)
    if signed_in_cookie:
        _check_token(request, token, signed_in_cookie)
    return form


async def _checked_sign_in_form(request: Request) -> dict[str, str]:
    """The posted sign-in form, its forgery token always checked (against the pre-session
    token when there is no sign-in cookie): a page elsewhere must not sign the browser in."""
    form = await read_form(request)
    _check_token(request, form.pop("csrf_token", None), portal_cookie(request))
    return form


def _check_token(request: Request, token: str | None, signed_in_cookie: str | None) -> None:
    service.check_forgery_token(
        _settings(request).secret_key_bytes(),
        request.cookies.get(host_cookie_name(request, FORGERY_COOKIE)),
        token,
        session=signed_in_cookie,
    )


FormDep = Annotated[dict[str, str], Depends(_checked_form)]
SignInFormDep = Annotated[dict[str, str], Depends(_checked_sign_in_form)]


def _to_login(request: Request, back_to: str | None = None) -> RedirectResponse:
    """To the sign-in form, then back to this page; a form posted after the sign-in
    ended goes back to the page of the form (``back_to``: the browser would GET the
    address it was posted to)."""
    target = back_to or request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target)}", status_code=303)


def _local_target(target: str) -> str:
    """Only paths on this site (never ``//host`` or ``http://``): no open redirect."""
    return target if target.startswith("/") and not target.startswith("//") else "/jobs"


@router.get("/", response_class=HTMLResponse)
def home(request: Request, session: SessionDep) -> Response:
    """Where each service's pages are."""
    return _page(request, "home.html", {"user": _signed_in(request, session)})


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/jobs") -> Response:
    """The sign-in form."""
    return _page(request, "login.html", {"user": None, "next": _local_target(next), "error": None})


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, session: SessionDep, form: SignInFormDep) -> Response:
    """Check the name and password; set the portal's session cookie and go on to ``next``."""
    target = _local_target(form.get("next", "/jobs"))
    try:
        user = authenticate_password(session, form.get("username", ""), form.get("password", ""))
    except ServiceError as exc:  # Unauthorized, or TooManyRequests (with its Retry-After)
        context = {"user": None, "next": target, "error": exc.message,
                   "username": form.get("username", "")}  # fmt: skip
        page = _page(request, "login.html", context, status_code=exc.status_code)
        page.headers.update(exc.headers)
        return page
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        host_cookie_name(request, PORTAL_COOKIE_NAME),
        portal_session_token(user, _settings(request).secret_key_bytes()),
        max_age=COOKIE_MAX_AGE_S,
        httponly=True,
        secure=is_secure(request),
        samesite="lax",
    )
    # A new anti-forgery cookie with the new sign-in: the one of the sign-in form may have
    # been planted by another page (its tokens no longer match anyway, being bound to the
    # sign-in cookie; this makes the pair wholly new).
    _set_forgery_cookie(request, response, service.new_forgery_secret())
    return response


@router.post("/logout")
def logout(request: Request, session: SessionDep, _form: FormDep) -> Response:
    """End the user's portal sessions (in every browser: a copied cookie stops working too)
    and delete this browser's cookie."""
    user = _signed_in(request, session)
    if user is not None:
        end_portal_sessions(session, user)
        session.commit()
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(
        host_cookie_name(request, PORTAL_COOKIE_NAME),
        path="/",
        httponly=True,
        secure=is_secure(request),
        samesite="lax",
    )
    return response


@router.get("/profile", response_class=HTMLResponse)
def profile(request: Request, session: SessionDep) -> Response:
    """Name, e-mail, API key fingerprint, and the button that makes a new key."""
    user = _signed_in(request, session)
    if user is None:
        return _to_login(request)
    return _page(request, "profile.html", {"user": user, "new_key": None})


@router.post("/profile/api-key", response_class=HTMLResponse)
def new_api_key(request: Request, session: SessionDep, form: FormDep) -> Response:
    """Make a new API key and show it, this once. The old key stops working, and so do the
    clients' logins made with it; this browser stays signed in (a password session).

    The form names the key it replaces (``replaces``: its fingerprint); a form whose key
    was replaced already changes nothing. Reloading the page of a new key sends its form
    again, which would otherwise make another key, silently ending the one just shown
    and perhaps copied.
    """
    user = _signed_in(request, session)
    if user is None:
        return _to_login(request, "/profile")
    if not texts_match(form.get("replaces", ""), user.api_key_fingerprint):
        return _page(request, "profile.html", {"user": user, "new_key": None, "stale_form": True})
    key = reset_api_key(session, user)
    session.commit()
    return _page(
        request,
        "profile.html",
        {"user": user, "new_key": key, "fingerprint": key_fingerprint(key)},
    )


@router.get("/jobs", response_class=HTMLResponse)
def jobs(request: Request, session: SessionDep, submitted: int | None = None) -> Response:
    """The user's jobs; states and product links update live over the websocket."""
    user = _signed_in(request, session)
    if user is None:
        return _to_login(request)
    views = service.job_views(session, user.id, download_url_builder(request))
    if not any(view.job_id == submitted for view in views):
        submitted = None  # "Job 99999 submitted." was shown for any number in the address
    context = {"user": user, "jobs": views, "submitted": submitted,
               "job_type_labels": service.job_type_labels()}  # fmt: skip
    return _page(request, "jobs.html", context)


@router.post("/jobs/{job_id}/cancel")
def cancel(request: Request, session: SessionDep, job_id: int, _form: FormDep) -> Response:
    """Cancel one of the user's jobs, then back to the jobs page."""
    user = _signed_in(request, session)
    if user is None:
        return _to_login(request, "/jobs")
    asvo_service.cancel_job(session, user.id, str(job_id))
    session.commit()
    return RedirectResponse("/jobs", status_code=303)


@router.get("/submit", response_class=HTMLResponse)
def submit_page(request: Request, session: SessionDep, obs_id: str = "") -> Response:
    """The job submission form, filled in from the query (``obs_id``, the form's fields)."""
    user = _signed_in(request, session)
    if user is None:
        return _to_login(request)
    given = dict(request.query_params)
    job_type = given.get("job_type") or service.job_type_for(session, obs_id)
    context = {"user": user, "form": {**given, "obs_id": obs_id, "job_type": job_type},
               "error": None}  # fmt: skip
    return _page(request, "submit.html", context)


@router.post("/submit", response_class=HTMLResponse)
def submit(request: Request, session: SessionDep, form: FormDep) -> Response:
    """Submit a job with the API's validation; the form comes back with its message if refused."""
    user = _signed_in(request, session)
    if user is None:
        # Back to the form as it was filled in (not to a GET of this address).
        filled = {key: value for key, value in form.items() if value}  # the token is gone
        return _to_login(request, f"/submit?{urlencode(filled)}")
    try:
        if not form.get("obs_id", "").strip():
            # The API's own words were "Obs Id: Expected not None".
            raise BadRequest("The observation ID is required: enter the obsid (GPS seconds)")
        job_type = asvo_service.job_type_named(form.get("job_type", ""))
        job = asvo_service.submit_job(session, _settings(request), user.id, job_type, form)
    except ServiceError as exc:
        session.rollback()
        context = {"user": user, "form": form, "error": exc.message}
        return _page(request, "submit.html", context, status_code=400)
    session.commit()
    return RedirectResponse(f"/jobs?submitted={job.id}", status_code=303)


@router.get("/observations", response_class=HTMLResponse)
def observations(
    request: Request,
    session: SessionDep,
    mintime: str = "",
    maxtime: str = "",
    projectid: str = "",
    mode: str = "",
    page: int = 1,
) -> Response:
    """Search the archive by time, project and mode; each observation links to its page."""
    user = _signed_in(request, session)
    query = {"mintime": mintime, "maxtime": maxtime, "projectid": projectid, "mode": mode}
    try:
        rows, has_more = service.search_observations(
            session, mintime=mintime, maxtime=maxtime, project_id=projectid, mode=mode, page=page
        )
        error = None
    except ServiceError as exc:
        rows, has_more, error = [], False, exc.message
    context = {"user": user, "rows": rows, "has_more": has_more, "page": page, "query": query,
               "error": error}  # fmt: skip
    return _page(request, "observations.html", context, status_code=400 if error else 200)
