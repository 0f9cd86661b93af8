"""The observatory-services command: serve the web services, run the demo, administer
users, projects and the schedule, simulate observations, convert raw visibilities."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import ValidationError
from pydantic_settings import SettingsError
from rich.console import Console
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from observatory.core.config import Settings, get_settings
from observatory.core.database import (
    MAX_SQL_ID,
    MAX_SQL_INTEGER,
    describe_database_error,
    make_engine,
    make_session_factory,
    mask_url,
    session_scope,
)
from observatory.core.errors import ServiceError
from observatory.core.migrate import upgrade
from observatory.core.text import is_ascii_digits

if TYPE_CHECKING:  # the simulator's imports cost every command (a conversion's) 0.3 s
    from observatory.core.models import User
    from observatory.telescope.simulator import PointSource

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def _settings(
    args: argparse.Namespace, *, read_only: bool = False, makes_one: bool = False
) -> Settings:
    """The installation's settings; a command that only reads (``read_only``) refuses a
    missing installation instead of making an empty one, the others say they make one
    (but ``makes_one``, the demo, whose purpose that is).

    Raises
    ------
    ValueError
        For a read-only command where there is no installation (and no database named).
    """
    given = getattr(args, "data_dir", None)
    settings = Settings(data_dir=given) if given else get_settings()
    if not settings.data_dir.exists() and not makes_one:
        # Run from the wrong directory, a command would otherwise work on a new, empty
        # installation (a user created there, "observation does not exist") without a word.
        source = _data_dir_source(given, settings)
        place = f"no installation at {settings.data_dir.resolve()} (from {source})"
        if read_only and not settings.database_url:
            raise ValueError(f"{place}: nothing to read")
        if settings.database_url:  # the database is elsewhere: nothing new is made of it
            err_console.print(
                f"note: {place}; the database is {mask_url(settings.database_url)}",
                highlight=False,
            )
        else:
            err_console.print(f"note: {place}: making a new, empty one", highlight=False)
    return settings


def _data_dir_source(given: Path | None, settings: Settings) -> str:
    """Where ``settings.data_dir`` came from, for the no-installation message."""
    config_file = os.environ.get("OBSERVATORY_CONFIG")
    if given:
        return "--data-dir"
    if os.environ.get("OBSERVATORY_DATA_DIR"):
        return "OBSERVATORY_DATA_DIR"
    if config_file and settings.data_dir != Settings.model_fields["data_dir"].default:
        return f"data_dir in {config_file}"
    return (
        "./observatory-data, the current directory's: run where the installation is, or "
        "give --data-dir or OBSERVATORY_DATA_DIR"
    )


def _session_factory(settings: Settings) -> sessionmaker[Session]:
    """Sessions on the installation's database, migrated to the newest revision first."""
    upgrade(settings.resolved_database_url)
    return make_session_factory(make_engine(settings.resolved_database_url))


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    settings = _settings(args)
    before, after = upgrade(settings.resolved_database_url)
    where = f"database at {mask_url(settings.resolved_database_url)}"
    if before == after:
        console.print(f"{where} is up to date (at revision {after})", highlight=False)
    else:
        # Said, because every other command migrates silently first: this is the one an
        # operator runs to see what a new version changed.
        console.print(
            f"{where} migrated from revision {before or 'none (empty)'} to {after}: up to date",
            highlight=False,
        )
    # The installation's first step makes its data directory (the signing key is kept
    # there): with a database elsewhere nothing else would, and serving does not, so that
    # an unmounted share is not replaced by the local disk. Not its parents: a missing
    # mount point is an error to see.
    if not settings.data_dir.is_dir():
        try:
            settings.data_dir.mkdir()
        except FileNotFoundError:
            raise ValueError(
                f"data directory {settings.data_dir}: its parent {settings.data_dir.parent} "
                "does not exist (is the shared file system mounted?)"
            ) from None
        console.print(f"made the data directory {settings.data_dir}", highlight=False)
    return 0


def cmd_users_create(args: argparse.Namespace) -> int:
    from observatory.core.accounts import create_user

    settings = _settings(args)
    with session_scope(_session_factory(settings)) as session:
        user, key = create_user(session, args.name, args.api_key, email=args.email)
        if args.password:
            from observatory.core.accounts import set_password

            set_password(session, user, _read_password(args.name))
        console.print(f"created user {user.name} (id {user.id})", highlight=False)
    # The key goes to stdout alone on its line, so scripts can capture it.
    print(f"API key: {key}")
    return 0


