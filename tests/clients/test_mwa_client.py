"""mwa_client against a live ASVO server: the guide's example file, modes, resume, checksums, exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import http.server
import io
import itertools
import json
import logging
import os
import pty
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import blake3
import httpx
import pytest

from observatory.asvo.models import Job
from observatory.clients import asvo
from observatory.clients.csvjobs import parse_job_csv
from observatory.clients.mwa_client import VERSION_STRING, run
from observatory.core.config import Settings
from observatory.core.database import make_engine, make_session_factory, utcnow
from servers import (
    BIN,
    ForwardProxy,
    StallingProxy,
    free_port,
    handler_server,
    observatory_server,
    seed,
    wait_for,
    wait_until,
)

API_KEY = "client-test-key"
OBSID = 1104585920
OTHER_OBSID = 1104586000

#: The guide's example job file (example.csv of manta-ray-client): conversion to uvfits,
#: conversion to a measurement set with calibration, metadata download, visibility download.
GUIDE_EXAMPLE_CSV = f"""\
# MWA ASVO Example CSV file
#
# Example 1: Conversion Job (uvfits output)
obs_id={OBSID}, job_type=c, avg_time_res=10, avg_freq_res=80, flag_edge_width=80, output=uvfits, no_rfi=true

# Example 2: Conversion Job (CASA measurement set output), calibrated
obs_id={OBSID}, job_type=c, avg_time_res=10, avg_freq_res=80, flag_edge_width=80, output=ms, no_rfi=true, apply_di_cal=true

# Example 3: Download Job (metadata files)
obs_id={OBSID}, job_type=d, download_type=vis_meta

# Example 4: Download Job (raw visibility files)
obs_id={OBSID}, job_type=d, download_type=vis
"""


@dataclass
class Server:
    port: int
    data_dir: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environ(self, port: int | None = None, **extra: str) -> dict[str, str]:
        return {
            "MWA_ASVO_API_KEY": API_KEY,
            "MWA_ASVO_HOST": "127.0.0.1",
            "MWA_ASVO_PORT": str(port or self.port),
            "MWA_ASVO_HTTPS": "0",
            **extra,
        }

    def session(self) -> asvo.Session:
        return asvo.Session.login(API_KEY, base_url=self.base_url)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("asvo")
    data_dir = root / "data"
    seed(data_dir, None, [OBSID, OTHER_OBSID], api_key=API_KEY)
    seed_other_user(data_dir)
    port = free_port()
    process = observatory_server(data_dir, port)
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz")
        yield Server(port, data_dir)
    finally:
        process.stop()


def seed_other_user(data_dir: Path) -> None:
    from observatory.cli import main

    assert main(["--data-dir", str(data_dir), "users", "create", "erin",
                 "--api-key", "other-user-key"]) == 0  # fmt: skip


_fresh_users = itertools.count(1)


def fresh_user_environ(server: Server) -> dict[str, str]:
    """The environment of a new user with no jobs (so a submission is never a duplicate)."""
    from observatory.cli import main

    number = next(_fresh_users)
    key = f"fresh-user-key-{number}"
    assert main(["--data-dir", str(server.data_dir), "users", "create", f"fresh{number}",
                 "--api-key", key]) == 0  # fmt: skip
    return server.environ(MWA_ASVO_API_KEY=key)


def mwa_client(*args: str, environ: dict[str, str]) -> tuple[int, str]:
    """Exit code, and stdout followed by stderr (where -l into a file says what it does)."""
    code, out, err = mwa_client_streams(*args, environ=environ)
    return code, out + err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def mwa_client_streams(
    *args: str, environ: dict[str, str], terminal: bool = False
) -> tuple[int, str, str]:
    """Exit code, stdout and stderr (stdout a terminal with ``terminal``)."""
    out = _Terminal() if terminal else io.StringIO()
    err = io.StringIO()
    code = run(list(args), environ=environ, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def blake3_hex(path: Path) -> str:
    return blake3.blake3(path.read_bytes()).hexdigest()


def completed_job(session: asvo.Session, job_id: int, timeout_s: float = 120) -> asvo.Job:
    def done() -> bool:
        job = session.get_job(job_id)
        return job is not None and job.state in asvo.TERMINAL_STATES

    wait_until(done, timeout_s, f"job {job_id}")
    job = session.get_job(job_id)
    assert job is not None
    return job


# -- the guide's example, end to end ---------------------------------------------------


def test_guide_example_csv_runs_end_to_end(server: Server, tmp_path: Path) -> None:
    (tmp_path / "example.csv").write_text(GUIDE_EXAMPLE_CSV)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    error_file = tmp_path / "errors.json"
    code, output = mwa_client(
        "-c", str(tmp_path / "example.csv"), "-d", str(out_dir), "-e", str(error_file),
        environ=server.environ(),
    )  # fmt: skip
    assert code == 4, output  # the calibrated line: no calibration solution exists yet
    errors = json.loads(error_file.read_text())
    assert len(errors) == 1
    (error,) = errors
    assert set(error) == {"job_id", "obs_id", "result"}
    assert error["obs_id"] == str(OBSID) and isinstance(error["job_id"], int)
    assert error["result"].startswith("Error: ") and "calibration" in error["result"]
    assert "There were errors:" in output
    # As the MWA's client says, once the socket is open.
    assert "Connecting to MWA ASVO Notifier...\nConnected to MWA ASVO Notifier\n" in output

    with server.session() as session:
        jobs = {job.id: job for job in session.get_jobs()}
    assert jobs[error["job_id"]].state == "error"
    assert jobs[error["job_id"]].params["apply_di_cal"] == "true"
    completed = [job for job in jobs.values() if job.state == "completed"]
    assert sorted(job.params.get("download_type") or job.params.get("output", "uvfits") for job in completed) == [
        "uvfits", "vis", "vis_meta",
    ]  # fmt: skip
    for job in completed:
        (file,) = job.files
        local = out_dir / file.name
        assert local.stat().st_size == file.size_bytes
        assert sha1(local) == file.sha1
        assert (f"Download complete: Job id: {job.id} file: {local} server-sha1: {file.sha1} "
                "(blake3 verified)") in output  # fmt: skip
    assert not list(out_dir.glob("*.part"))
    assert "\x1b" not in output  # plain lines when stdout is not a terminal
    # A status line per job (which states it sees depends on how fast the server runs them).
    assert re.search(r"\w+: Job id: \d+ Obs id: 1104585920 type: conversion", output)


def test_submit_only_then_list_then_download_only(server: Server, tmp_path: Path) -> None:
    csv_path = tmp_path / "jobs.csv"
    csv_path.write_text(f"obs_id={OTHER_OBSID}, job_type=d, download_type=vis_meta\n")
    code, output = mwa_client("-c", str(csv_path), "-s", environ=server.environ())
    assert code == 0, output
    job_id = int(re.search(r"Submitted job: (\d+)", output)[1])  # type: ignore[index]

    # The same line again is a duplicate: skipped, not an error.
    code, output = mwa_client("-c", str(csv_path), "-s", environ=server.environ())
    assert code == 0 and f"Skipping: {job_id} already running or complete." in output

    with server.session() as session:
        job = completed_job(session, job_id)
    code, output = mwa_client("-l", environ=server.environ())
    assert code == 0
    header = next(line for line in output.splitlines() if "Job id" in line)
    assert header.split() == ["Job", "id", "Obs", "id", "Type", "State", "Size", "(bytes)", "Error"]
    # Not a terminal: one tab-separated line per job, unpadded (lines were 250 columns wide).
    assert header == "Job id\tObs id\tType\tState\tSize (bytes)\tError"
    assert not any(line.endswith(" ") for line in output.splitlines())
    row = next(line for line in output.splitlines() if line.split()[:1] == [str(job_id)])
    assert row.split() == [str(job_id), str(OTHER_OBSID), "download", "metadata", "Ready",
                           str(job.size_bytes)]  # fmt: skip

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    error_file = tmp_path / "errors.json"
    # Padded, as printf/awk output gives it (the MWA's client takes what int() takes).
    code, output = mwa_client(
        "-w", f" +{job_id} ", "-d", str(out_dir), "-e", str(error_file), environ=server.environ()
    )
    assert code == 0, output
    assert json.loads(error_file.read_text()) == []  # written, empty, when nothing failed
    assert sha1(out_dir / job.files[0].name) == job.files[0].sha1
    assert output.rstrip().endswith("mwa_client finished successfully")


class SubmittingFirstProxy(ForwardProxy):
    """A forward proxy that, when the first submission of ``endpoint`` passes through it,
    first runs ``submit_first`` (another run submitting the same job a moment ahead)."""

    def __init__(self, endpoint: str, submit_first: Callable[[], None]) -> None:
        self.endpoint = endpoint
        self.submit_first = submit_first
        self.submitted_first = False
        super().__init__()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        head = await client_r.readuntil(b"\r\n\r\n")
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        if (not self.submitted_first and request_line.startswith("POST ")
                and f"/api/{self.endpoint} " in request_line):  # fmt: skip
            self.submitted_first = True
            await asyncio.get_running_loop().run_in_executor(None, self.submit_first)
        # The forward proxy reads the request head itself: it is handed the head again,
        # then the rest of the connection.
        replay = asyncio.StreamReader()
        replay.feed_data(head)

        async def copy_the_rest() -> None:
            with contextlib.suppress(ConnectionError):
                while data := await client_r.read(65536):
                    replay.feed_data(data)
            replay.feed_eof()

        copying = asyncio.ensure_future(copy_the_rest())
        try:
            await super()._handle(replay, client_w)
        finally:
            copying.cancel()


def test_a_duplicate_submitted_by_another_run_after_this_one_started_is_followed(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two full-mode runs of one job file started together: the one whose submission was
    the duplicate printed "Skipping: N already running or complete.", downloaded nothing
    and exited 0 (its job was not in the job list it read before submitting)."""
    environ = fresh_user_environ(server)
    csv_text = f"obs_id={OTHER_OBSID}, job_type=d, download_type=vis_meta\n"
    csv_path = tmp_path / "jobs.csv"
    csv_path.write_text(csv_text)
    (csv_job,) = parse_job_csv(csv_text)
    other_run = asvo.Session.login(environ["MWA_ASVO_API_KEY"], base_url=server.base_url)
    other_job_ids: list[int] = []
    without_proxy_settings(monkeypatch)
    proxy = SubmittingFirstProxy(
        csv_job.endpoint,
        lambda: other_job_ids.append(other_run.submit(csv_job.endpoint, csv_job.params)),
    )
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    try:
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")
        code, output = mwa_client("-c", str(csv_path), "-d", str(out_dir), environ=environ)
    finally:
        proxy.close()
    assert proxy.submitted_first
    (job_id,) = other_job_ids
    assert code == 0, output
    assert f"Following: {job_id} already queued, processing or complete (job #1, line 1)." in output
    job = completed_job(other_run, job_id)
    other_run.close()
    (file,) = job.files
    assert sha1(out_dir / file.name) == file.sha1
    assert f"Download complete: Job id: {job_id} file: {out_dir / file.name}" in output


