"""One lock per piece of work (an ASVO job, a calibration fit request) across processes.

A dispatcher that restarts submits its unfinished work to Dask again while a run
from before the restart may still be going on a worker. Each run therefore holds
the lock of what it works on from its first look at it to its last write; a second
run waits for the lock, then finds the work finished.
"""

from __future__ import annotations

import fcntl
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from sqlalchemy import Engine, text

from observatory.core.config import Settings

log = logging.getLogger(__name__)

#: Seconds between attempts to take a lock that another run holds.
LOCK_POLL_S = 1.0

#: What a lock kind may be: it names the lock file ``<kind>-<id>``, so no ``-`` and no ``/``.
_KIND = re.compile(r"[a-z][a-z0-9_.]*")

#: A lock's advisory key: per database and schema (the test suite runs one per schema) and
#: per name, ``observatory.<kind>:<id>`` (an ASVO job's, ``observatory.asvo.job:<id>``, is
#: the key its runs have always taken).
_LOCK_KEY = "hashtextextended(current_database() || ':' || current_schema() || ':' || :name, 0)"
_TRY_LOCK = text(f"SELECT pg_try_advisory_lock({_LOCK_KEY})")
_UNLOCK = text(f"SELECT pg_advisory_unlock({_LOCK_KEY})")


class LockLost(Exception):
    """A run's lock went with its database connection (a PostgreSQL restart, a cut
    connection): another run may hold it now, and the work is that run's."""


@contextmanager
def resource_lock(
    settings: Settings, engine: Engine, kind: str, resource_id: int
) -> Iterator[Callable[[], None]]:
    """Hold the lock of ``kind`` ``resource_id`` for the block, waiting while another run holds it.

    Yields a function that raises :class:`LockLost` when the lock is no longer held: a
    run calls it before each write that only the lock's holder may make.

    Parameters
    ----------
    settings
        Where the lock files live on SQLite (``work/.locks``).
    engine
        The database the work is recorded in; its dialect chooses the kind of lock.
    kind
        What is locked, e.g. ``asvo.job`` or ``calib.request``: lower-case letters,
        digits, ``_`` and ``.``. Locks of different kinds never share a key or a file.
    resource_id
        The id of the job, request, ... within its kind.

    Raises
    ------
    ValueError
        If ``kind`` is not a valid lock kind.

    Notes
    -----
    PostgreSQL: a session-level advisory lock (keyed by database, schema, kind and id)
    on a connection of its own, freed by the server if the holder dies. SQLite (one
    host): an exclusive ``flock`` on ``work/.locks/<kind>-<id>``, freed when the
    holder's process ends. Waits as long as the other run lasts (a run left from
    before a restart finishes the work, and this one then finds it finished).
    """
    if not _KIND.fullmatch(kind):
        raise ValueError(f"lock kind {kind!r}: lower-case letters, digits, '_' and '.' only")
    announced = False

    def waiting() -> None:
        nonlocal announced
        if not announced:
            log.warning("%s %d: another run of it holds its lock; waiting", kind, resource_id)
            announced = True
        time.sleep(LOCK_POLL_S)

    if engine.dialect.name == "postgresql":
        key = {"name": f"observatory.{kind}:{resource_id}"}
        connection = engine.connect()
        try:
            while True:
                taken = connection.execute(_TRY_LOCK, key).scalar_one()
                connection.commit()  # a session lock: no transaction left open while waiting
                if taken:
                    break
                waiting()

            def still_held() -> None:
                # A session lock lives as long as its connection: one that still answers
                # holds it.
                try:
                    connection.execute(text("SELECT 1"))
                    connection.commit()
                except Exception as exc:
                    raise LockLost(
                        f"{kind} {resource_id}: the database connection holding its lock is "
                        f"gone ({exc.__class__.__name__}); another run may hold the lock now"
                    ) from exc

            yield still_held
            with suppress(Exception):  # a broken connection has freed the lock already
                connection.execute(_UNLOCK, key)
                connection.commit()
        finally:
            connection.invalidate()  # never back to the pool holding a lock
            connection.close()
        return
    path = settings.work_dir / ".locks" / f"{kind}-{resource_id}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waiting()
        try:
            yield lambda: None  # a file lock lasts as long as this process
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