def _read_password(name: str) -> str:
    """A password from the terminal (asked twice) or, when piped, the first line of stdin."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    import getpass

    first = getpass.getpass(f"password for {name}: ")
    if getpass.getpass("again: ") != first:
        raise ValueError("the two passwords differ")
    return first


def _named_user(session: Session, name: str) -> User:
    """The user called ``name``; a ValueError naming it when there is none."""
    from sqlalchemy import select

    from observatory.core.models import User

    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise ValueError(f"no user named {name!r}")
    return user


def cmd_users_set_password(args: argparse.Namespace) -> int:
    from observatory.core.accounts import set_password

    settings = _settings(args)
    with session_scope(_session_factory(settings)) as session:
        set_password(session, _named_user(session, args.name), _read_password(args.name))
    console.print(f"password set for {args.name}: they can sign in to the portal", highlight=False)
    return 0


def cmd_users_revoke_key(args: argparse.Namespace) -> int:
    from observatory.core.accounts import reset_api_key

    settings = _settings(args)
    with session_scope(_session_factory(settings)) as session:
        # A new random key that is never shown: the row always holds a key's hash, and
        # nobody holds a working one until the user makes one on their portal profile.
        reset_api_key(session, _named_user(session, args.name))
    console.print(
        f"API key of {args.name} revoked: it, and the clients' logins made with it, stop "
        "working now; they can make a new key on their portal profile",
        highlight=False,
    )
    return 0


def cmd_projects_create(args: argparse.Namespace) -> int:
    from observatory.core.accounts import create_project

    settings = _settings(args)
    with session_scope(_session_factory(settings)) as session:
        project = create_project(
            session,
            args.id,
            priority=args.priority,
            secure_key=args.secure_key,
            description=args.description,
        )
        console.print(
            f"created project {project.id} (priority {project.priority}"
            f"{', secured by a key' if project.secure_key_hash else ''})",
            highlight=False,
        )
    return 0


def cmd_projects_list(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from observatory.core.models import Project

    settings = _settings(args, read_only=True)
    with session_scope(_session_factory(settings)) as session:
        projects = session.scalars(select(Project).order_by(Project.priority.desc(), Project.id))
        for project in projects:
            key = "key set" if project.secure_key_hash else "no key: cannot trigger"
            # Tab-separated on stdout as it is (rich would expand the tabs): for scripts too.
            print(f"{project.id}\tpriority {project.priority}\t{key}\t{project.description}")
    return 0


def cmd_projects_set_key(args: argparse.Namespace) -> int:
    from observatory.core.accounts import set_project_key
    from observatory.core.models import Project
    from observatory.core.security import new_api_key

    settings = _settings(args)
    with session_scope(_session_factory(settings)) as session:
        project = session.get(Project, args.id)
        if project is None:
            raise ValueError(f"no project {args.id!r}")
        if args.remove:
            set_project_key(session, project, None)
            console.print(
                f"project {project.id} has no key now: it cannot trigger", highlight=False
            )
            return 0
        key = args.secure_key or new_api_key()
        set_project_key(session, project, key)
        console.print(
            f"project {project.id} has a new key; triggers with the old one are refused",
            highlight=False,
        )
    # The key goes to stdout alone on its line, so scripts can capture it.
    print(f"secure key: {key}")
    return 0


def cmd_archive_ingest(args: argparse.Namespace) -> int:
    from observatory.archive.service import ingest_directory
    from observatory.core.storage import Storage

    settings = _settings(args)
    with session_scope(_session_factory(settings)) as session:
        report = ingest_directory(session, Storage(settings.archive_dir), Path(args.directory))
    for path, note in report.warnings:
        err_console.print(f"warning: {path}: {note}", highlight=False)
    for path, reason in report.skipped:
        err_console.print(f"skipped: {path}: {reason}", highlight=False)
    console.print(
        f"ingested {len(report.observations_added)} new observation(s), "
        f"{len(report.files_added)} new file(s); {len(report.files_unchanged)} file(s) already archived",
        highlight=False,
    )
    return 0


#: ``simulate observation``'s correlator integration time without ``--int-time``.
DEFAULT_SIMULATED_INT_TIME_S = 2.0


def cmd_simulate_observation(args: argparse.Namespace) -> int:
    from observatory.archive.service import check_project_known
    from observatory.archive.simulated import catalogue_point_source, simulate_and_register

    if args.obsid % 8:
        raise ValueError(
            f"--obsid {args.obsid} is not a multiple of 8: observations start on 8-second "
            f"boundaries (e.g. {args.obsid // 8 * 8})"
        )
    if args.mode == "MWAX_VCS" and args.int_time is not None:
        # VCS sub-files are always 8 s long: a given --int-time would be silently ignored.
        raise ValueError(
            "--int-time is for correlator observations: MWAX_VCS writes one 8 s sub-file per "
            "coarse channel per --timesteps (about 41 MB per tile each)"
        )
    if args.int_time is None:
        args.int_time = DEFAULT_SIMULATED_INT_TIME_S
    settings = _settings(args)
    with session_scope(_session_factory(settings)) as session:
        check_project_known(session, args.project)  # as schedule observation checks it
        _check_free_in_schedule(session, args)
        obs = simulate_and_register(
            session,
            settings,
            obsid=args.obsid,
            n_tiles=args.tiles,
            coarse_chans=args.coarse_chans,
            fine_chan_khz=args.fine_chan_khz,
            n_timesteps=args.timesteps,
            int_time_s=args.int_time,
            sources=args.source
            or ([catalogue_point_source(args.calibrator)] if args.calibrator else []),
            calibrator=args.calibrator,
            mode=args.mode,
            project_id=args.project,
            seed=args.seed,
        )
    console.print(
        f"simulated observation {obs.obsid} ({obs.obsname}): {len(obs.files)} file(s) in "
        f"{settings.archive_dir / str(obs.obsid)}",
        highlight=False,
    )
    return 0


def _check_free_in_schedule(session: Session, args: argparse.Namespace) -> None:
    """Refuse an observation overlapping one already in the schedule (the telescope makes
    one at a time; /metadata/find would list both)."""
    from observatory.archive.service import overlapping_observation
    from observatory.core.gpstime import now_gps
    from observatory.telescope.instrument import MWAX_SUBOBS_S

    step_s = MWAX_SUBOBS_S if args.mode == "MWAX_VCS" else args.int_time
    stop = args.obsid + math.ceil(args.timesteps * step_s)
    now = now_gps()
    if stop > now:
        # The archive holds what has happened: a future observation with data would show as
        # upcoming, and a trigger overriding it would delete archived data.
        raise ValueError(
            f"observation {args.obsid} would end at {stop}, in the future (now {now}): the "
            "archive holds observations that have happened (`observatory schedule observation` "
            "puts one in the schedule; the simulated telescope records it when it ends)"
        )
    other = overlapping_observation(session, args.obsid, stop)
    if other is not None and other.obsid != args.obsid:  # the same obsid: "already exists"
        raise ValueError(
            f"observation {args.obsid} (to {stop}) would overlap observation {other.obsid} "
            f"({other.obsname}, {other.obsid} to {other.stoptime})"
        )


def cmd_schedule_observation(args: argparse.Namespace) -> int:
    from observatory.archive.service import schedule_observation
    from observatory.core.gpstime import now_gps_precise
    from observatory.trigger.service import first_start_gps, vcs_free_s

    settings = _settings(args)
    now = now_gps_precise()
    start = first_start_gps(now) if args.start == "now" else _gps_start(args.start)

    def read_vcs_free_s(session: Session, now_gps_s: float) -> int:
        # The VCS disk's room as triggervcs reads it, on this installation's settings.
        return vcs_free_s(session, settings, now_gps_s)

    with session_scope(_session_factory(settings)) as session:
        observation = schedule_observation(
            session, start_gps=start, duration_s=args.duration, mode=args.mode,
            coarse_chans=args.coarse_chans, project_id=args.project,
            obsname=args.obsname or f"{args.mode.lower()}_{start}", now_gps_s=now,
            vcs_free_s=read_vcs_free_s, interruptible=args.interruptible,
        )  # fmt: skip
        console.print(
            f"scheduled {observation.obsid} {observation.obsname} ({observation.mode}) until "
            f"{observation.stoptime}" + ("" if args.interruptible else ", not interruptible"),
            highlight=False,
        )
    return 0


def _gps_start(text: str) -> int:
    if not is_ascii_digits(text):
        raise ValueError(f"--start {text!r} must be now or a GPS second")
    return int(text)


#: ``observatory preprocess`` flags that carry an ASVO conversion key's value.
PREPROCESS_VALUE_OPTIONS = {
    "output": "uvfits, ms or both (default: from --out's suffix, else uvfits)",
    "avg_time_res": "average to this time resolution (s; a multiple of the integration time)",
    "avg_freq_res": "average to this frequency resolution (kHz; a multiple of the fine channel width)",
    "flag_edge_width": "flag this much at each coarse-channel edge (kHz; 0 disables; default 80)",
    "centre": "phase centre: phase (the metafits phase centre, default), pointing or custom",
    "phase_centre_ra": "custom phase centre RA (degrees, ICRS)",
    "phase_centre_dec": "custom phase centre Dec (degrees, ICRS)",
}
#: ``observatory preprocess`` switches, each setting an ASVO conversion key to true.
PREPROCESS_SWITCHES = {
    "no_rfi": "skip AOFlagger RFI flagging",
    "no_geometric_delay": "do not phase the data (the phase centre is still recorded)",
    "no_cable_delay": "do not correct cable lengths",
    "no_digital_gains": "do not divide out the digital gains",
    "no_passband_gains": "do not divide out the coarse-channel passband",
    "no_flag_dc": "do not flag the DC fine channel (flagged by default on legacy data)",
    "flag_dc": "flag the DC fine channel (also on MWAX data)",
    "allow_missing": "convert even if coarse channels of the metafits have no files",
}


def cmd_preprocess(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from observatory.core.processes import die_with_starter
    from observatory.preprocess.engine import OUTPUT_SUFFIXES, preprocess
    from observatory.preprocess.options import ConversionOptions, parse_bool
    from observatory.preprocess.reader import ReadError

    params: dict[str, object] = {}
    for key in PREPROCESS_VALUE_OPTIONS:
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    for key in PREPROCESS_SWITCHES:
        if getattr(args, key):
            params["flagdcchannels" if key == "flag_dc" else key] = "true"
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--option {item!r} is not KEY=VALUE")
        key, value = key.strip(), value.strip()
        if key in params and params[key] != value:  # it silently won over --output, say
            raise ValueError(
                f"--option {item!r} contradicts the option giving {key}={params[key]}: give one"
            )
        params[key] = value
    suffix_format = OUTPUT_SUFFIXES.get(args.out.suffix.lower())
    if "output" not in params and suffix_format is not None:
        params["output"] = suffix_format
    if args.solutions is not None:
        given = params.get("apply_di_cal")
        if given is not None and not parse_bool("apply_di_cal", given):
            raise ValueError(
                f"--solutions applies the solutions, which contradicts --option "
                f"apply_di_cal={given}: give one"
            )
        params["apply_di_cal"] = "true"
    options = ConversionOptions.from_params(params)

    if args.obsid is not None:
        if args.metafits or args.files:
            raise ValueError("give either --obsid or --metafits with data files, not both")
        from observatory.archive.service import correlator_inputs
        from observatory.core.storage import Storage

        settings = _settings(args)
        with session_scope(_session_factory(settings)) as session:
            metafits, files = correlator_inputs(session, Storage(settings.archive_dir), args.obsid)
    elif args.metafits is None:
        raise ValueError("give --metafits and the correlator data files, or --obsid")
    else:
        metafits, files = args.metafits, args.files

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    # No refresh thread: the conversion may fork worker processes.
    with Progress(*columns, console=err_console, transient=False, auto_refresh=False) as bar:
        task = bar.add_task("converting", total=None)

        stop_signals: list[int] = []

        def stop(signum: int) -> NoReturn:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)

        def report(done: int, total: int, what: str) -> None:
            if stop_signals:  # its exception was swallowed (see stop_on_signal)
                stop(stop_signals[0])
            bar.update(task, completed=done, total=total, description=f"converted {what}")
            bar.refresh()

        def stop_on_signal(signum: int, _frame: object) -> None:
            """Leave through the ``finally`` blocks and context managers: ``KeyboardInterrupt``
            for SIGINT, ``SystemExit`` for SIGTERM.

            Raised inside a callback from C (numba's compiler) or a fork handler (logging's,
            while workers start), the exception is only printed and dropped: the next
            chunk's progress report raises it again.
            """
            stop_signals.append(signum)
            stop(signum)

        # A stop signal (a batch system's time limit, systemd) ends the conversion as
        # Ctrl-C does: through its cleanup, so no partial output or scratch files are left.
        previous = {
            signum: signal.signal(signum, stop_on_signal)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        # Started for an ASVO job: stop (through the cleanup) if that job's worker dies.
        die_with_starter(signal.SIGTERM)
        try:
            written = preprocess(
                metafits, files, options, args.out,
                solutions=args.solutions, progress=report, workers=args.workers,
            )  # fmt: skip
        except ReadError as exc:
            if stop_signals:
                stop(stop_signals[0])
            raise ValueError(str(exc)) from None
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception:
            # A stop signal whose exception a library swallowed (raised in a callback from
            # C) can leave it to fail on half-written state: the run was stopped, and says so
            # (status 130 or 143), not an invented error.
            if stop_signals:
                stop(stop_signals[0])
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    for path in written:
        console.print(f"wrote {path}", highlight=False)
    return 0


def cmd_calib_solve(args: argparse.Namespace) -> int:
    from observatory.calib.solving import check_solvable, solve_observation
    from observatory.core.processes import die_with_starter
    from observatory.preprocess.reader import ReadError

    die_with_starter()  # started for a fit request: nothing to finish once its worker is gone
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be at least 1 (got {args.workers})")
    try:
        solved = solve_observation(
            args.metafits, args.files, args.source, flag_rfi=not args.no_rfi, workers=args.workers
        )
        # Nothing solved (every gain NaN) is a failure, as the pipeline's, not an output:
        # check_solvable raises Unsolvable (a ValueError: an error line, exit status 2).
        check_solvable(solved, len(args.files))
        solved.save(args.out)
    except (ReadError, RuntimeError, OSError) as exc:  # one line for the fit's error
        raise ValueError(str(exc) or exc.__class__.__name__) from None
    console.print(f"wrote {args.out}", highlight=False)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:

    from observatory.app import create_app

    # Whether a missing data directory is made (SQLite's default database is in it) is
    # known only after the migration: said then, once (the usual note claimed a new one
    # was being made, and the warning below then said it did not exist).
    settings = _settings(args, makes_one=True)
    if settings.log_format == "json":  # from the first line on (uvicorn configures it again)
        from logging.config import dictConfig

        from observatory.core.observability import json_log_config

        dictConfig(json_log_config())
    missing = not settings.data_dir.exists()
    upgrade(settings.resolved_database_url)
    if missing and settings.data_dir.is_dir():
        source = _data_dir_source(getattr(args, "data_dir", None), settings)
        _server_note(
            settings,
            logging.INFO,
            f"no installation at {settings.data_dir.resolve()} (from {source}): "
            "made a new, empty one",
        )
    _warn_if_no_data_dir(settings)
    _run_server(
        create_app(_serving(settings, args), run_jobs=True), args, log_format=settings.log_format
    )
    return 0


def _warn_if_no_data_dir(settings: Settings) -> None:
    """Say so at start when the data directory is missing (an unmounted share), naming it.

    Serving does not create it (``demo`` does; with the default SQLite database the
    migration has), and ``/readyz`` answers 503 naming it until it is there.
    """
    path = settings.data_dir.absolute()
    if not path.is_dir():
        _server_note(
            settings,
            logging.WARNING,
            f"data directory {path} does not exist (is the shared file system mounted?); "
            "/readyz reports not ready until it does",
        )


def _server_note(settings: Settings, level: int, text: str) -> None:
    """A server's note or warning at start: a JSON log line with ``OBSERVATORY_LOG_FORMAT=json``
    (every line of its stderr is one, for ``jq``), else a line for a person."""
    if settings.log_format == "json":
        logging.getLogger("observatory.cli").log(level, text)
    else:
        label = "[yellow]warning:[/yellow]" if level >= logging.WARNING else "note:"
        err_console.print(f"{label} {text}", highlight=False)


def _serving(settings: Settings, args: argparse.Namespace) -> Settings:
    """The settings a server runs with (``--no-telescope`` switches the telescope off)."""
    return (
        settings.model_copy(update={"telescope_runner": False}) if args.no_telescope else settings
    )


#: Seconds ``serve``/``demo`` wait for running requests after SIGTERM (uvicorn
#: ``--timeout-graceful-shutdown``, as deploy/observatory-web@.service).
GRACEFUL_SHUTDOWN_S = 30
#: Seconds after that for the app's own shutdown before the process exits regardless.
SHUTDOWN_MARGIN_S = 15


def _check_tls_options(args: argparse.Namespace) -> None:
    """A certificate needs its key, and a key its certificate; both must load (PEM).

    Raises
    ------
    ValueError
        Naming the option and file at fault (uvicorn's own errors name neither).
    """
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise ValueError("--ssl-certfile and --ssl-keyfile go together")
    if not args.ssl_certfile:
        return
    import ssl

    for option, path in (
        ("--ssl-certfile", args.ssl_certfile),
        ("--ssl-keyfile", args.ssl_keyfile),
    ):
        if not os.path.isfile(path):
            raise ValueError(f"{option} {path}: no such file")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(
            f"--ssl-certfile {args.ssl_certfile} with --ssl-keyfile {args.ssl_keyfile}: not a "
            f"PEM certificate and its private key ({exc})"
        ) from None


def _run_server(app: object, args: argparse.Namespace, *, log_format: str) -> None:
    """uvicorn on the chosen address, with TLS when a certificate is given (giant-squid is https-only).

    ``log_format`` ``json`` (``OBSERVATORY_LOG_FORMAT``): every log line a JSON object with
    the request id, and the app's access line instead of uvicorn's.
    """
    import uvicorn

    _check_tls_options(args)
    log_options: dict[str, Any] = {}
    if log_format == "json":
        from observatory.core.observability import json_log_config

        log_options = {"log_config": json_log_config(), "access_log": False}
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=args.host,
        port=args.port,
        log_level="info",
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        # On SIGTERM, requests still running after this long are cancelled (as in the web
        # workers' unit): one hung on the database must not keep the process alive.
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        **log_options,
    )
    if log_format == "text":  # uvicorn's access lines (configured by uvicorn.Config)
        from observatory.core.observability import WithoutQueryStrings

        logging.getLogger("uvicorn.access").addFilter(WithoutQueryStrings())
    server = _server_with_exit_deadline(config)
    server.run()
    if not server.started:
        raise SystemExit(3)  # as uvicorn.run: it could not start (the port is taken, ...)


def _server_with_exit_deadline(config: Any) -> Any:
    """A uvicorn server that, once told to stop, exits at the latest after a deadline.

    uvicorn's graceful-shutdown timeout cancels request tasks, but a handler running in a
    thread (a query on a database that stopped answering) cannot be cancelled, and the
    job runner's shutdown (dispatcher, callbacks) may wait on the same database. So the
    first SIGTERM/SIGINT also starts a timer: ``GRACEFUL_SHUTDOWN_S + SHUTDOWN_MARGIN_S``
    seconds later the process exits (status 1), logging why.
    """
    import threading

    import uvicorn

    class DeadlineServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                deadline = GRACEFUL_SHUTDOWN_S + SHUTDOWN_MARGIN_S
                timer = threading.Timer(deadline, _exit_after_deadline, args=(deadline,))
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: Any = None) -> None:
            # An idle TLS keep-alive connection would hold the stop for asyncio's TLS shutdown
            # (up to 30 s waiting for the client's close_notify): with no response under
            # way, nothing is lost by cutting it.
            for connection in list(self.server_state.connections):
                transport = getattr(connection, "transport", None)
                cycle = getattr(connection, "cycle", None)
                idle = cycle is None or cycle.response_complete
                if idle and transport is not None and transport.get_extra_info("sslcontext"):
                    transport.abort()
            await super().shutdown(sockets)

    return DeadlineServer(config)


def _exit_after_deadline(deadline_s: float) -> None:
    import logging
    import os

    logging.getLogger("observatory.cli").error(
        "shutdown did not finish within %g s of the stop signal (a request or background task "
        "is stuck, e.g. on the database): exiting now",
        deadline_s,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def cmd_demo(args: argparse.Namespace) -> int:
    from observatory.demo import seed_demo

    _check_tls_options(args)  # before seeding and printing URLs that would not be served
    if not args.no_serve:
        # Seeding makes a new API key, portal password and project key: done on the way to
        # a port that is taken, it would cut off the demo already serving there for nothing.
        _check_port_free(args.host, args.port)
    settings = _settings(args, makes_one=True)
    summary = seed_demo(settings, console=console)
    scheme = "https" if args.ssl_certfile else "http"
    base = f"{scheme}://{args.host}:{args.port}"
    console.print("\n[bold]observatory-services demo[/bold]")
    console.print(f"  data directory : {settings.data_dir.resolve()}", highlight=False)
    console.print(f"  portal         : {base}/  (sign in below)", highlight=False)
    console.print(f"  health         : {base}/healthz", highlight=False)
    console.print(f"  API docs       : {base}/docs", highlight=False)
    console.print(f"  observations   : {base}/metadata/find", highlight=False)
    console.print(f"  triggers       : {base}/trigger/find", highlight=False)
    console.print(
        f"  one observation: {base}/metadata/obs_page?obs_id={summary.obsids[0]}", highlight=False
    )
    console.print(f"  demo user      : {summary.user_name}", highlight=False)
    console.print(f"  portal password: {summary.password}", highlight=False)
    print(f"API key: {summary.api_key}")  # at the line's start, for scripts: grep '^API key:'
    console.print(
        f"  trigger project: {summary.project_id} (secure key: {summary.project_key})",
        highlight=False,
    )
    sys.stdout.flush()
    if args.no_serve:
        return 0
    from observatory.app import create_app

    _run_server(
        create_app(_serving(settings, args), run_jobs=True), args, log_format=settings.log_format
    )
    return 0


def _check_port_free(host: str, port: int) -> None:
    """Whether uvicorn will be able to listen on ``host``:``port``, tried as it will bind.

    The port is only tried, not kept: another program may still take it before uvicorn
    binds (then the server fails to start, as it always did).

    Raises
    ------
    ValueError
        Naming the address and why it cannot be listened on (in use, not this machine's,
        a name that does not resolve).
    """
    import errno
    import socket

    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def refused(exc: OSError) -> ValueError:
        hint = (
            ": is a server (an earlier demo?) running there? Stop it or choose another --port"
            if exc.errno == errno.EADDRINUSE
            else ""
        )
        return ValueError(
            f"--host {host} --port {port}: cannot listen on {address} "
            f"({exc.strerror or exc}); nothing was seeded or changed{hint}"
        )

    # As asyncio's create_server, which uvicorn listens with: every address the host name
    # has (localhost: IPv4 and IPv6), SO_REUSEADDR (so a port in TIME_WAIT after a server
    # stopped counts as free, as it does for uvicorn), IPv6 sockets IPv6-only.
    try:
        found = socket.getaddrinfo(
            host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise refused(exc) from None
    for family, kind, protocol, _name, sockaddr in dict.fromkeys(found):
        try:
            with socket.socket(family, kind, protocol) as probe:
                if os.name == "posix":  # asyncio's default (on Windows it would share a port)
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(sockaddr)
        except OSError as exc:
            raise refused(exc) from None


def _int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high`` (what the database holds)."""

    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{text} is out of range ({low} .. {high})")
        return number

    return parse


def _positive_number(text: str) -> float:
    """An argparse type: a finite number above 0 (``nan`` and ``inf`` parse as floats)."""
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a finite number above 0")
    return number


def _secure_key(text: str) -> str:
    """An argparse type: a project's key, not empty (an empty one was taken as none given)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "an empty key: give one, or leave --secure-key out (set-key then makes a random "
            "one; a project made without one cannot trigger)"
        )
    return text


def _comma_ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from exc


def _point_source(text: str) -> PointSource:
    from observatory.telescope.simulator import PointSource

    parts = [part.strip() for part in text.split(",")]
    try:
        ra_deg, dec_deg, flux_jy = (float(p) for p in parts[:3])
        alpha = float(parts[3]) if len(parts) > 3 else -0.8
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"source {text!r}: expected RA_DEG,DEC_DEG,FLUX_JY[,SPECTRAL_INDEX][,NAME]"
        ) from exc
    return PointSource(ra_deg, dec_deg, flux_jy, alpha, parts[4] if len(parts) > 4 else "")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``observatory`` command."""
    parser = argparse.ArgumentParser(prog="observatory", description=__doc__)
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="data directory (default: OBSERVATORY_DATA_DIR or ./observatory-data)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        handler: Callable[[argparse.Namespace], int],
        help_text: str,
        parent: argparse._SubParsersAction = commands,
    ) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    serve = add("serve", cmd_serve, "run the web services (and the ASVO job dispatcher)")
    demo = add("demo", cmd_demo, "seed a demo archive, print URLs and an API key, then serve")
    for server in (serve, demo):
        server.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
        server.add_argument(
            "--port", type=_int_in(1, 65535), default=8000, help="port to listen on (8000)"
        )
        server.add_argument("--ssl-certfile", help="serve https with this certificate (PEM)")
        server.add_argument("--ssl-keyfile", help="the certificate's private key (PEM)")
        server.add_argument(
            "--no-telescope", action="store_true",
            help="do not run the simulated telescope (it records scheduled observations as they end)",
        )  # fmt: skip
    demo.add_argument("--no-serve", action="store_true", help="seed and print, but do not serve")

    db = add("db", lambda _a: 0, "database administration")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    add("upgrade", cmd_db_upgrade, "apply database migrations", db_commands)

    users = add("users", lambda _a: 0, "user accounts")
    user_commands = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    create_user = add(
        "create", cmd_users_create, "create a user and print its API key", user_commands
    )
    create_user.add_argument("name", help="user name (A-Z a-z 0-9 _ . @ -)")
    create_user.add_argument("--api-key", help="use this key instead of a random one")
    create_user.add_argument(
        "--email", help="the user's e-mail address (shown on their portal profile)"
    )
    create_user.add_argument(
        "--password",
        action="store_true",
        help="also set a portal password (asked for; or the first line of stdin when piped)",
    )
    set_password = add(
        "set-password",
        cmd_users_set_password,
        "set a user's portal password (asked for; or the first line of stdin when piped)",
        user_commands,
    )
    set_password.add_argument("name", help="user name")
    revoke_key = add(
        "revoke-key",
        cmd_users_revoke_key,
        "revoke a user's API key at once (and the clients' logins made with it)",
        user_commands,
    )
    revoke_key.add_argument("name", help="user name")

    projects = add("projects", lambda _a: 0, "observing projects")
    project_commands = projects.add_subparsers(
        dest="projects_command", required=True, metavar="ACTION"
    )
    create_project = add(
        "create", cmd_projects_create, "create an observing project", project_commands
    )
    create_project.add_argument("id", help="project id, e.g. G0055 (A-Z a-z 0-9 _)")
    create_project.add_argument(
        "--priority", type=_int_in(-MAX_SQL_ID - 1, MAX_SQL_ID), required=True,
        help="a trigger may interrupt observations of projects of lower priority",
    )  # fmt: skip
    create_project.add_argument(
        "--secure-key", type=_secure_key,
        help="the key its triggers must carry (without one it cannot trigger)",
    )  # fmt: skip
    create_project.add_argument("--description", default="", help="free text")
    add("list", cmd_projects_list, "list the projects, their priorities and keys", project_commands)
    set_key = add(
        "set-key",
        cmd_projects_set_key,
        "give a project a new secure key (printed), or take its key away",
        project_commands,
    )
    set_key.add_argument("id", help="project id")
    key_choice = set_key.add_mutually_exclusive_group()
    key_choice.add_argument(
        "--secure-key", type=_secure_key, help="this key (default: a new random one)"
    )
    key_choice.add_argument(
        "--remove", action="store_true", help="no key: the project can no longer trigger"
    )

    schedule = add("schedule", lambda _a: 0, "the observing schedule")
    schedule_commands = schedule.add_subparsers(
        dest="schedule_command", required=True, metavar="WHAT"
    )
    scheduled = add(
        "observation",
        cmd_schedule_observation,
        "put an observation in the schedule (the simulated telescope records it once it ends; "
        "MWAX_BUFFER holds voltages for triggerbuffer)",
        schedule_commands,
    )
    scheduled.add_argument(
        "--start", default="now", help="GPS second (a multiple of 8), or now (default: the next "
        "8-second boundary at least 4 s away)",
    )  # fmt: skip
    scheduled.add_argument(
        "--duration", type=_int_in(8, MAX_SQL_INTEGER), required=True,
        help="seconds (a multiple of 8; at most 2 days)",
    )  # fmt: skip
    scheduled.add_argument(
        "--mode", choices=("MWAX_CORRELATOR", "MWAX_VCS", "MWAX_BUFFER"), default="MWAX_CORRELATOR"
    )
    scheduled.add_argument(
        "--coarse-chans", type=_comma_ints, default=[133, 134],
        help="receiver channel numbers, comma separated (133,134)",
    )  # fmt: skip
    scheduled.add_argument("--project", default="D0000", help="project id (D0000)")
    scheduled.add_argument("--obsname", help="name (default: <mode>_<start>)")
    scheduled.add_argument(
        "--not-interruptible", dest="interruptible", action="store_false",
        help="no other project's trigger may interrupt it, whatever its priority",
    )  # fmt: skip

    simulate = add("simulate", lambda _a: 0, "simulated telescope")
    simulate_commands = simulate.add_subparsers(
        dest="simulate_command", required=True, metavar="WHAT"
    )
    observation = add(
        "observation",
        cmd_simulate_observation,
        "simulate one observation into the archive",
        simulate_commands,
    )
    observation.add_argument(
        "--obsid",
        type=_int_in(0, MAX_SQL_INTEGER),
        required=True,
        help="GPS start second (a multiple of 8)",
    )
    observation.add_argument("--tiles", type=int, default=8, help="number of tiles (8)")
    observation.add_argument(
        "--coarse-chans",
        type=_comma_ints,
        default=[133, 134],
        help="receiver channel numbers, comma separated (133,134)",
    )
    observation.add_argument(
        "--fine-chan-khz", type=_positive_number, default=40.0, help="fine channel width (kHz; 40)"
    )
    observation.add_argument(
        "--int-time", type=_positive_number, default=None,
        help="correlator integration time (s; 2); not with --mode MWAX_VCS, whose sub-files "
        "are always 8 s",
    )  # fmt: skip
    observation.add_argument(
        "--timesteps", type=int, default=4,
        help="integrations (4); with --mode MWAX_VCS, 8 s sub-files per coarse channel, each "
        "about 41 MB per tile",
    )  # fmt: skip
    observation.add_argument(
        "--source", type=_point_source, action="append", default=[],
        help="a point source RA_DEG,DEC_DEG,FLUX_JY_150MHZ[,SPECTRAL_INDEX][,NAME] (repeatable; the first is pointed at)",
    )  # fmt: skip
    observation.add_argument(
        "--calibrator",
        help="the calibrator observed (catalogue name, e.g. HydA); without --source it is the sky model",
    )
    observation.add_argument(
        "--mode", default="MWAX_CORRELATOR", choices=["MWAX_CORRELATOR", "MWAX_VCS"],
        help="correlator visibilities (default) or voltage subfiles",
    )  # fmt: skip
    observation.add_argument("--project", default="D0000", help="project id (D0000)")
    observation.add_argument(
        "--seed", type=int, default=0,
        help="random seed of the noise (the gains and delay errors are the array's, the same in every observation) (0)",
    )  # fmt: skip

    convert = add(
        "preprocess",
        cmd_preprocess,
        "convert raw correlator files to uvfits and/or a measurement set (as an ASVO conversion job)",
    )
    convert.add_argument(
        "files", nargs="*", type=Path, help="correlator data files (with --metafits)"
    )
    convert.add_argument("--metafits", type=Path, help="the observation's metafits")
    convert.add_argument("--obsid", type=int, help="convert this archived observation instead")
    convert.add_argument(
        "--out",
        type=Path,
        required=True,
        help="OUT.uvfits (or .uvf, .fits), OUT.ms, or a stem with --output both",
    )
    convert.add_argument(
        "--solutions", type=Path, help="apply these DI solutions (AO-cal .bin or hyperdrive FITS)"
    )
    convert.add_argument(
        "--workers", type=int,
        help="chunks processed at once (default: one per CPU, fewer if memory would not hold them)",
    )  # fmt: skip
    for key, text in PREPROCESS_VALUE_OPTIONS.items():
        convert.add_argument(f"--{key.replace('_', '-')}", dest=key, help=text)
    for key, text in PREPROCESS_SWITCHES.items():
        convert.add_argument(f"--{key.replace('_', '-')}", dest=key, action="store_true", help=text)
    convert.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="any ASVO conversion key, as in an mwa_client CSV (repeatable)",
    )  # fmt: skip

    solve = add(
        "calib-solve",
        cmd_calib_solve,
        "solve a calibrator observation against its catalogue point source (the calibration "
        "pipeline's solve, which a fit request runs in a process of its own); writes an npz "
        "the pipeline reads",
    )
    solve.add_argument("files", nargs="+", type=Path, help="correlator data files")
    solve.add_argument("--metafits", type=Path, required=True, help="the observation's metafits")
    solve.add_argument(
        "--source", required=True, help="the calibrator's catalogue name (e.g. HydA)"
    )
    solve.add_argument("--out", type=Path, required=True, help="the npz file to write")
    solve.add_argument(
        "--workers", type=int,
        help="coarse channels solved at once (default: one per CPU, fewer if memory would not hold them)",
    )  # fmt: skip
    solve.add_argument(
        "--no-rfi", action="store_true", help="do not flag RFI with AOFlagger before solving"
    )

    archive = add("archive", lambda _a: 0, "the observation archive")
    archive_commands = archive.add_subparsers(
        dest="archive_command", required=True, metavar="ACTION"
    )
    ingest = add(
        "ingest", cmd_archive_ingest, "register real metafits and data files", archive_commands
    )
    ingest.add_argument("directory", help="searched for metafits and their data files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``observatory`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    from observatory.telescope.catalogue import UnknownSourceError
    from observatory.telescope.site import ensure_astropy_offline

    ensure_astropy_offline()
    try:
        return int(args.handler(args))
    except (
        ServiceError, ValueError, OSError, UnknownSourceError, SQLAlchemyError, OverflowError,
    ) as exc:  # fmt: skip
        err_console.print(f"[red]error:[/red] {_one_line(exc, args)}", highlight=False)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the work was cleaned up on the way out
        err_console.print("interrupted", highlight=False)
        return 130


def _one_line(exc: BaseException, args: argparse.Namespace) -> str:
    """What went wrong, in one line for the operator (no traceback, no password)."""
    if isinstance(exc, ServiceError):
        return exc.message
    if isinstance(exc, ValidationError) and exc.title == Settings.__name__:
        problems = "; ".join(
            f"{_setting_name(error['loc'])}: {error['msg']}{_given(error)}"
            for error in exc.errors()
        )
        return f"invalid settings: {problems}"
    parsed = re.match(r'error parsing value for field "(\w+)" from source "(\w+)"', str(exc))
    if isinstance(exc, SettingsError) and parsed:  # a list or mapping setting, not JSON
        return (
            f"invalid settings: {_setting_name((parsed.group(1),))}: not valid JSON, which this "
            "setting is written in (a JSON object or list)"
        )
    if isinstance(exc, SQLAlchemyError):
        try:
            url = _settings(args).resolved_database_url
        except Exception:
            url = "the database"
        return describe_database_error(exc, url) or str(exc).splitlines()[0]
    return str(exc) or exc.__class__.__name__


def _given(error: Any) -> str:
    """`` (got 'Full')``: the value given, unless it may hold a secret."""
    name = str(error["loc"][0]) if error["loc"] else ""
    if "secret" in name or "url" in name or "key" in name:
        return ""
    return f" (got {error['input']!r})"


def _setting_name(loc: tuple[int | str, ...]) -> str:
    """``OBSERVATORY_ASVO_OUTAGE`` for a pydantic error location ``("asvo_outage",)``."""
    name = str(loc[0]) if loc else "?"
    return f"OBSERVATORY_{name.upper()} (or {name} in the OBSERVATORY_CONFIG file)"


if __name__ == "__main__":
    sys.exit(main())
