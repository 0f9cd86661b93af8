"""The FastAPI application: one app mounting every service's router."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from fastapi_offline import FastAPIOffline

from observatory import __version__
from observatory.archive.router import router as metadata_router
from observatory.asvo.models import JobState
from observatory.asvo.router import router as asvo_router
from observatory.asvo.service import ERROR_CODE_INVALID
from observatory.asvo.uws_router import router as uws_router
from observatory.calib.router import router as calib_router
from observatory.core.config import Settings, get_settings
from observatory.core.database import make_engine, make_session_factory
from observatory.core.errors import install_error_handlers
from observatory.core.observability import install_observability
from observatory.core.storage import Storage
from observatory.core.web import AnswerHeadAsGet, RefuseFraming
from observatory.portal.router import router as portal_router
from observatory.telescope.site import ensure_astropy_offline
from observatory.trigger.router import router as trigger_router


def create_app(settings: Settings | None = None, *, run_jobs: bool = False) -> FastAPI:
    """Build the web application for ``settings`` (default: from the environment).

    The database must already be migrated (``observatory db upgrade``; ``serve``
    and ``demo`` do it themselves). With ``run_jobs`` the app also runs the ASVO
    job dispatcher (on ``OBSERVATORY_DASK_SCHEDULER`` or an in-process cluster)
    and, unless ``telescope_runner`` is off, the simulated telescope, while it serves.
    """
    settings = settings or get_settings()
    ensure_astropy_offline()
    if not settings.secret_key and (settings.data_dir / "secret_key").exists():
        # An emptied key file is refused now: the server started and answered every sign-in
        # with a 500. (A missing one is made at the first sign-in, in the data directory.)
        settings.secret_key_bytes()
    if run_jobs and settings.telescope_runner:
        from observatory.archive.runner import check_telescope_settings

        check_telescope_settings(settings)  # refused now, not in every observation
    engine = make_engine(settings.resolved_database_url)
    session_factory = make_session_factory(engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        dispatcher = telescope = None
        callbacks = None
        if run_jobs:
            from observatory.archive.runner import TelescopeRunner
            from observatory.asvo.dispatcher import Dispatcher
            from observatory.calib.requests import CallbackSender
            from observatory.trigger.service import buffer_dumps

            dispatcher = Dispatcher(settings, session_factory)
            dispatcher.start()
            _app.state.dispatcher = dispatcher  # /readyz asks its Dask scheduler
            callbacks = CallbackSender(settings, session_factory)
            callbacks.start()
            if settings.telescope_runner:
                telescope = TelescopeRunner(settings, session_factory, buffer_dumps)
                telescope.start()
        try:
            yield
        finally:
            if telescope is not None:
                telescope.stop()
            if callbacks is not None:
                callbacks.stop()
            if dispatcher is not None:
                dispatcher.stop()
            engine.dispose()

    # /docs and /redoc with Swagger UI and ReDoc served by the app (FastAPI's own load them
    # from a CDN: blank pages where there is no internet, as on the observatory's nodes).
    app = FastAPIOffline(
        title="observatory-services",
        version=__version__,
        description="Data services of an MWA-style radio observatory.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = session_factory
    app.state.archive_storage = Storage(settings.archive_dir)
    app.add_middleware(AnswerHeadAsGet)  # innermost: errors and metrics see the HEAD
    # The ASVO clients read error_code 0 as "invalid input" (1 makes giant-squid give up).
    install_error_handlers(app, parameter_error_codes={"/api/": ERROR_CODE_INVALID})
    install_observability(app, [state.value for state in JobState])  # /metrics, /readyz, ids
    app.add_middleware(RefuseFraming)  # outermost: every answer, errors included

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        """No icon (204): browsers ask every site for one, and a 404 is an error in the
        console of every page."""
        return Response(status_code=204, headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process's event loop answers.

        Nothing else: a liveness probe that failed while the database is away would
        have every process restarted for an outage a restart cannot cure. The
        database, the data directory and Dask are /readyz's.
        """
        return {"status": "ok", "version": __version__}

    app.include_router(metadata_router)
    app.include_router(asvo_router)
    app.include_router(uws_router)
    app.include_router(trigger_router)
    app.include_router(calib_router)
    app.include_router(portal_router)
    return app