def test_a_listing_into_a_file_holds_only_the_listing(server: Server) -> None:
    """`mwa_client -l > list.txt` had the version, "Connecting to MWA ASVO (...)...",
    "Connected to MWA ASVO" and "mwa_client finished successfully" lines among the jobs."""
    header = "Job id\tObs id\tType\tState\tSize (bytes)\tError"
    code, out, err = mwa_client_streams("-l", environ=server.environ())
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0] == header and len(lines) > 1
    assert all(re.match(r"\d+\t\d+\t", line) for line in lines[1:]), lines
    # Every row has the header's six fields, an empty error too (rows had four or five).
    assert all(len(line.split("\t")) == 6 for line in lines), lines
    for status in (VERSION_STRING, "Connecting to MWA ASVO (", "Connected to MWA ASVO",
                   "mwa_client finished successfully"):  # fmt: skip
        assert status in err and status not in out
    # -v's status lines too: they followed the rows on stdout.
    code, out, err = mwa_client_streams("-l", "-v", environ=server.environ())
    assert code == 0 and out.splitlines()[0] == header
    assert all(re.match(r"\d+\t\d+\t", line) for line in out.splitlines()[1:]), out
    assert "params: {" in err

    # No jobs: a header and no rows; the sentence goes with the status lines.
    code, out, err = mwa_client_streams("-l", environ=fresh_user_environ(server))
    assert code == 0 and out == header + "\n" and "You have no jobs." in err

    # An error too: stdout stays empty.
    code, out, err = mwa_client_streams(
        "-l", environ=server.environ(MWA_ASVO_API_KEY="not-the-right-key")
    )
    assert code == 2 and out == "" and "Error: Login failed: HTTP 401" in err

    # On a terminal, as the guide shows it: everything on stdout.
    code, out, err = mwa_client_streams("-l", environ=server.environ(), terminal=True)
    assert code == 0 and err == ""
    assert VERSION_STRING in out and "Job id" in out
    assert out.rstrip().endswith("mwa_client finished successfully")

    # The other modes keep their status lines on stdout, file or not.
    code, out, err = mwa_client_streams("-w", "999999", environ=server.environ())
    assert code == 4 and VERSION_STRING in out and "Connected to MWA ASVO" in out and err == ""


@pytest.mark.parametrize(
    ("refusal", "line"),
    [
        ("Your job cannot be submitted as there is a full outage in progress.",
         "Skipping: job #1 (line 1) - Your job cannot be submitted as there is a full outage "
         "in progress."),
        ("Observation 1000000000 does not exist",
         "Skipping: job #1 (line 1) - Observation 1000000000 does not exist."),
    ],
)  # fmt: skip
def test_a_refusal_is_one_sentence_with_one_full_stop(refusal: str, line: str) -> None:
    """ "... full outage in progress.." had two."""
    from observatory.clients.mwa_client import Reporter, _submit_jobs

    class Refusing:
        def submit(self, _endpoint: str, _params: object) -> int:
            raise asvo.AsvoError(
                f"Job refused: HTTP 400: {refusal}", status_code=400, error_code=0, detail=refusal
            )

    out = io.StringIO()
    errors: list[Any] = []
    jobs = parse_job_csv(f"obs_id={OBSID}, job_type=d, download_type=vis\n")
    _submit_jobs(Refusing(), jobs, Reporter(out, False), errors, follow_duplicates=False)  # type: ignore[arg-type]
    assert out.getvalue() == line + "\n"
    assert errors[0].result == f"Error: {refusal}"


def test_submit_only_and_list_only_ignore_the_download_directory(
    server: Server, tmp_path: Path
) -> None:
    """-s and -l never look at -d (their help and the guide say it is ignored)."""
    environ = fresh_user_environ(server)
    csv_path = tmp_path / "jobs.csv"
    csv_path.write_text(f"obs_id={OTHER_OBSID}, job_type=d, download_type=vis_meta\n")
    missing = tmp_path / "nonexistent"
    code, output = mwa_client("-c", str(csv_path), "-s", "-d", str(missing), environ=environ)
    assert code == 0, output
    assert "is invalid" not in output
    job_id = int(re.search(r"Submitted job: (\d+)", output)[1])  # type: ignore[index]
    code, output = mwa_client("-l", "-d", str(missing), environ=environ)
    assert code == 0, output
    assert any(line.split()[:1] == [str(job_id)] for line in output.splitlines())
    assert not missing.exists()
    # The modes that download still refuse a missing directory.
    code, output = mwa_client("-c", str(csv_path), "-d", str(missing), environ=environ)
    assert code == 1 and f"Error: Output directory {missing} is invalid." in output


