"""The simulated telescope: observes the schedule as it runs.

When a scheduled correlator observation (one a trigger or an operator put in the
schedule) has ended and has no files yet, the simulator records it into the archive under its
own obsid, so it can be ordered through ASVO like any other observation.
Voltage captures (MWAX_VCS, VOLTAGE_BUFFER) are recorded as MWAX_VCS sub-files
of a few tiles, unless they would exceed ``telescope_max_voltage_bytes`` (a
voltage capture is 41 MB per tile, coarse channel and 8 s): those are left
unrecorded, and said so once. A buffering observation (MWAX_BUFFER) holds only what
``triggerbuffer`` dumped from the buffer: it is recorded, as the sub-files its dumps
saved, once the buffer can reach it no more (``trigger_buffer_s`` after it ended, and
``DUMP_SETTLE_S`` more); one never dumped has nothing to record. A dump's capture into
the future is recorded ``DUMP_SETTLE_S`` after it ends (a dump may still extend it).
What the dumps saved is read through ``buffer_dumps``, the trigger service's reader
that the app hands in: the archive does not depend on the trigger domain.

Stopping the runner cancels the recording in hand (the simulator removes what it wrote):
it is recorded afresh at the next start, as any ended observation without files is.

Of the job runners on one database (``observatory serve``, a standby among them) only one
telescope observes: :class:`TelescopeRunner` records only while it holds its
:class:`SingleRunnerLock`, the kind of lock the ASVO dispatcher holds (its
``DispatcherLock`` is one). Two telescopes recorded the same observation at once before:
the one whose registration lost removed the files the other had registered.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Connection, and_, exists, or_, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from observatory.archive.models import Observation, ObservationFile
from observatory.archive.service import SCHEDULED_BY_OPERATOR
from observatory.archive.simulated import (
    BUFFER_MODE,
    VOLTAGE_MODES,
    dumped_subobs_gps,
    observe_scheduled,
    voltage_bytes,
)
from observatory.core.config import Settings
from observatory.core.database import make_engine, mask_url
from observatory.core.gpstime import now_gps
from observatory.telescope.instrument import (
    array_tiles,
    validate_fine_chan_width_hz,
    validate_int_time_ms,
)
from observatory.telescope.simulator import SimulationCancelled, cancelled_by

log = logging.getLogger(__name__)

#: Modes the simulated telescope records as soon as they end.
CORRELATOR_AND_VCS = ("MWAX_CORRELATOR", "MWAX_VCS")
#: A buffer dump's capture into the future (recorded ``DUMP_SETTLE_S`` after it ends).
CAPTURE_MODE = "VOLTAGE_BUFFER"
#: How long after the buffer loses an observation (or a dump's capture ends) a dump of it
#: may still be committed: a ``triggerbuffer`` call reads the clock before it waits for the
#: schedule's lock, and an observation recorded before its dump's commit would miss that
#: dump (or a capture that dump extends) for good.
DUMP_SETTLE_S = 30.0
#: Longest :meth:`TelescopeRunner.stop` waits for the recording in hand to be cancelled
#: (between two integrations or files, normally well under a second). Well below the 45 s
#: after which ``observatory serve`` exits regardless (``cli.GRACEFUL_SHUTDOWN_S +
#: SHUTDOWN_MARGIN_S``), as the callback sender and dispatcher stop after the telescope.
STOP_WAIT_S = 10.0
#: Per database: observations this process will not try (again): too large, or failed once.
_SKIPPED: dict[str, set[int]] = defaultdict(set)

#: Reads what ``triggerbuffer`` calls saved: for each observation dumped, the spans (GPS
#: seconds, start and end) its dumps captured (``trigger.service.buffer_dumps``).
DumpReader = Callable[[Session], Mapping[int, Sequence[tuple[float, float]]]]

#: The name of the simulated telescope's :class:`SingleRunnerLock`. Its own, not the
#: dispatcher's: the two run in one process, and two holders of one lock in one process
#: (two PostgreSQL sessions, two open lock files) exclude each other as two processes do.
TELESCOPE_LOCK = "archive.telescope"

#: A :class:`SingleRunnerLock`'s advisory key: per lock name, database and schema (the test
#: suite runs one schema per test). ``observatory.asvo.dispatcher:<db>:<schema>`` is the key
#: the dispatcher has always taken.
_RUNNER_LOCK_KEY = "hashtextextended(:prefix || current_database() || ':' || current_schema(), 0)"


class SingleRunnerLock:
    """One holder per database of the lock called ``name``: what makes a loop of the job
    runner (the ASVO dispatcher, the simulated telescope) run in one process only.

    PostgreSQL: a session-level advisory lock (keyed by the name, the database and the
    schema) on a connection of its own; the server frees it when the holder's connection
    ends, however the process ended. SQLite: an exclusive ``flock`` on
    ``<database>.<last part of name>-lock`` beside the database file, freed when the process
    ends. An in-memory SQLite database has no other process: the lock is always held.

    Parameters
    ----------
    database_url
        The database the runner works on.
    name
        What runs alone, e.g. ``asvo.dispatcher``: lower-case letters, digits, ``_``, ``.``.
    what
        The runner, for log lines.
    """

    def __init__(self, database_url: str, name: str, what: str) -> None:
        self.database_url = database_url
        self.name = name
        self.what = what
        url = make_url(database_url)
        self._postgres = url.get_backend_name() == "postgresql"
        self._key = {"prefix": f"observatory.{name}:"}
        self._lock_path: Path | None = None
        if not self._postgres and url.database and url.database != ":memory:":
            database = Path(url.database).resolve()
            suffix = name.rpartition(".")[2]
            self._lock_path = database.with_name(f"{database.name}.{suffix}-lock")
        self._engine: Any = None
        self._connection: Connection | None = None
        self._file: IO[str] | None = None
        self.held = False

    @property
    def description(self) -> str:
        """What is locked, for log lines."""
        if self._postgres:
            return f"a PostgreSQL advisory lock ({self.name}) on {mask_url(self.database_url)}"
        return (
            f"the lock file {self._lock_path}"
            if self._lock_path
            else "nothing (in-memory database)"
        )

    def acquire(self) -> bool:
        """Whether this process holds the lock (taking it if free; never blocks).

        Raises when the database cannot be reached. On PostgreSQL a held lock is
        checked first: if its connection broke, the lock is gone and taken again if free.
        """
        if self._postgres:
            return self._acquire_postgres()
        if self._lock_path is None:
            self.held = True
            return True
        if self._file is None:
            self._lock_path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self._lock_path, "a+")  # noqa: SIM115 (kept open while held)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                return False
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            self._file = handle
        self.held = True
        return True

    def _acquire_postgres(self) -> bool:
        if self._connection is not None:
            try:
                self._connection.execute(text("SELECT 1"))
                self._connection.rollback()  # not idle in a transaction between checks
                return True
            except Exception:
                log.error("%s: lost its database connection, and with it %s",
                          self.what, self.description)  # fmt: skip
                self._drop_connection()
        if self._engine is None:
            self._engine = make_engine(self.database_url)
        connection = self._engine.connect()
        try:
            got = connection.execute(
                text(f"SELECT pg_try_advisory_lock({_RUNNER_LOCK_KEY})"), self._key
            ).scalar_one()
            connection.commit()  # the lock is the session's, not the transaction's
        except Exception:
            connection.invalidate()
            connection.close()
            raise
        if not got:
            connection.close()
            return False
        self._connection = connection
        self.held = True
        return True

    def _drop_connection(self) -> None:
        self.held = False
        if self._connection is not None:
            try:
                self._connection.invalidate()  # never back to the pool: it may hold the lock
                self._connection.close()
            except Exception:
                pass
            self._connection = None

    def release(self) -> None:
        """Free the lock (and its connection or file)."""
        if self._connection is not None:
            # Unlocked before the connection closes: the server frees a closed connection's
            # locks only once its backend has ended, which a runner taking over at once
            # could find still running.
            try:
                self._connection.execute(
                    text(f"SELECT pg_advisory_unlock({_RUNNER_LOCK_KEY})"), self._key
                )
                self._connection.commit()
            except Exception:  # the connection broke: its end frees the lock
                pass
        self._drop_connection()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        self.held = False


def due_observations(
    session: Session, now: float, limit: int, buffer_s: float = 0.0, settle_s: float = 0.0
) -> list[Observation]:
    """Observations a trigger or an operator scheduled that have ended and have no files,
    oldest first (what the telescope records). A buffering observation is due only
    ``buffer_s`` after it ended: until then a dump may still save part of it. A dump's
    capture (VOLTAGE_BUFFER) is due ``settle_s`` after it ended: a dump that read the clock
    while it ran may still extend it."""
    return list(session.scalars(
        select(Observation)
        .where(
            or_(
                and_(Observation.stoptime <= int(now), Observation.mode.in_(CORRELATOR_AND_VCS)),
                and_(Observation.stoptime <= int(now - settle_s), Observation.mode == CAPTURE_MODE),
                and_(Observation.stoptime <= int(now - buffer_s), Observation.mode == BUFFER_MODE),
            ),
            Observation.deleted.is_(False),
            Observation.created_by.in_(["trigger", SCHEDULED_BY_OPERATOR]),
            ~exists().where(ObservationFile.obsid == Observation.obsid),
        )
        .order_by(Observation.obsid)
        .limit(limit)
    ))  # fmt: skip


def observe_due(
    session_factory: sessionmaker[Session],
    settings: Settings,
    *,
    buffer_dumps: DumpReader,
    now: float | None = None,
    limit: int = 1,
    cancel: threading.Event | None = None,
) -> list[int]:
    """Record up to ``limit`` ended observations; returns their obsids.

    Each is simulated and registered in a transaction of its own; one that fails
    is logged and not tried again by this process. ``buffer_dumps`` says what was
    dumped of buffering observations.

    Parameters
    ----------
    cancel
        Once set, the recording in hand stops between two integrations (its files are
        removed) and no other is started; what was not recorded stays due, for the next
        call or the next start.
    """
    now = now_gps() if now is None else now
    skipped = _SKIPPED[settings.resolved_database_url]
    buffer_s = settings.trigger_buffer_s + DUMP_SETTLE_S
    with session_factory() as session:
        due: list[tuple[int, list[int] | None]] = []
        dumps: Mapping[int, Sequence[tuple[float, float]]] | None = None
        # Room for many skipped ones: after a restart, every buffering observation never
        # dumped is looked at once more, and must not hold the newer ones back a pass each.
        for observation in due_observations(
            session, now, limit + len(skipped) + 200, buffer_s, DUMP_SETTLE_S
        ):
            if observation.obsid in skipped:
                continue
            subobs = None
            if observation.mode == BUFFER_MODE:
                # Past the buffer's reach: every dump of it has been made.
                dumps = buffer_dumps(session) if dumps is None else dumps
                subobs = dumped_subobs_gps(observation, dumps.get(observation.obsid, []))
                if not subobs:
                    skipped.add(observation.obsid)  # never dumped: the buffer kept nothing
                    continue
            size = voltage_bytes(observation, settings.telescope_vcs_tiles, subobs)
            voltages = observation.mode in VOLTAGE_MODES or subobs is not None
            if voltages and size > settings.telescope_max_voltage_bytes:
                skipped.add(observation.obsid)
                log.warning("not recording voltage capture %s: %d bytes is more than "
                            "telescope_max_voltage_bytes", observation.obsid, size)  # fmt: skip
                continue
            due.append((observation.obsid, subobs))
        due = due[:limit]
    recorded = []
    for obsid, subobs in due:
        if cancel is not None and cancel.is_set():
            break
        with session_factory() as session:
            scheduled = session.get(Observation, obsid)
            if scheduled is None or scheduled.deleted or _has_files(session, obsid):
                continue  # removed, or recorded (by another telescope) since it was found due
            try:
                with cancelled_by(cancel):
                    observe_scheduled(session, settings, scheduled, subobs)
                session.commit()
            except IntegrityError:
                # Another telescope registered the same files first (its job runner's lock
                # lost, or observe_due called beside one): its recording stands, untouched.
                session.rollback()
                if _has_files(session, obsid):
                    log.info("observation %s was recorded by another telescope", obsid)
                    continue
                skipped.add(obsid)
                log.exception("could not record observation %s; not trying again", obsid)
                continue
            except SimulationCancelled:
                # Not a failure: not skipped, so it is due again (it has no files), as after
                # a kill, and is recorded at the next start.
                session.rollback()
                log.info("stopped recording observation %s: recorded at the next start", obsid)
                break
            except Exception:  # keep the telescope running, without retrying this one
                session.rollback()
                skipped.add(obsid)
                log.exception("could not record observation %s; not trying again", obsid)
                continue
        recorded.append(obsid)
        log.info("recorded observation %s", obsid)
    return recorded


def _has_files(session: Session, obsid: int) -> bool:
    """Whether observation ``obsid`` has files registered (it has been recorded)."""
    return bool(session.scalar(select(exists().where(ObservationFile.obsid == obsid))))


#: The settings of the simulated telescope, and the instrument's rule each must follow.
_TELESCOPE_SETTINGS: dict[str, Callable[[Settings], object]] = {
    "telescope_tiles": lambda settings: array_tiles(n_tiles=settings.telescope_tiles),
    "telescope_vcs_tiles": lambda settings: array_tiles(n_tiles=settings.telescope_vcs_tiles),
    # converted as observe_scheduled converts them
    "telescope_min_fine_chan_khz": lambda settings: validate_fine_chan_width_hz(
        settings.telescope_min_fine_chan_khz * 1000.0
    ),
    "telescope_min_int_time_s": lambda settings: validate_int_time_ms(
        settings.telescope_min_int_time_s * 1000.0
    ),
}


def check_telescope_settings(settings: Settings) -> None:
    """Refuse telescope settings the simulator would refuse for every observation.

    Checked by the instrument's own rules when the server starts: taken as they were (up
    to 256 tiles, any positive width or integration time), the server ran on while every
    observation failed in the simulator, logged "not trying again".

    Raises
    ------
    ValueError
        Naming the setting (its environment variable and config-file key) and the rule.
    """
    for name, rule in _TELESCOPE_SETTINGS.items():
        try:
            rule(settings)
        except ValueError as exc:
            raise ValueError(
                f"invalid settings: OBSERVATORY_{name.upper()} (or {name} in the "
                f"OBSERVATORY_CONFIG file): not what the simulated telescope can record: {exc}"
            ) from None


class TelescopeRunner:
    """A background thread that calls ``observe_due`` every ``poll_s`` seconds, while it
    holds the telescope's :class:`SingleRunnerLock`.

    Of the job runners on one database only one telescope observes; another waits
    (``standby``) and takes over within ``poll_s`` of the first one's stop.

    :meth:`stop` cancels the recording in hand rather than waiting for it: a default
    triggered observation can take most of a minute to simulate on a busy machine, longer
    than a stopping server is given before it exits (which left a hidden ``.part`` file).
    """

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        buffer_dumps: DumpReader,
        *,
        poll_s: float = 5.0,
    ) -> None:
        self._settings = settings
        self._session_factory = session_factory
        self._buffer_dumps = buffer_dumps
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="telescope", daemon=True)
        self.lock = SingleRunnerLock(
            settings.resolved_database_url, TELESCOPE_LOCK, what="simulated telescope"
        )
        #: Whether this telescope waits for another one (on the same database) to stop.
        self.standby = False

    def start(self) -> None:
        """Start observing."""
        self._thread.start()

    def stop(self) -> None:
        """Stop observing, cancelling the observation being recorded, if any.

        The cancelled observation's files (finished and partial) are removed and it is
        recorded at the next start. Waits at most :data:`STOP_WAIT_S` seconds for the
        thread to end; it normally does within a second.
        """
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(STOP_WAIT_S)
            if self._thread.is_alive():  # in the database, or registering files
                log.warning("the telescope did not stop within %g s", STOP_WAIT_S)

    def _hold_lock(self) -> bool:
        """Whether this telescope holds its lock (taken if free); logs each change."""
        held = self.lock.acquire()
        if not held and not self.standby:
            log.warning("simulated telescope: another job runner's telescope holds %s; this "
                        "one records nothing until that one stops", self.lock.description)  # fmt: skip
        elif held and self.standby:
            log.warning("simulated telescope: took %s; recording", self.lock.description)
        self.standby = not held
        return held

    def _run(self) -> None:
        try:
            while not self._stop.wait(self._poll_s):
                try:
                    # The lock is checked before each recording: a PostgreSQL lock goes with
                    # its connection, and another telescope may have it now.
                    while (
                        not self._stop.is_set()
                        and self._hold_lock()
                        and observe_due(
                            self._session_factory,
                            self._settings,
                            buffer_dumps=self._buffer_dumps,
                            cancel=self._stop,
                        )
                    ):
                        pass
                except Exception:  # the database may be away for a moment: try again later
                    log.exception("telescope pass failed")
        finally:
            self.lock.release()