def test_a_download_directory_that_cannot_be_written_is_refused_before_submitting(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It failed only once the jobs had completed (the tests run as root: the directory's
    permissions are what os.access says)."""
    environ = fresh_user_environ(server)
    csv_path = tmp_path / "jobs.csv"
    csv_path.write_text(f"obs_id={OTHER_OBSID}, job_type=d, download_type=vis_meta\n")
    locked = tmp_path / "read-only"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked
                        and real_access(path, mode))  # fmt: skip
    code, output = mwa_client("-c", str(csv_path), "-d", str(locked), environ=environ)
    assert code == 1 and f"Error: Output directory {locked} is not writable." in output
    assert "Submitted job" not in output


def test_verbose_submit_only_shows_the_submitted_parameters(server: Server, tmp_path: Path) -> None:
    environ = fresh_user_environ(server)
    csv_path = tmp_path / "jobs.csv"
    # An old (cotter-era) key: what is shown is what was sent, renamed.
    csv_path.write_text(f"obs_id={OTHER_OBSID}, job_type=c, timeres=4, output=uvfits\n")
    code, output = mwa_client("-c", str(csv_path), "-s", "-v", environ=environ)
    assert code == 0, output
    line = next(line for line in output.splitlines() if line.startswith("Submitted job:"))
    assert re.fullmatch(r"Submitted job: \d+ params: \{.*\}", line), line
    assert f"'obs_id': '{OTHER_OBSID}'" in line and "'avg_time_res': '4'" in line
    # Without -v the line stays the MWA client's.
    csv_path.write_text(f"obs_id={OTHER_OBSID}, job_type=d, download_type=vis_meta\n")
    code, output = mwa_client("-c", str(csv_path), "-s", environ=environ)
    assert code == 0 and re.search(r"^Submitted job: \d+ $", output, re.MULTILINE), output


def test_download_only_reports_jobs_it_cannot_download(server: Server, tmp_path: Path) -> None:
    error_file = tmp_path / "errors.json"
    code, _ = mwa_client("-w", "999999", "-e", str(error_file), "-d", str(tmp_path),
                         environ=server.environ())  # fmt: skip
    assert code == 4
    assert json.loads(error_file.read_text()) == [{
        "job_id": 999999, "obs_id": "N/A",
        "result": "Error: Job Id 999999 is not a valid job, has expired or is not owned by you.",
    }]  # fmt: skip

    # A failed or cancelled job is named as such: "not ready for download" suggested that
    # waiting would help.
    with server.session() as session:
        job_id = session.submit_conversion_job(OBSID, apply_di_cal=True, avg_time_res=4)
        failed = completed_job(session, job_id)
        assert failed.state == "error" and failed.error_text
    code, output = mwa_client("-w", str(job_id), "-e", str(error_file), "-d", str(tmp_path),
                              environ=server.environ())  # fmt: skip
    assert code == 4
    reason = " ".join(failed.error_text.split())
    assert json.loads(error_file.read_text()) == [{
        "job_id": job_id, "obs_id": str(OBSID),
        "result": f"Error: Job Id {job_id} failed: {reason}; it has no product to download",
    }]  # fmt: skip
    assert "not ready for download" not in output

    environ = fresh_user_environ(server)
    with asvo.Session.login(environ["MWA_ASVO_API_KEY"], base_url=server.base_url) as session:
        job_id = session.submit_conversion_job(OBSID, avg_time_res=2, avg_freq_res=40)
        session.cancel_job(job_id)
        assert completed_job(session, job_id).state == "cancelled"
    code, output = mwa_client("-w", str(job_id), "-e", str(error_file), "-d", str(tmp_path),
                              environ=environ)  # fmt: skip
    assert code == 4
    assert json.loads(error_file.read_text()) == [{
        "job_id": job_id, "obs_id": str(OBSID),
        "result": f"Error: Job Id {job_id} was cancelled; it has no product to download",
    }]  # fmt: skip
    assert "not ready for download" not in output


def expire_now(server: Server, session: asvo.Session, job_id: int) -> None:
    """Bring a completed job's expiry to now; the server's dispatcher then expires it (its
    product deleted, its state ``expired``), as it does when a product's lifetime ends.
    ``session`` is its owner's."""
    engine = make_engine(Settings(data_dir=server.data_dir).resolved_database_url)
    try:
        with make_session_factory(engine)() as database:
            job = database.get(Job, job_id)
            assert job is not None and job.state == "completed", job
            job.expires_at = utcnow() - timedelta(seconds=1)
            database.commit()
    finally:
        engine.dispose()

    def expired() -> bool:
        job = session.get_job(job_id)
        return job is not None and job.state == "expired"

    wait_until(expired, 60, f"job {job_id} to expire")


def test_download_only_of_an_expired_job_says_so_and_deletes_its_part_file(
    server: Server, tmp_path: Path
) -> None:
    """It said "Invalid job state- job not ready for download" and left the .part file of
    an interrupted download, which no run could resume."""
    environ = fresh_user_environ(server)
    session = asvo.Session.login(environ["MWA_ASVO_API_KEY"], base_url=server.base_url)
    with session:
        job = completed_job(
            session, session.submit_download_job(OTHER_OBSID, download_type="vis_meta")
        )
        (file,) = job.files
        out_dir = tmp_path / "out"
        out_dir.mkdir()
        partial = out_dir / f"{file.name}.part"
        partial.write_bytes(b"x" * 100)  # an interrupted download of it
        not_its = out_dir / f"{OTHER_OBSID}_{job.id + 1}_vis_meta.tar.part"  # another job's
        not_its.write_bytes(b"y" * 10)
        expire_now(server, session, job.id)
    error_file = tmp_path / "errors.json"
    code, output = mwa_client("-w", str(job.id), "-d", str(out_dir), "-e", str(error_file),
                              environ=environ)  # fmt: skip
    assert code == 4, output
    message = (f"Error: Job Id {job.id} has expired: its product is gone and can no longer be "
               f"downloaded (deleted {partial.name}, 100 bytes)")  # fmt: skip
    assert json.loads(error_file.read_text()) == [
        {"job_id": job.id, "obs_id": str(OTHER_OBSID), "result": message}
    ]
    assert f"Job id: {job.id} Obs id: {OTHER_OBSID}: {message}" in output
    assert sorted(p.name for p in out_dir.iterdir()) == [not_its.name]


def test_another_users_jobs_are_neither_listed_nor_downloadable(
    server: Server, tmp_path: Path
) -> None:
    with server.session() as session:
        mine = [job.id for job in session.get_jobs()]
    other = server.environ(MWA_ASVO_API_KEY="other-user-key")
    code, output = mwa_client("-l", environ=other)
    assert code == 0 and "You have no jobs." in output
    if mine:
        code, _ = mwa_client("-w", str(mine[0]), "-d", str(tmp_path), environ=other)
        assert code == 4 and not any(tmp_path.iterdir())


def test_scratch_products_are_copied_when_the_path_is_local(server: Server, tmp_path: Path) -> None:
    csv_path = tmp_path / "jobs.csv"
    csv_path.write_text(f"obs_id={OBSID}, job_type=d, download_type=vis_meta, delivery=scratch\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, output = mwa_client("-c", str(csv_path), "-d", str(out_dir), "-ar",
                              environ=server.environ())  # fmt: skip
    assert code == 0, output
    (copied,) = out_dir.iterdir()
    with server.session() as session:
        (job,) = [j for j in session.get_jobs() if j.id == int(copied.name)]
    (file,) = job.files
    assert file.type == "scratch" and Path(file.path or "").is_dir()
    source_files = sorted(p.relative_to(file.path) for p in Path(file.path).rglob("*"))  # type: ignore[arg-type]
    assert sorted(p.relative_to(copied) for p in copied.rglob("*")) == source_files
    assert f"Ready on /scratch: Job id: {job.id}" in output
    assert f"Copying: Job id: {job.id} path: {file.path} size: {file.size_bytes} bytes" in output
    assert (f"Download complete: Job id: {job.id} file: {copied} (copied from {file.path}, "
            f"{file.size_bytes} bytes, sizes verified)") in output  # fmt: skip

    # Again: the copy is checked, not taken on trust because a directory of its name exists.
    code, output = mwa_client("-w", str(job.id), "-d", str(out_dir), environ=server.environ())
    assert code == 0, output
    assert f"Verifying: Job id: {job.id} path: {file.path}" in output
    assert f"file: {copied} (already copied, file sizes verified)" in output
    # An interrupted or altered copy (a file cut short) is copied again.
    victim = max((p for p in copied.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    original = victim.read_bytes()
    victim.write_bytes(original[: len(original) // 2])
    code, output = mwa_client("-w", str(job.id), "-d", str(out_dir), environ=server.environ())
    assert code == 0, output
    # Every file of the product again (a measurement set must not mix two versions).
    n_files = sum(1 for p in Path(file.path or "").rglob("*") if p.is_file())
    assert (f"file: {copied} (the copy on disk did not match: its {n_files} file"
            f"{'s' if n_files != 1 else ''} copied again from {file.path}, {file.size_bytes} "
            "bytes, sizes verified; other files left as they were)") in output  # fmt: skip
    assert victim.read_bytes() == original
    assert "Download Complete" not in output  # one spelling for every delivery
    assert not list(out_dir.glob(".*"))  # no staging directory left


def scratch_job(server: Server) -> asvo.Job:
    """A completed scratch delivery of OBSID's metadata (a new job, or the one there is)."""
    with server.session() as session:
        try:
            job_id = session.submit_download_job(
                OBSID, download_type="vis_meta", delivery="scratch", allow_resubmit=True
            )
        except asvo.AsvoError as exc:  # the same job, still running
            assert exc.error_code == 2 and exc.job_id is not None, exc
            job_id = exc.job_id
        job = completed_job(session, job_id)
    assert job.state == "completed" and job.files[0].type == "scratch", job
    return job


def test_a_copy_that_does_not_match_is_mended_and_the_users_files_are_kept(
    server: Server, tmp_path: Path
) -> None:
    """The product's files are copied again, the user's own files kept: the whole
    directory was deleted and copied again, losing them."""
    job = scratch_job(server)
    (file,) = job.files
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, output = mwa_client("-w", str(job.id), "-d", str(out_dir), environ=server.environ())
    assert code == 0, output
    copy = out_dir / str(job.id)
    (product_file,) = [p for p in copy.rglob("*") if p.is_file()]
    original = product_file.read_bytes()
    product_file.write_bytes(original[:100])
    notes = copy / "mynotes.txt"
    notes.write_text("my own notes\n")
    (copy / "plots").mkdir()
    (copy / "plots" / "a.png").write_bytes(b"png")

    code, output = mwa_client("-w", str(job.id), "-d", str(out_dir), environ=server.environ())
    assert code == 0, output
    assert product_file.read_bytes() == original
    assert notes.read_text() == "my own notes\n"
    assert (copy / "plots" / "a.png").read_bytes() == b"png"
    assert (f"Download complete: Job id: {job.id} file: {copy} (the copy on disk did not "
            f"match: its 1 file copied again from {file.path}, "
            f"{len(original)} bytes, sizes verified; other files left as they were)"
            ) in output  # fmt: skip
    assert not [p for p in out_dir.rglob(".*")]  # no temporary copy left
    # The user's files are no reason to copy again.
    code, output = mwa_client("-w", str(job.id), "-d", str(out_dir), environ=server.environ())
    assert code == 0, output
    assert f"file: {copy} (already copied, file sizes verified)" in output
    # A missing file is copied too.
    product_file.unlink()
    code, output = mwa_client("-w", str(job.id), "-d", str(out_dir), environ=server.environ())
    assert code == 0, output
    assert "its 1 file copied again" in output
    assert product_file.read_bytes() == original and notes.exists()


def someone_waits_for(lock_path: Path) -> bool:
    """Whether a process or thread is blocked on the ``flock`` of ``lock_path``."""
    inode = lock_path.stat().st_ino
    return any(
        " -> FLOCK " in line and f":{inode} " in line
        for line in Path("/proc/locks").read_text().splitlines()
    )


def test_a_second_run_waits_for_the_first_runs_copy_and_keeps_it(
    server: Server, tmp_path: Path
) -> None:
    """Two `-w all` runs into one directory: the second took the first's temporary copy for
    a leftover and deleted it under it; both exited 4 with shutil.Error tuples and the
    product ended in neither. The second now waits on the first's lock, then verifies."""
    job = scratch_job(server)
    (file,) = job.files
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / file.name
    staging = out_dir / f".{file.name}.copying"
    results: list[tuple[int, str]] = []
    second_run = threading.Thread(target=lambda: results.append(
        mwa_client("-w", str(job.id), "-d", str(out_dir), environ=server.environ())
    ))  # fmt: skip
    with asvo._downloading_alone(target):  # the first run, copying
        shutil.copytree(file.path or "", staging)
        first_copy = {p.relative_to(staging): p.stat().st_ino for p in staging.rglob("*")}
        second_run.start()
        lock = out_dir / f".{file.name}.lock"
        wait_until(lambda: not second_run.is_alive() or someone_waits_for(lock), 60,
                   "the second run to wait for the lock, or to end")  # fmt: skip
        assert second_run.is_alive(), f"the second run did not wait for the first: {results}"
        os.rename(staging, target)  # the first run's copy is complete
    second_run.join(60)
    ((code, output),) = results
    assert code == 0, output
    assert f"Download complete: Job id: {job.id} file: {target} (already copied" in output
    assert {p.relative_to(target): p.stat().st_ino for p in target.rglob("*")} == first_copy
    assert sorted(p.name for p in out_dir.iterdir()) == [file.name]  # no lock, no staging


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "file"])
def test_something_else_of_the_products_name_is_refused_naming_it_and_left_alone(
    server: Server, tmp_path: Path, kind: str
) -> None:
    """A symbolic link or a file where the copy goes is not the client's to replace: it
    failed with "4: Cannot call rmtree on a symbolic link" and left a .copying directory."""
    job = scratch_job(server)
    out_dir, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out_dir.mkdir()
    elsewhere.mkdir()
    (elsewhere / "precious.dat").write_text("keep me")
    there = out_dir / str(job.id)
    if kind == "file":
        there.write_text("not a directory")
    else:
        there.symlink_to(elsewhere if kind == "symlink" else tmp_path / "gone")
    what = "a file" if kind == "file" else "a symbolic link"
    error_file = tmp_path / "errors.json"
    code, output = mwa_client("-w", str(job.id), "-d", str(out_dir), "-e", str(error_file),
                              environ=server.environ())  # fmt: skip
    assert code == 4, output
    message = (f"{there} is {what}, not a copy of the product; it was left as it is: move it "
               "away or download into another directory")  # fmt: skip
    assert f"Download Failed: Job id: {job.id} file: {job.id}: {message}" in output
    assert json.loads(error_file.read_text()) == [
        {"job_id": job.id, "obs_id": str(OBSID), "result": f"Error: {message}"}
    ]
    assert sorted(p.name for p in out_dir.iterdir()) == [str(job.id)]  # nothing left behind
    assert there.is_symlink() == (kind != "file")
    assert kind != "file" or there.read_text() == "not a directory"
    assert [p.name for p in elsewhere.iterdir()] == ["precious.dat"]
    assert (elsewhere / "precious.dat").read_text() == "keep me"


def test_a_directory_where_the_product_goes_is_named_and_left_alone(
    server: Server, tmp_path: Path
) -> None:
    """It was taken for a copy that did not verify ("does not match the server's blake3:
    downloading it again") and the download failed on removing it: "Is a directory"."""
    with server.session() as session:
        job = completed_job(
            session,
            session.submit_download_job(OTHER_OBSID, download_type="vis_meta", allow_resubmit=True),
        )
    (file,) = job.files
    out_dir = tmp_path / "out"
    (out_dir / file.name / "mine").mkdir(parents=True)
    code, output = mwa_client("-w", str(job.id), "-d", str(out_dir), environ=server.environ())
    assert code == 4, output
    assert (f"cannot save {file.name} in {out_dir}: {out_dir / file.name} is a directory "
            "(or another non-file) of that name; move it away and download again") in output  # fmt: skip
    assert "does not match" not in output and "Is a directory" not in output
    assert (out_dir / file.name / "mine").is_dir()


def test_a_refused_job_is_listed_without_a_job_id(server: Server, tmp_path: Path) -> None:
    """It printed Python's None: "Job id: None Obs id: 999: Error: ..."."""
    csv_path = tmp_path / "jobs.csv"
    csv_path.write_text("obs_id=1234567890, job_type=d, download_type=vis\n")
    code, output = mwa_client("-c", str(csv_path), "-d", str(tmp_path), environ=server.environ())
    assert code == 4, output
    assert "Job id:  Obs id: 1234567890: Error: " in output and "None" not in output


def delivered(tmp_path: Path, files: dict[str, bytes]) -> tuple[asvo.Job, asvo.ProductFile]:
    """A scratch product of these ``{relative path: content}`` files under ``tmp_path``."""
    source = tmp_path / "scratch" / "77"
    for relative, content in files.items():
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).write_bytes(content)
    file = asvo.ProductFile("scratch", sum(map(len, files.values())), path=str(source))
    return asvo.Job(77, OBSID, 1, "completed", files=(file,)), file


def test_a_mended_copy_follows_no_symbolic_link_inside_it(tmp_path: Path) -> None:
    """Where the product has a directory or a file, a link (or a file where it has a
    directory) is refused naming it, before anything is written: nothing is written
    through it, and the copy is left as it was."""
    job, file = delivered(tmp_path, {"a.fits": b"a" * 10, "sub/b.fits": b"b" * 20})
    out_dir, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (out_dir / "77").mkdir(parents=True)
    elsewhere.mkdir()
    (elsewhere / "b.fits").write_bytes(b"mine")
    (out_dir / "77" / "sub").symlink_to(elsewhere)
    with pytest.raises(asvo.AsvoError, match=re.escape(
        f"Job 77: {out_dir / '77' / 'sub'} is a symbolic link where the product has a "
        "directory; nothing was copied and it was left as it is"
    )):  # fmt: skip
        asvo._copy_delivered_directory(job, file, out_dir, None)
    assert (elsewhere / "b.fits").read_bytes() == b"mine"
    assert sorted(p.name for p in (out_dir / "77").iterdir()) == ["sub"]  # a.fits not copied

    (out_dir / "77" / "sub").unlink()
    (out_dir / "77" / "sub").write_text("a file")
    with pytest.raises(asvo.AsvoError, match="is a file where the product has a directory"):
        asvo._copy_delivered_directory(job, file, out_dir, None)

    (out_dir / "77" / "sub").unlink()
    (out_dir / "77" / "sub").mkdir()
    (out_dir / "77" / "sub" / "b.fits").symlink_to(elsewhere / "b.fits")
    link_message = "b.fits is a symbolic link where the product has a file"
    with pytest.raises(asvo.AsvoError, match=re.escape(link_message)):
        asvo._copy_delivered_directory(job, file, out_dir, None)
    assert (elsewhere / "b.fits").read_bytes() == b"mine"

    (out_dir / "77" / "sub" / "b.fits").unlink()
    (out_dir / "77" / "sub" / "b.fits").mkdir()
    with pytest.raises(asvo.AsvoError, match=re.escape("b.fits is a directory where the product")):
        asvo._copy_delivered_directory(job, file, out_dir, None)

    # Gone: every file of the product is copied again (one version of it), with progress.
    (out_dir / "77" / "sub" / "b.fits").rmdir()
    (out_dir / "77" / "a.fits").write_bytes(b"A" * 10)  # altered, its size kept
    seen: list[int] = []
    result = asvo._copy_delivered_directory(
        job, file, out_dir, lambda _f, done, _total: seen.append(done)
    )
    assert (result.outcome, result.bytes_transferred, result.redownloaded, result.files_copied) == (
        "copied", 30, True, 2,
    )  # fmt: skip
    assert seen == [10, 30]
    assert (out_dir / "77" / "a.fits").read_bytes() == b"a" * 10
    # A leftover temporary name that links elsewhere is replaced, not written through.
    (out_dir / "77" / "a.fits").unlink()
    (out_dir / "77" / ".a.fits.copying").hardlink_to(elsewhere / "b.fits")
    asvo._copy_delivered_directory(job, file, out_dir, None)
    assert (elsewhere / "b.fits").read_bytes() == b"mine"
    assert (out_dir / "77" / "a.fits").read_bytes() == b"a" * 10
    assert (out_dir / "77" / "sub" / "b.fits").read_bytes() == b"b" * 20


def test_a_copy_that_fails_names_the_files_it_could_not_copy(tmp_path: Path) -> None:
    """The message was shutil.Error's list of (source, destination, reason) tuples."""
    job, file = delivered(tmp_path, {"a.fits": b"a" * 10})
    source = Path(file.path or "")
    (source / "b.fits").symlink_to(tmp_path / "nowhere")  # a file that cannot be read
    out_dir = tmp_path / "out"
    session = asvo.Session("http://127.0.0.1:9", httpx.Client(), verify=True)
    with pytest.raises(asvo.AsvoError) as failed:
        session.download_product(job, out_dir)
    assert failed.value.message.startswith(
        f"Job 77: could not copy {source}: {source / 'b.fits'}: [Errno 2] No such file or directory"
    ), failed.value.message
    assert "[(" not in failed.value.message
    assert list(out_dir.iterdir()) == []  # nothing of the copy kept, no lock left


# -- resume and verification -------------------------------------------------------------


def test_a_killed_download_resumes_and_a_corrupt_file_is_fetched_again(
    server: Server, tmp_path: Path
) -> None:
    with server.session() as session:
        job_id = session.submit_download_job(OBSID, download_type="vis", allow_resubmit=True)
        job = completed_job(session, job_id)
    (file,) = job.files
    assert file.size_bytes > 4_000_000
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    partial = out_dir / (file.name + ".part")

    proxy = StallingProxy(server.port, stall_after_bytes=3_000_000)
    try:
        client = subprocess.Popen(
            [str(BIN / "mwa_client"), "-w", str(job_id), "-d", str(out_dir)],
            env={**os.environ, **server.environ(port=proxy.port)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            wait_until(lambda: partial.exists() and partial.stat().st_size >= 2**20, 60,
                       "part of the file")  # fmt: skip
        finally:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait(30)
        have = partial.stat().st_size
        assert 0 < have < file.size_bytes
        assert not (out_dir / file.name).exists()

        proxy.stall_after_bytes = None
        code, output = mwa_client("-w", "all", "-d", str(out_dir),
                                  environ=server.environ(port=proxy.port))  # fmt: skip
        assert code == 0, output
        assert f"resumed, {file.size_bytes - have} bytes fetched, blake3 verified" in output
        # The SHA-1 the guide's client prints, though BLAKE3 was the checksum verified.
        assert f"server-sha1: {file.sha1} (resumed, " in output and "server-blake3" not in output
        # -w all fetches the module's other ready jobs too, in parallel: this file's request.
        resumed = [r for r in proxy.download_requests if file.name in r][-1]
        assert f"range: bytes={have}-" in resumed.lower()
    finally:
        proxy.close()
    assert sha1(out_dir / file.name) == file.sha1
    assert not partial.exists()

    # Corrupt the finished file (same size): the next run finds out and fetches it again.
    target = out_dir / file.name
    with target.open("r+b") as stream:
        stream.seek(file.size_bytes // 2)
        stream.write(b"\x00corrupted\x00")
    code, output = mwa_client("-w", str(job_id), "-d", str(out_dir), environ=server.environ())
    assert code == 0, output
    assert "was corrupt and was downloaded again" in output
    assert sha1(target) == file.sha1


def test_a_corrupt_part_file_is_fetched_again_and_reported_as_such(
    server: Server, tmp_path: Path
) -> None:
    with server.session() as session:
        job_id = session.submit_download_job(OBSID, download_type="vis", allow_resubmit=True)
        (file,) = completed_job(session, job_id).files
    # A .part whose bytes are wrong: resuming it can never verify.
    (tmp_path / (file.name + ".part")).write_bytes(b"\xff" * 1000)
    code, output = mwa_client("-w", str(job_id), "-d", str(tmp_path), environ=server.environ())
    assert code == 0, output
    assert "the copy on disk was corrupt and was downloaded again, blake3 verified" in output
    assert "resumed" not in output  # the file that verified was fetched whole
    assert blake3_hex(tmp_path / file.name) == file.blake3


def test_bytes_of_an_attempt_that_failed_part_way_are_counted(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second attempt resumes what the first wrote: the run fetched the whole file
    (the count used to leave out the first attempt's bytes)."""
    # A user of its own: the tests that stall "-w all" downloads expect few large products.
    key = fresh_user_environ(server)["MWA_ASVO_API_KEY"]
    with asvo.Session.login(key, base_url=server.base_url) as session:
        job_id = session.submit_download_job(OBSID, download_type="vis")
        job = completed_job(session, job_id)
        (file,) = job.files
        fetch_into = asvo.Session._fetch_into
        attempts = 0

        def dropped_after_a_mebibyte(
            self: asvo.Session, file: asvo.ProductFile, algorithm: str, partial: Path,
            progress: asvo.ProgressCallback | None, *rest: object,
        ) -> object:  # fmt: skip
            nonlocal attempts
            attempts += 1

            def drop(_file: asvo.ProductFile, done: int, _total: int) -> None:
                if attempts == 1 and done >= 2**20:
                    raise ConnectionResetError("connection reset by peer")

            return fetch_into(self, file, algorithm, partial, drop, *rest)  # type: ignore[arg-type]

        monkeypatch.setattr(asvo.Session, "_fetch_into", dropped_after_a_mebibyte)
        monkeypatch.setattr(asvo.time, "sleep", lambda _s: None)
        (result,) = session.download_product(job, tmp_path)
    assert attempts == 2
    assert result.outcome == "resumed"
    assert result.bytes_transferred == file.size_bytes
    assert sha1(tmp_path / file.name) == file.sha1


def test_ctrl_c_stops_at_once_and_keeps_the_partial_file(server: Server, tmp_path: Path) -> None:
    with server.session() as session:
        job_id = session.submit_download_job(OBSID, download_type="vis", allow_resubmit=True)
        (file,) = completed_job(session, job_id).files
    partial = tmp_path / (file.name + ".part")
    proxy = StallingProxy(server.port, stall_after_bytes=2_500_000)
    try:
        client = subprocess.Popen(
            [str(BIN / "mwa_client"), "-w", "all", "-d", str(tmp_path), "-e", str(tmp_path / "e.json")],
            # faulthandler: a client that does not stop shows where each thread is (SIGABRT).
            env={**os.environ, **server.environ(port=proxy.port), "PYTHONFAULTHANDLER": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            # A test run started in the background (`cmd &` in a script) has SIGINT ignored,
            # and children inherit that: give the client the terminal's default back.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        wait_until(lambda: partial.exists() and partial.stat().st_size >= 2**20, 60, "part of it")
        client.send_signal(signal.SIGINT)  # the download is stalled: no more bytes will come
        try:
            output, _ = client.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            client.send_signal(signal.SIGABRT)
            pytest.fail(f"mwa_client still running 10 s after Ctrl-C:\n{client.communicate()[0]}")
    finally:
        proxy.close()
    assert client.returncode == 1, output
    assert "Interrupted! Exiting..." in output
    assert 0 < partial.stat().st_size < file.size_bytes
    assert (
        json.loads((tmp_path / "e.json").read_text())[0]["result"]
        == "Error: Interrupted! Exiting..."
    )


def test_a_file_that_never_verifies_is_reported(server: Server, tmp_path: Path) -> None:
    """A product whose bytes change on the server after its sha1 was published."""
    with server.session() as session:
        job_id = session.submit_download_job(OTHER_OBSID, download_type="vis", allow_resubmit=True)
        job = completed_job(session, job_id)
    (file,) = job.files
    on_server = server.data_dir / "products" / str(job_id) / file.name
    original = on_server.read_bytes()
    try:
        on_server.write_bytes(original[:-10] + b"tampered!!")
        error_file = tmp_path / "errors.json"
        code, _ = mwa_client("-w", str(job_id), "-d", str(tmp_path), "-e", str(error_file),
                                  environ=server.environ())  # fmt: skip
    finally:
        on_server.write_bytes(original)
    assert code == 4
    (error,) = json.loads(error_file.read_text())
    assert error["job_id"] == job_id and "blake3" in error["result"]
    assert not (tmp_path / file.name).exists() and not (tmp_path / (file.name + ".part")).exists()


def test_a_checksum_that_never_matches_promises_no_download_after_the_last_attempt(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with server.session() as session:
        job_id = session.submit_download_job(OBSID, download_type="vis_meta", allow_resubmit=True)
        job = completed_job(session, job_id)
        (file,) = job.files
        wrong = dataclasses.replace(file, blake3="0" * 64)
        caplog.set_level(logging.WARNING, logger="observatory.clients.asvo")
        with pytest.raises(asvo.ChecksumError):
            session.download_product(dataclasses.replace(job, files=(wrong,)), tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "observatory.clients.asvo"]
    assert len(lines) == asvo.DOWNLOAD_ATTEMPTS, lines
    for attempt, line in enumerate(lines[:-1], start=1):
        assert line.endswith(
            f"deleting it and downloading again (attempt {attempt} of {asvo.DOWNLOAD_ATTEMPTS})"
        ), line
    assert "downloading again" not in lines[-1]
    assert lines[-1].endswith(
        f"deleted it (attempt {asvo.DOWNLOAD_ATTEMPTS} of {asvo.DOWNLOAD_ATTEMPTS}, giving up)"
    ), lines[-1]
    assert not list(tmp_path.iterdir())


def test_a_failed_download_neither_waits_nor_promises_a_retry_after_the_last_attempt(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """An answer the client cannot use is tried DOWNLOAD_ATTEMPTS times (an unreachable
    server is waited out instead: test_asvo_watch.py, test_asvo_download_outage.py)."""
    with server.session() as session:
        job_id = session.submit_download_job(OBSID, download_type="vis_meta", allow_resubmit=True)
        job = completed_job(session, job_id)

        def dropped(*_args: object) -> None:
            raise asvo.AsvoError("Download of x: HTTP 500: Internal Server Error", status_code=500)

        waits: list[float] = []
        monkeypatch.setattr(asvo.Session, "_fetch_into", dropped)
        monkeypatch.setattr(asvo.time, "sleep", waits.append)
        caplog.set_level(logging.WARNING, logger="observatory.clients.asvo")
        with pytest.raises(asvo.AsvoError, match="failed after 3 attempts"):
            session.download_product(job, tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "observatory.clients.asvo"]
    assert len(lines) == asvo.DOWNLOAD_ATTEMPTS == 3, lines
    assert all(line.endswith("trying again") for line in lines[:-1]), lines
    assert "giving up" in lines[-1] and "trying again" not in lines[-1]
    assert len(waits) == asvo.DOWNLOAD_ATTEMPTS - 1  # no pause before giving up


# -- exit codes and the command line --------------------------------------------------------


def test_exit_codes_and_messages(server: Server, tmp_path: Path) -> None:
    env = server.environ()
    error_file = tmp_path / "errors.json"

    # 3: a CSV parse error names the line and the cell.
    bad = tmp_path / "bad.csv"
    bad.write_text(
        f"# jobs\n\nobs_id={OBSID}, job_type=d, download_type=vis\nobs_id={OBSID}, job_type=x\n"
    )
    code, output = mwa_client("-c", str(bad), "-s", "-e", str(error_file), environ=env)
    assert code == 3
    assert "line 4, cell 'job_type=x'" in output
    assert json.loads(error_file.read_text())[0]["result"].startswith("Error: ")

    # 2: an HTTP error prints the server's message (its JSON "error", not the raw reply),
    # and the error file has it as the guide shows: "Error: <message>".
    code, output = mwa_client(
        "-l", "-e", str(error_file), environ={**env, "MWA_ASVO_API_KEY": "not-the-right-key"}
    )
    assert code == 2
    assert "Error: Login failed: HTTP 401: invalid API key\n" in output
    assert '{"error"' not in output
    (entry,) = json.loads(error_file.read_text())
    assert entry["result"] == "Error: Login failed: HTTP 401: invalid API key"

    # 1: anything else.
    code, output = mwa_client(
        "-l", "-e", str(error_file),
        environ={k: v for k, v in env.items() if k != "MWA_ASVO_API_KEY"},
    )  # fmt: skip
    assert code == 1 and "MWA_ASVO_API_KEY env variable not defined" in output
    assert "export MWA_ASVO_API_KEY=xxx" in output
    (entry,) = json.loads(error_file.read_text())
    assert entry["result"].startswith("Error: MWA_ASVO_API_KEY env variable not defined. ")
    code, output = mwa_client("-s", environ=env)
    assert code == 1 and "csvfile not specified" in output
    code, output = mwa_client("-w", "all", "-d", str(tmp_path / "missing"), environ=env)
    assert code == 1 and "Output directory" in output and "is invalid" in output
    empty = tmp_path / "empty.csv"
    empty.write_text("# nothing\n\n")
    code, output = mwa_client("-c", str(empty), "-s", environ=env)
    assert code == 1 and "No jobs to submit" in output
    code, output = mwa_client("-l", environ={**env, "MWA_ASVO_PORT": str(free_port())})
    assert code == 1 and "Cannot reach" in output
    for args in (["-s", "-l"], ["-l", "-w", "all"], ["-w", "all", "-s"], ["-w", "yesterday"],
                 ["--parallel", "0"]):  # fmt: skip
        with pytest.raises(SystemExit) as exited:
            mwa_client(*args, environ=env)
        assert exited.value.code == 1

    # 4 and 0 are checked by the end-to-end tests above; obsolete variables warn.
    code, output = mwa_client("-l", environ={**env, "ASVO_USER": "me", "ASVO_PASS": "pw"})
    assert code == 0
    assert "[WARNING] ASVO_USER environment variable is no longer used" in output
    assert "[WARNING] ASVO_PASS environment variable is no longer used" in output


def offline_environ() -> dict[str, str]:
    """A client set up for a server that is not there: only what fails before login runs."""
    return {"MWA_ASVO_API_KEY": API_KEY, "MWA_ASVO_HOST": "127.0.0.1",
            "MWA_ASVO_PORT": str(free_port()), "MWA_ASVO_HTTPS": "0"}  # fmt: skip


def test_a_job_cancelled_while_the_client_waits_is_an_error(server: Server, tmp_path: Path) -> None:
    """Nothing of it is downloaded: exit 4 and an error entry, not "finished successfully"."""
    import threading

    environ = fresh_user_environ(server)
    csv_path = tmp_path / "jobs.csv"
    csv_path.write_text(f"obs_id={OBSID}, job_type=c, avg_time_res=2, avg_freq_res=40\n")
    error_file = tmp_path / "errors.json"
    result: list[tuple[int, str]] = []
    client = threading.Thread(target=lambda: result.append(mwa_client(
        "-c", str(csv_path), "-d", str(tmp_path), "-e", str(error_file), environ=environ,
    )))  # fmt: skip
    client.start()
    session = asvo.Session.login(
        environ["MWA_ASVO_API_KEY"], base_url=server.base_url, verify=False
    )
    wait_until(lambda: bool(session.get_jobs()), 30, "the submission")
    (job,) = session.get_jobs()
    session.cancel_job(job.id)
    client.join(timeout=60)
    ((code, output),) = result
    assert code == 4, output
    assert "finished successfully" not in output
    assert json.loads(error_file.read_text()) == [
        {"job_id": job.id, "obs_id": str(OBSID), "result": "Error: the job was cancelled"}
    ]


@pytest.mark.parametrize("name", ["missing.csv", "."])  # no such file; a directory
def test_a_csv_file_that_cannot_be_read_is_a_csv_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    error_file = tmp_path / "errors.json"
    code, output = mwa_client(
        "-c", str(path), "-s", "-e", str(error_file), environ=offline_environ()
    )
    assert code == 3, output  # was 1, with Python's "[Errno 2] ..." alone
    assert f"Error: cannot read the csv file {path}: " in output
    (error,) = json.loads(error_file.read_text())
    assert error["result"].startswith(f"Error: cannot read the csv file {path}")


def test_a_csv_that_is_not_utf8_is_a_csv_error(tmp_path: Path) -> None:
    latin1 = tmp_path / "jobs.csv"
    latin1.write_bytes(
        f"# jobs\n# pour l'équipe\nobs_id={OBSID}, job_type=d, download_type=vis\n".encode(
            "latin-1"
        )
    )
    output = _refused_csv(latin1, tmp_path / "errors.json", line=2)
    assert f"Error: {latin1} line 2: byte 0xe9 at column 10 is not UTF-8 text" in output


def _refused_csv(jobs: Path, error_file: Path, line: int) -> str:
    """What mwa_client -s prints for a CSV it refuses: exit 3, the error file naming the line."""
    code, output = mwa_client(
        "-c", str(jobs), "-s", "-e", str(error_file), environ=offline_environ()
    )
    assert code == 3, output
    (error,) = json.loads(error_file.read_text())
    assert error["result"].startswith(f"Error: {jobs} line {line}")
    return output


def test_whitespace_copied_from_a_web_page_is_ignored_as_the_server_ignores_it(
    server: Server, tmp_path: Path
) -> None:
    """A non-breaking space after a comma: "line 1: no job_type cell"."""
    environ = fresh_user_environ(server)
    csv_path = tmp_path / "jobs.csv"
    csv_path.write_text(
        f"obs_id={OTHER_OBSID},\u00a0job_type=d,\u2003download_type\u00a0=vis_meta\n"
    )
    code, output = mwa_client("-c", str(csv_path), "-s", environ=environ)
    assert code == 0, output
    job_id = int(re.search(r"Submitted job: (\d+)", output)[1])  # type: ignore[index]
    with asvo.Session.login(environ["MWA_ASVO_API_KEY"], base_url=server.base_url) as session:
        job = session.get_job(job_id)
    assert job is not None and job.params["download_type"] == "vis_meta"


def test_a_cell_longer_than_csv_reads_is_a_csv_error_naming_the_line(tmp_path: Path) -> None:
    """It was a traceback, exit 1 and no error file (csv's field size limit)."""
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(f"# jobs\nobs_id={OBSID}, job_type=d, note={'x' * 140_000}\n")
    output = _refused_csv(jobs, tmp_path / "errors.json", line=2)
    assert f"Error: {jobs} line 2: cannot be read as CSV: field larger than field limit" in output


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("missing-dir/errors.json",
         "Error: cannot write the error file {path}: No such file or directory"),
        ("a-directory", "Error: the error file {path} is a directory"),
    ],
)  # fmt: skip
def test_an_error_file_that_cannot_be_written_stops_before_any_work(
    tmp_path: Path, where: str, message: str
) -> None:
    """The messages docs/mwa_client.md quotes, word for word."""
    (tmp_path / "a-directory").mkdir()
    csv_file = tmp_path / "jobs.csv"
    csv_file.write_text(f"obs_id={OBSID}, job_type=d, download_type=vis\n")
    code, output = mwa_client("-c", str(csv_file), "-e", str(tmp_path / where),
                              environ=offline_environ())  # fmt: skip
    assert code == 1, output
    assert message.format(path=tmp_path / where) in output.splitlines()
    assert "Connecting" not in output and "Traceback" not in output


@pytest.mark.parametrize(
    "named", ["by the same name", "relatively", "by a hard link", "by a symbolic link"]
)
def test_the_job_file_is_refused_as_the_error_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, named: str
) -> None:
    """`-c jobs.csv -e jobs.csv` replaced the job file with the error file's `[]`."""
    monkeypatch.chdir(tmp_path)
    csv_file = tmp_path / "jobs.csv"
    jobs = f"obs_id={OBSID}, job_type=d, download_type=vis\n"
    csv_file.write_text(jobs)
    error_file = {
        "by the same name": str(csv_file), "relatively": "./jobs.csv",
        "by a hard link": str(tmp_path / "hard.json"), "by a symbolic link": str(tmp_path / "sym.json"),
    }[named]  # fmt: skip
    if named == "by a hard link":
        os.link(csv_file, error_file)
    elif named == "by a symbolic link":
        os.symlink(csv_file, error_file)
    code, output = mwa_client("-s", "-c", str(csv_file), "-e", error_file,
                              environ=offline_environ())  # fmt: skip
    assert code == 1, output
    assert (f"Error: the error file {error_file} is the csv job file {csv_file}; writing the "
            "errors would replace its jobs: name another error file") in output.splitlines()  # fmt: skip
    assert "Connecting" not in output
    assert csv_file.read_text() == jobs
    # Nor is it written over on a usage error.
    with pytest.raises(SystemExit):
        mwa_client("-s", "-l", "-c", str(csv_file), "-e", error_file, environ=offline_environ())
    assert csv_file.read_text() == jobs


def test_usage_errors_write_the_error_file(tmp_path: Path) -> None:
    error_file = tmp_path / "e.json"
    with pytest.raises(SystemExit) as exited:
        mwa_client("-w", "abc", "-e", str(error_file), environ=offline_environ())
    assert exited.value.code == 1
    (error,) = json.loads(error_file.read_text())
    assert error["job_id"] is None
    assert error["result"].startswith("Error: argument -w/--download-only: 'abc' is not valid")
    with pytest.raises(SystemExit):
        mwa_client("-s", "-l", f"--errfile={error_file}", environ=offline_environ())
    assert "not allowed with argument" in json.loads(error_file.read_text())[0]["result"]


def test_exit_code_of_the_installed_script_for_a_bad_csv(server: Server, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("obs_id=1104585920 job_type=c\n")  # a missing comma
    result = subprocess.run(
        [str(BIN / "mwa_client"), "-c", str(bad), "-s"], env={**os.environ, **server.environ()},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 3, result.stdout + result.stderr
    assert "line 1" in result.stdout


#: The option list of the guide (asvo-mwa_client-guide.txt, "Command Line Options"), with
#: the help of -l and -w saying what the client does: the guide's "(-s, -c & -l are
#: ignored)" and "active job(s)" are not true of it (the modes exclude each other, and -l
#: lists jobs in every state).
GUIDE_OPTIONS = """
  -h, --help            show this help message and exit
  -s, --submit-only     submit job(s) from csv file then exit (-d is ignored)
  -l, --list-only       List all of the user's job(s), in any state, and exit immediately
                        (-c & -d are ignored; not with -s or -w)
  -w DOWNLOAD_JOB_ID, --download-only DOWNLOAD_JOB_ID
                        Download the job id (-w DOWNLOAD_JOB_ID), if it is ready;
                        or all downloadable jobs (-w all | -w 0), then exit (-c is ignored; not with -s or -l)
  -c FILE, --csv FILE   csv job file
  -d DIR, --dir DIR     download directory
  -e ERRFILE, --error-file ERRFILE, --errfile ERRFILE
                        Write errors in json format to an error file
  -v, --verbose         verbose output
"""
GUIDE_EXAMPLES = """
mwa_client -c csvfile -d destdir           Submit jobs in the csv file, monitor them, then download the files, then exit
mwa_client -c csvfile -s                   Submit jobs in the csv file, then exit
mwa_client -d destdir -w JOBID             Download the job id (assuming it is ready to download), then exit
mwa_client -d destdir -w all               Download any ready to download jobs, then exit
mwa_client -d destdir -w all -e error_file Download any ready to download jobs, then exit, writing any errors to error_file
mwa_client -l                              List all of your jobs and their status, then exit
"""


def test_help_matches_the_guide() -> None:
    result = subprocess.run([str(BIN / "mwa_client"), "--help"], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "200"}, timeout=60)  # fmt: skip
    assert result.returncode == 0

    def words(text: str) -> str:
        return " ".join(text.split())

    help_text = words(result.stdout)
    # Each option with its help, in the guide's order.
    entries = re.split(r"\n  (?=-)", GUIDE_OPTIONS.strip("\n"))
    positions = [help_text.find(words(entry)) for entry in entries]
    assert all(p >= 0 for p in positions), [
        e for e, p in zip(entries, positions, strict=True) if p < 0
    ]
    assert positions == sorted(positions)
    assert "are ignored" in help_text and "-s, -c & -l" not in help_text
    assert "-s, -c & -d" not in help_text and "active job" not in help_text
    assert "-ar, --allow-resubmit" in help_text
    for line in GUIDE_EXAMPLES.strip().splitlines():
        assert line in result.stdout


def test_the_guide_describes_every_option() -> None:
    """docs/mwa_client.md's option table has a row for every option of the parser."""
    from observatory.clients.mwa_client import build_parser

    guide = (Path(__file__).resolve().parents[2] / "docs" / "mwa_client.md").read_text()
    rows = [line for line in guide.splitlines() if line.startswith("| `-")]
    for action in build_parser()._actions:
        if "--help" in action.option_strings:
            continue
        assert any(all(f"`{o}" in row for o in action.option_strings) for row in rows), (
            action.option_strings
        )


def test_the_guides_voltage_recipe_makes_one_small_sub_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The recipe said --timesteps 8 --int-time 1: --int-time was ignored and it wrote
    16 sub-files of 8 s (5 GB); now --int-time with MWAX_VCS is refused."""
    from observatory.cli import main

    guide = (Path(__file__).parents[2] / "docs" / "mwa_client.md").read_text()
    match = re.search(r"`observatory (simulate observation --obsid N --mode MWAX_VCS[^`]*)`", guide)
    assert match is not None
    args = match[1].replace("\n", " ").replace("--obsid N", "--obsid 1320411040").split()
    assert main(["--data-dir", str(tmp_path), *args]) == 0
    (sub_file,) = (tmp_path / "archive" / "1320411040").glob("*.sub")
    assert sub_file.stat().st_size < 100_000_000
    assert main(["--data-dir", str(tmp_path / "other"), *args, "--int-time", "1"]) == 2
    assert "--int-time is for correlator observations" in capsys.readouterr().err


# -- the Python API -------------------------------------------------------------------------


def test_python_api(server: Server, tmp_path: Path) -> None:
    with pytest.raises(asvo.AsvoError) as refused:
        asvo.Session.login("wrong-key-here", base_url=server.base_url)
    assert refused.value.status_code in (401, 403)

    with server.session() as session:
        job_id = session.submit_download_job(OTHER_OBSID, download_type="vis_meta",
                                             allow_resubmit=True)  # fmt: skip
        with pytest.raises(asvo.AsvoError) as duplicate:
            session.submit_download_job(OTHER_OBSID, download_type="vis_meta", allow_resubmit=True)
        assert duplicate.value.error_code == 2 and duplicate.value.job_id is not None
        with pytest.raises(asvo.AsvoError) as invalid:
            session.submit_download_job(OTHER_OBSID, download_type="everything")
        assert invalid.value.error_code == 0 and invalid.value.status_code == 400
        assert invalid.value.detail.startswith("Download Type: ")

        seen = []
        for update in session.watch():
            if update.job.id == job_id:
                seen.append(update.job.state)
                if update.job.state in asvo.TERMINAL_STATES:
                    break
        assert seen[-1] == "completed" and len(seen) == len(set(seen))
        job = session.get_job(job_id)
        assert job is not None and job.type_name == "download metadata"
        (result,) = session.download_product(job, tmp_path)
        assert result.outcome == "downloaded" and result.local_path is not None
        assert sha1(result.local_path) == job.files[0].sha1
        (again,) = session.download_product(job, tmp_path)
        assert again.outcome == "verified" and again.bytes_transferred == 0

        slow = session.submit_conversion_job(OBSID, avg_time_res=2, avg_freq_res=40,
                                             allow_resubmit=True)  # fmt: skip
        session.cancel_job(slow)
        cancelled = completed_job(session, slow)
        assert cancelled.state == "cancelled"
        with pytest.raises(asvo.AsvoError) as missing:
            session.cancel_job(987654)
        assert missing.value.status_code == 404
        with pytest.raises(asvo.AsvoError, match="not ready for download"):
            session.download_product(cancelled, tmp_path)


def test_watch_polls_when_the_websocket_is_unavailable(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_websocket(_self: asvo.Session) -> None:
        raise OSError("connection refused")

    monkeypatch.setattr(asvo.Session, "_open_websocket", no_websocket)
    with server.session() as session:
        job_id = session.submit_download_job(OBSID, download_type="vis_meta", allow_resubmit=True)
        states = []
        for update in session.watch(poll_interval_s=0.2):
            if update.job.id == job_id:
                states.append(update.job.state)
                if update.job.state in asvo.TERMINAL_STATES:
                    break
    assert states[-1] == "completed"


class _EnoughPolls(Exception):
    """Ends a ``watch`` once it has resynchronised often enough."""


@pytest.mark.parametrize("websocket", [True, False], ids=["websocket", "polling"])
def test_watch_yields_an_unchanged_completed_job_once_over_many_resyncs(
    server: Server, monkeypatch: pytest.MonkeyPatch, websocket: bool
) -> None:
    """Each get_jobs used to sign the download URL afresh (its token holds the second it
    was made), so every resync a second or more after the last yielded the job again."""
    if not websocket:
        monkeypatch.setattr(asvo.Session, "_open_websocket", _websocket_refused)
    key = fresh_user_environ(server)["MWA_ASVO_API_KEY"]
    listings_after_completion = 0
    get_jobs = asvo.Session.get_jobs

    def counting_get_jobs(self: asvo.Session) -> list[asvo.Job]:
        nonlocal listings_after_completion
        jobs = get_jobs(self)
        if all(job.state == "completed" for job in jobs):
            listings_after_completion += 1
            if listings_after_completion > 4:  # 4 resyncs at 0.4 s: over a second apart
                raise _EnoughPolls
        return jobs

    monkeypatch.setattr(asvo.Session, "get_jobs", counting_get_jobs)
    updates = []
    with asvo.Session.login(key, base_url=server.base_url) as session:
        job_id = session.submit_download_job(OBSID, download_type="vis_meta")
        with pytest.raises(_EnoughPolls):
            for update in session.watch(poll_interval_s=0.4, resync_interval_s=0.4):
                updates.append((update.job.id, update.job.state))
    assert updates.count((job_id, "completed")) == 1, updates


def _websocket_refused(_self: asvo.Session) -> None:
    raise OSError("connection refused")


def without_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def test_downloads_go_through_the_http_proxy_of_the_environment(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    without_proxy_settings(monkeypatch)
    proxy = ForwardProxy(credentials="reader:p@ss")  # the downloads ignored them: 407
    try:
        monkeypatch.setenv("http_proxy", f"http://reader:p%40ss@127.0.0.1:{proxy.port}")
        with server.session() as session:
            job_id = session.submit_download_job(
                OBSID, download_type="vis_meta", allow_resubmit=True
            )
            job = completed_job(session, job_id)
            (result,) = session.download_product(job, tmp_path)
    finally:
        proxy.close()
    assert (
        result.outcome == "downloaded" and sha1(tmp_path / job.files[0].name) == job.files[0].sha1
    )
    assert any(line.startswith(f"GET {server.base_url}/api/download/{job_id}/")
               for line in proxy.request_lines)  # fmt: skip
    assert any(
        line.startswith(f"POST {server.base_url}/api/api_login") for line in proxy.request_lines
    )


def test_the_websocket_goes_through_the_http_proxy_of_the_environment(
    server: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """As the API calls and downloads do (the docs say proxies are used for everything):
    a CONNECT tunnel. It used to connect directly, which a site that allows only its
    proxy out refuses."""
    without_proxy_settings(monkeypatch)
    proxy = ForwardProxy(credentials="reader:secret")  # the tunnel ignored them: 407
    caplog.set_level(logging.INFO, logger="observatory.clients.asvo")
    try:
        monkeypatch.setenv("http_proxy", f"http://reader:secret@127.0.0.1:{proxy.port}")
        with server.session() as session:
            job_id = session.submit_download_job(OBSID, download_type="vis_meta",
                                                 allow_resubmit=True)  # fmt: skip
            for update in session.watch():
                if update.job.id == job_id:
                    break
    finally:
        proxy.close()
    assert "watching jobs over the websocket" in caplog.messages
    # Plain-http API calls go to the proxy as absolute URLs: the one tunnel is the websocket's.
    assert f"CONNECT 127.0.0.1:{server.port} HTTP/1.1" in proxy.request_lines


@pytest.mark.parametrize(
    ("environ", "base_url"),
    [
        ({}, "https://asvo.mwatelescope.org:443"),
        ({"MWA_ASVO_HOST": "127.0.0.1", "MWA_ASVO_PORT": "8000", "MWA_ASVO_HTTPS": "0"},
         "http://127.0.0.1:8000"),
        # giant-squid's form: the scheme and the port in the host (it gave http://https://...).
        ({"MWA_ASVO_HOST": "https://127.0.0.1:18231"}, "https://127.0.0.1:18231"),
        ({"MWA_ASVO_HOST": "https://asvo.example.org"}, "https://asvo.example.org:443"),
        ({"MWA_ASVO_HOST": "http://127.0.0.1:8000", "MWA_ASVO_HTTPS": "0",
          "MWA_ASVO_PORT": "8000"}, "http://127.0.0.1:8000"),
        ({"MWA_ASVO_HOST": "127.0.0.1:8000", "MWA_ASVO_HTTPS": "0"}, "http://127.0.0.1:8000"),
        # Cleared with `export MWA_ASVO_PORT=`: unset, not a bad port.
        ({"MWA_ASVO_HOST": "https://127.0.0.1:18231", "MWA_ASVO_PORT": "", "MWA_ASVO_HTTPS": " "},
         "https://127.0.0.1:18231"),
    ],
)  # fmt: skip
def test_the_server_address_from_the_environment(environ: dict[str, str], base_url: str) -> None:
    assert asvo.base_url_from_environment(environ) == base_url


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"MWA_ASVO_HOST": "https://127.0.0.1:18231", "MWA_ASVO_PORT": "8000"},
         "MWA_ASVO_HOST='https://127.0.0.1:18231' contradicts MWA_ASVO_PORT='8000'; give one"),
        ({"MWA_ASVO_HOST": "https://127.0.0.1:18231", "MWA_ASVO_HTTPS": "0"},
         "MWA_ASVO_HOST='https://127.0.0.1:18231' contradicts MWA_ASVO_HTTPS='0'"),
        ({"MWA_ASVO_HOST": "ftp://127.0.0.1"}, "the scheme must be http or https"),
        ({"MWA_ASVO_HOST": "https://127.0.0.1/api"},
         "is not a host name, host:port, [IPv6 address]:port or http[s]://host[:port]"),
        ({"MWA_ASVO_HOST": "127.0.0.1:port"}, "its port is not a port number"),
        ({"MWA_ASVO_PORT": "https"},
         "MWA_ASVO_PORT must be a port number (1 to 65535), not 'https'"),
    ],
)  # fmt: skip
def test_a_server_address_that_cannot_be_used_is_refused_naming_it(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(asvo.AsvoError, match=re.escape(message)):
        asvo.base_url_from_environment(environ)


@pytest.mark.parametrize(
    ("environ", "base_url"),
    [
        ({"MWA_ASVO_HOST": "::1"}, "https://[::1]:443"),
        ({"MWA_ASVO_HOST": "::1", "MWA_ASVO_PORT": "8000", "MWA_ASVO_HTTPS": "0"},
         "http://[::1]:8000"),
        ({"MWA_ASVO_HOST": "[::1]:8000", "MWA_ASVO_HTTPS": "0"}, "http://[::1]:8000"),
        ({"MWA_ASVO_HOST": "[2001:db8::5]"}, "https://[2001:db8::5]:443"),
        ({"MWA_ASVO_HOST": "https://[::1]:18231"}, "https://[::1]:18231"),
        ({"MWA_ASVO_HOST": "asvo.example.org:65535"}, "https://asvo.example.org:65535"),
    ],
)  # fmt: skip
def test_an_ipv6_server_address_is_taken_bare_or_in_brackets(
    environ: dict[str, str], base_url: str
) -> None:
    """``::1`` was refused: "its port is not a port number"."""
    assert asvo.base_url_from_environment(environ) == base_url


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        # The user part was dropped without a word (and a password must not be echoed).
        ({"MWA_ASVO_HOST": "alice@asvo.example.org"},
         "MWA_ASVO_HOST (...@asvo.example.org) must not carry a user name or password"),
        ({"MWA_ASVO_HOST": "https://alice:s3cret@asvo.example.org:443"},
         "MWA_ASVO_HOST (...@asvo.example.org:443) must not carry a user name or password"),
        # Port 0 was taken; one beyond 65535 was "not a port number" without the range.
        ({"MWA_ASVO_HOST": "asvo.example.org:0"},
         "MWA_ASVO_HOST='asvo.example.org:0': its port is not a port number (1 to 65535)"),
        ({"MWA_ASVO_HOST": "https://asvo.example.org:65536"},
         "MWA_ASVO_HOST='https://asvo.example.org:65536': its port is not a port number "
         "(1 to 65535)"),
        ({"MWA_ASVO_HOST": "asvo.example.org:"}, "its port is not a port number (1 to 65535)"),
        ({"MWA_ASVO_PORT": "0"}, "MWA_ASVO_PORT must be a port number (1 to 65535), not '0'"),
        ({"MWA_ASVO_PORT": "65536"},
         "MWA_ASVO_PORT must be a port number (1 to 65535), not '65536'"),
        ({"MWA_ASVO_HOST": "http://::1:8000"},
         "MWA_ASVO_HOST='http://::1:8000' is not a host name, host:port, [IPv6 address]:port "
         "or http[s]://host[:port] (with a port or a scheme, an IPv6 address goes in brackets)"),
        ({"MWA_ASVO_HOST": "[::1"}, "MWA_ASVO_HOST='[::1' is not a host name"),
        ({"MWA_ASVO_HOST": "[asvo.example.org]:443"},
         "MWA_ASVO_HOST='[asvo.example.org]:443' is not a host name"),
    ],
)  # fmt: skip
def test_a_server_address_with_credentials_or_no_usable_port_is_refused_naming_it(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(asvo.AsvoError, match=re.escape(message)) as refusal:
        asvo.base_url_from_environment(environ)
    assert "alice" not in str(refusal.value) and "s3cret" not in str(refusal.value)


def test_downloads_over_https_with_a_private_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TLS: the CA bundle of SSL_CERT_FILE is trusted; SSL_VERIFY=0 skips the check;
    an ``https_proxy`` is used as a CONNECT tunnel."""
    without_proxy_settings(monkeypatch)
    from servers import https_observatory_server

    data_dir = tmp_path / "data"
    seed(data_dir, None, [OBSID], api_key=API_KEY)
    with https_observatory_server(data_dir) as (_server, port, cert):
        csv_path = tmp_path / "jobs.csv"
        csv_path.write_text(f"obs_id={OBSID}, job_type=d, download_type=vis_meta\n")
        env = {"MWA_ASVO_API_KEY": API_KEY, "MWA_ASVO_HOST": "127.0.0.1",
               "MWA_ASVO_PORT": str(port)}  # fmt: skip
        code, output = mwa_client("-l", environ=env)
        # A certificate problem, said so (it was "Cannot reach the MWA ASVO server").
        assert code == 1 and "Cannot reach" not in output
        assert f"Error: the TLS certificate of 127.0.0.1:{port} was not accepted (" in output
        assert "set SSL_CERT_FILE (or REQUESTS_CA_BUNDLE) to its CA file" in output
        assert "SSL_VERIFY=0" in output
        # giant-squid's way of naming the server (it was http://https://127.0.0.1:P:P).
        code, output = mwa_client("-l", environ={"MWA_ASVO_API_KEY": API_KEY,
                                                 "MWA_ASVO_HOST": f"https://127.0.0.1:{port}",
                                                 "SSL_CERT_FILE": str(cert)})  # fmt: skip
        assert code == 0 and f"Connecting to MWA ASVO (https://127.0.0.1:{port})" in output
        out_dir = tmp_path / "out"
        out_dir.mkdir()
        code, output = mwa_client("-c", str(csv_path), "-d", str(out_dir),
                                  environ={**env, "SSL_CERT_FILE": str(cert)})  # fmt: skip
        assert code == 0, output
        code, output = mwa_client("-w", "all", "-d", str(out_dir),
                                  environ={**env, "SSL_VERIFY": "0"})  # fmt: skip
        assert code == 0 and "already downloaded, blake3 verified" in output
        # An HPC module's global SSL_CERT_FILE (the system's CAs) with the user's own bundle
        # in REQUESTS_CA_BUNDLE: both are trusted.
        import ssl

        system = (
            ssl.get_default_verify_paths().cafile or ssl.get_default_verify_paths().openssl_cafile
        )
        code, output = mwa_client("-l", environ={**env, "SSL_CERT_FILE": system,
                                                 "REQUESTS_CA_BUNDLE": str(cert)})  # fmt: skip
        assert code == 0, output

        (tmp_path / "proxied").mkdir()
        proxy = ForwardProxy()
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{proxy.port}")
        try:
            code, output = mwa_client("-w", "all", "-d", str(tmp_path / "proxied"),
                                      environ={**env, "SSL_CERT_FILE": str(cert)})  # fmt: skip
        finally:
            proxy.close()
        assert code == 0, output
        assert f"CONNECT 127.0.0.1:{port} HTTP/1.1" in proxy.request_lines
    assert len(list(out_dir.glob("*.tar"))) == 1
    assert len(list((tmp_path / "proxied").glob("*.tar"))) == 1


def test_verbose_shows_job_parameters(server: Server) -> None:
    code, output = mwa_client("-l", "-v", environ=server.environ())
    assert code == 0 and "params: {" in output


def test_progress_bars_on_a_terminal(server: Server, tmp_path: Path) -> None:
    """On a terminal (a pty here) downloads show rich progress bars, per file and overall."""
    with server.session() as session:
        job_id = session.submit_download_job(OBSID, download_type="vis", allow_resubmit=True)
        job = completed_job(session, job_id)
    controller, terminal = pty.openpty()
    client = subprocess.Popen(
        [str(BIN / "mwa_client"), "-w", str(job_id), "-d", str(tmp_path)],
        stdin=terminal, stdout=terminal, stderr=terminal,
        env={**os.environ, **server.environ(), "COLUMNS": "120", "TERM": "xterm"},
    )  # fmt: skip
    os.close(terminal)
    output = b""
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # the terminal closes when the client exits
            break
        if not data:
            break
        output += data
    os.close(controller)
    assert client.wait(60) == 0
    text = output.decode("utf-8", "replace")
    assert "all downloads" in text and f"{job_id} {job.files[0].name}" in text
    assert "\u2501" in text  # the bar
    assert "mwa_client finished successfully" in text


def test_downloads_verify_blake3_and_fall_back_to_sha1(server: Server, tmp_path: Path) -> None:
    """Our server publishes BLAKE3 beside SHA-1; the MWA's servers publish only SHA-1."""
    with server.session() as session:
        job_id = session.submit_download_job(OBSID, download_type="vis_meta", allow_resubmit=True)
        job = completed_job(session, job_id)
        (file,) = job.files
        assert file.checksum == ("blake3", file.blake3) and file.sha1
        (result,) = session.download_product(job, tmp_path / "ours")
        assert result.outcome == "downloaded" and result.local_path is not None
        assert blake3_hex(result.local_path) == file.blake3
        assert sha1(result.local_path) == file.sha1

        sha1_only = dataclasses.replace(file, blake3=None)
        assert sha1_only.checksum == ("sha1", file.sha1)
        (result,) = session.download_product(
            dataclasses.replace(job, files=(sha1_only,)), tmp_path / "mwa"
        )
        assert result.outcome == "downloaded" and result.local_path is not None
        assert sha1(result.local_path) == file.sha1

        wrong_sha1 = dataclasses.replace(sha1_only, sha1="0" * 40)
        with pytest.raises(asvo.ChecksumError, match=r"has sha1 .* the server says 0{40}"):
            session.download_product(
                dataclasses.replace(job, files=(wrong_sha1,)), tmp_path / "bad"
            )
        assert not list((tmp_path / "bad").iterdir())  # neither the file nor its .part


def test_two_processes_downloading_one_file_into_one_directory_both_succeed(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both wrote one .part file: the first to finish renamed it away under the other,
    whose run then failed (exit 4, "Download Failed"). The second now waits, then verifies."""
    import threading
    import time as time_module

    with server.session() as session:
        job_id = session.submit_download_job(OBSID, download_type="vis", allow_resubmit=True)
        job = completed_job(session, job_id)
    real_fetch = asvo.Session._fetch_into

    def slow_fetch(self: asvo.Session, *args: object, **kwargs: object) -> object:
        time_module.sleep(0.5)  # both would be fetching at once
        return real_fetch(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(asvo.Session, "_fetch_into", slow_fetch)
    outcomes: list[str] = []
    failures: list[BaseException] = []

    def download() -> None:
        try:
            # Separate sessions, as separate processes have (the lock is per open file).
            with server.session() as own:
                (result,) = own.download_product(job, tmp_path)
                outcomes.append(result.outcome)
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=download) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    assert sorted(outcomes) == ["downloaded", "verified"]
    (file,) = job.files
    assert sha1(tmp_path / file.name) == file.sha1
    assert sorted(p.name for p in tmp_path.iterdir()) == [file.name]  # no .part, no lock left


def test_a_voltage_job_channel_range_needs_both_ends(server: Server) -> None:
    """from_channel alone reached the server, which answered "To Channel: Expected not None"."""
    with server.session() as session:
        for one_end in ({"from_channel": 134}, {"to_channel": 140}):
            with pytest.raises(ValueError, match="from_channel and to_channel go together"):
                session.submit_voltage_job(OBSID, offset_s=0, duration_s=8, **one_end)


@contextmanager
def product_server(status: int, headers: dict[str, str], body: bytes) -> Iterator[str]:
    """A server on loopback answering every GET with ``status``, ``headers`` and ``body``;
    yields the URL of a product on it."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    with handler_server(Handler) as port:
        yield f"http://127.0.0.1:{port}/download/7/p.tar?token=t"


def acacia_job(url: str, content: bytes) -> asvo.Job:
    file = asvo.ProductFile("acacia", len(content), url=url, sha1=hashlib.sha1(content).hexdigest())
    return asvo.Job(7, OBSID, 1, "completed", files=(file,))


def test_a_resume_answered_with_a_malformed_content_range_fails_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It raised ValueError in the download thread: the file's failure went unrecorded and
    the run ended 'successfully' (or waited for ever for the next queued file)."""
    content = b"x" * 100
    monkeypatch.setattr(asvo.time, "sleep", lambda _s: None)
    (tmp_path / "p.tar.part").write_bytes(content[:40])
    with product_server(206, {"Content-Range": "bytes */100"}, content[40:]) as url:
        session = asvo.Session(url, httpx.Client(), verify=True)
        with pytest.raises(asvo.AsvoError, match=r"Content-Range 'bytes \*/100'"):
            session.download_product(acacia_job(url, content), tmp_path)
    assert (tmp_path / "p.tar.part").read_bytes() == content[:40]  # kept for a resume


def test_a_download_that_fails_unexpectedly_is_recorded_and_the_others_go_on(
    tmp_path: Path,
) -> None:
    from observatory.clients.mwa_client import Downloads, JobError, Reporter

    class Failing:
        def download_product(self, job: asvo.Job, *_args: object, **_kwargs: object) -> None:
            raise RuntimeError(f"a bug while fetching {job.files[0].name}")

    files = tuple(asvo.ProductFile("acacia", 1, url=f"http://127.0.0.1:9/{n}.tar", sha1="0" * 40)
                  for n in ("a", "b"))  # fmt: skip
    errors: list[JobError] = []
    output = io.StringIO()
    downloads = Downloads(Failing(), tmp_path, 1, Reporter(output, False), errors)  # type: ignore[arg-type]
    downloads.start(asvo.Job(7, OBSID, 1, "completed", files=files))
    waiting = threading.Thread(target=downloads.wait, daemon=True)
    waiting.start()
    waiting.join(timeout=30)
    assert not waiting.is_alive(), "the second file was never downloaded"
    assert [e.result for e in errors] == [
        f"Error: {n}.tar: unexpected error: RuntimeError('a bug while fetching {n}.tar')"
        for n in ("a", "b")
    ]
    assert "Download Failed: Job id: 7 file: a.tar" in output.getvalue()


def test_a_symbolic_link_at_the_part_or_lock_name_is_never_written_through(tmp_path: Path) -> None:
    """In a shared directory another user can plant links at the predictable .part and
    lock names: the download appended the product to the link's target."""
    content = b"z" * 100
    victim, lock_victim = tmp_path / "victim.txt", tmp_path / "created-by-the-lock"
    victim.write_text("someone's notes\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "p.tar.part").symlink_to(victim)
    (out / ".p.tar.lock").symlink_to(lock_victim)
    with product_server(200, {}, content) as url:
        session = asvo.Session(url, httpx.Client(), verify=True)
        session.download_product(acacia_job(url, content), out)
    assert victim.read_text() == "someone's notes\n" and not lock_victim.exists()
    assert (out / "p.tar").read_bytes() == content
    assert sorted(p.name for p in out.iterdir()) == ["p.tar"]


def test_local_problems_of_the_python_api_are_asvo_errors(tmp_path: Path) -> None:
    """docs/mwa_client.md: every failure of the API raises AsvoError. A CA file that cannot
    be read, an IPv6 host and a download directory that cannot be made raised
    FileNotFoundError, httpx.InvalidURL and PermissionError."""
    with pytest.raises(
        asvo.AsvoError, match=r"CA certificates /nonexistent/ca\.pem .*cannot be read"
    ):
        asvo._tls_context("/nonexistent/ca.pem")
    asvo._tls_context(str(tmp_path))  # a directory of CA certificates, as requests takes it
    with pytest.raises(
        asvo.AsvoError, match=r"Cannot reach the MWA ASVO server at http://\[::1\]:9"
    ):
        asvo.Session.login("key", host="::1", port=9, https=False)
    with pytest.MonkeyPatch.context() as patch:  # through a proxy, the proxy is named
        for name in ("no_proxy", "NO_PROXY", "http_proxy"):
            patch.delenv(name, raising=False)
        patch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
        with pytest.raises(
            asvo.AsvoError,
            match=r"server at http://asvo\.example\.org:8080 through the proxy 127\.0\.0\.1:9 "
            r"\(from http_proxy\)",
        ):
            asvo.Session.login("key", host="asvo.example.org", port=8080, https=False)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    content = b"q" * 10
    job = acacia_job("http://127.0.0.1:9/download/7/p.tar?token=t", content)
    with pytest.raises(asvo.AsvoError, match=r"Job 7: cannot save its product in .*a-file/out"):
        asvo.Session("http://127.0.0.1:9", httpx.Client(), verify=True).download_product(
            job, blocked / "out"
        )


def test_a_part_file_of_a_product_that_is_gone_is_deleted(tmp_path: Path) -> None:
    content = b"y" * 100
    (tmp_path / "p.tar.part").write_bytes(content[:40])
    gone = json.dumps({"error": "Job 7's product has expired", "error_code": 1}).encode()
    with product_server(404, {"Content-Type": "application/json"}, gone) as url:
        session = asvo.Session(url, httpx.Client(), verify=True)
        with pytest.raises(asvo.AsvoError, match=r"deleted p\.tar\.part, 40 bytes") as refused:
            session.download_product(acacia_job(url, content), tmp_path)
    assert refused.value.status_code == 404
    assert list(tmp_path.iterdir()) == []  # no later run could resume it


@pytest.mark.parametrize("tail", ["/..", "/."])
def test_a_product_path_that_is_no_file_name_is_refused(tmp_path: Path, tail: str) -> None:
    """A path ending in /.. named the destination's parent: the copy landed outside it."""
    job, file = delivered(tmp_path, {"a.txt": b"a"})
    job = dataclasses.replace(job, files=(dataclasses.replace(file, path=file.path + tail),))
    dest = tmp_path / "parent" / "dest"
    session = asvo.Session("http://127.0.0.1:9", httpx.Client(), verify=True)
    with pytest.raises(asvo.AsvoError, match="has no usable file name"):
        session.download_product(job, dest)
    assert list((tmp_path / "parent").rglob("*")) == [dest]  # dest made, nothing in or beside
