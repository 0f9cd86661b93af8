"""``mwa_client``: submit ASVO jobs from a CSV file, watch them, download the products.

The options, messages, CSV format, error file and exit codes are those of
manta-ray-client's ``mwa_client`` (../shared/sources/asvo-mwa_client-guide.txt);
downloads additionally resume, verify SHA-1 checksums and show progress bars.

Exit codes: 0 success, 1 any other error (usage included), 2 an HTTP error (the
server's message is printed), 3 a CSV parse error, 4 some jobs ended in error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import queue
import stat
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from observatory import __version__
from observatory.clients.asvo import (
    AsvoError,
    DownloadResult,
    Job,
    ProductFile,
    Session,
    base_url_from_environment,
    verify_from_environment,
)
from observatory.clients.csvjobs import CsvJob, CsvJobError, decode_job_csv, parse_job_csv

EXIT_OK, EXIT_OTHER, EXIT_HTTP, EXIT_CSV, EXIT_JOB_ERRORS = 0, 1, 2, 3, 4
log = logging.getLogger(__name__)

DEFAULT_PARALLEL_DOWNLOADS = 4

VERSION_STRING = f"mwa_client (observatory-services {__version__}; manta-ray-client 2.0 protocol)"

DESCRIPTION = f"""{VERSION_STRING}
==============================

The mwa_client is a command-line tool for submitting, monitoring and
downloading jobs from the MWA ASVO. Please see docs/mwa_client.md for the
csv file format and other details."""

EPILOG = """
Examples:
mwa_client -c csvfile -d destdir           Submit jobs in the csv file, monitor them, then download the files, then exit
mwa_client -c csvfile -s                   Submit jobs in the csv file, then exit
mwa_client -d destdir -w JOBID             Download the job id (assuming it is ready to download), then exit
mwa_client -d destdir -w all               Download any ready to download jobs, then exit
mwa_client -d destdir -w all -e error_file Download any ready to download jobs, then exit, writing any errors to error_file
mwa_client -l                              List all of your jobs and their status, then exit

Environment: MWA_ASVO_API_KEY (required), MWA_ASVO_HOST, MWA_ASVO_PORT,
MWA_ASVO_HTTPS (1 https, 0 http), SSL_VERIFY (0 skips certificate checks).
Exit codes: 0 success, 1 other error, 2 HTTP error, 3 CSV parse error,
4 some jobs ended in error."""

API_KEY_MISSING = (
    "[ERROR] MWA_ASVO_API_KEY env variable not defined. Log in to the MWA ASVO web site "
    "and open Your Profile page to obtain your API KEY, then place the following into your "
    ".profile/.bashrc/startup scripts (where xxx is your API key):\n   export MWA_ASVO_API_KEY=xxx\n"
)
OBSOLETE_VARIABLE = (
    "[WARNING] {0} environment variable is no longer used by the mwa_client- you should "
    "remove it from your .profile/.bashrc/startup scripts."
)


class UsageError(Exception):
    """A command line that cannot run (exit 1)."""


class CsvFileUnreadable(Exception):
    """The csv job file cannot be opened or read (exit 3, as a csv error)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors exit 1 ("other error"), keeping 2 for HTTP errors."""

    #: The message of the last usage error (written to the error file).
    error_message: str | None = None

    def error(self, message: str) -> NoReturn:
        self.error_message = message
        self.print_usage(sys.stderr)
        self.exit(EXIT_OTHER, f"{self.prog}: error: {message}\n")


class _ErrorFileParser(argparse.ArgumentParser):
    """Finds ``-e FILE`` (and ``-c FILE``) in a command line that the full parser refused."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(message)


def _error_and_csv_files_of(argv: Sequence[str] | None) -> tuple[str | None, str | None]:
    """The ``-e`` and ``-c`` files of a command line the full parser refused (None if not
    given, or if even they cannot be read from it)."""
    parser = _ErrorFileParser(add_help=False)
    parser.add_argument("-e", "--error-file", "--errfile", dest="errfile")
    parser.add_argument("-c", "--csv", dest="csvfile")
    try:
        known, _ = parser.parse_known_args(argv)
    except ValueError:
        return None, None
    return (
        known.errfile if isinstance(known.errfile, str) else None,
        known.csvfile if isinstance(known.csvfile, str) else None,
    )


def _download_job_id(value: str) -> int:
    """``-w`` value: a job id, or ``all`` / ``0`` for every ready job (0).

    Spaces around it and a ``+`` are taken, as the MWA's client (Python's ``int``) takes
    them: ids from ``printf``/``awk`` output come padded.
    """
    text = value.strip()
    if text.lower() == "all":
        return 0
    digits = text.removeprefix("+")
    if digits.isascii() and digits.isdecimal():
        return int(digits)
    raise argparse.ArgumentTypeError(
        f"'{value}' is not valid for -w / --download-only. Try a Job Id, or 'all' for all jobs."
    )


def _positive(value: str) -> int:
    if not (value.isascii() and value.isdecimal()) or int(value) < 1:
        raise argparse.ArgumentTypeError(f"'{value}' must be a whole number of at least 1")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    """The command line of the guide, plus ``--parallel``."""
    parser = _Parser(
        prog="mwa_client",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument(
        "-s", "--submit-only", action="store_true", dest="submit_only",
        help="submit job(s) from csv file then exit (-d is ignored)",
    )  # fmt: skip
    # The guide's help says -l and -w ignore the other modes; here they exclude each other
    # (a usage error), and -l lists jobs in every state: the help says what the client does.
    modes.add_argument(
        "-l", "--list-only", action="store_true", dest="list_only",
        help="List all of the user's job(s), in any state, and exit immediately "
        "(-c & -d are ignored; not with -s or -w)",
    )  # fmt: skip
    modes.add_argument(
        "-w", "--download-only", type=_download_job_id, dest="download_job_id",
        metavar="DOWNLOAD_JOB_ID",
        help="Download the job id (-w DOWNLOAD_JOB_ID), if it is ready; or all downloadable "
        "jobs (-w all | -w 0), then exit (-c is ignored; not with -s or -l)",
    )  # fmt: skip
    parser.add_argument("-c", "--csv", dest="csvfile", metavar="FILE", help="csv job file")
    parser.add_argument("-d", "--dir", dest="outdir", metavar="DIR", help="download directory")
    parser.add_argument(
        "-e", "--error-file", "--errfile", dest="errfile", metavar="ERRFILE",
        help="Write errors in json format to an error file",
    )  # fmt: skip
    parser.add_argument(
        "-v", "--verbose", action="store_true",
        help="verbose output (with each job's parameters, when submitting too)",
    )  # fmt: skip
    parser.add_argument(
        "-ar", "--allow-resubmit", action="store_true", dest="allow_resubmit",
        help="Will allow a job with the same parameters and an existing job in your queue in "
        "Completed, Error or Cancelled status to be resubmitted. Default is to not allow "
        "resubmission if the new job matches the parameters of an existing job in your queue.",
    )  # fmt: skip
    parser.add_argument(
        "--parallel", type=_positive, default=DEFAULT_PARALLEL_DOWNLOADS, metavar="N",
        help=f"download N files at once (default {DEFAULT_PARALLEL_DOWNLOADS})",
    )  # fmt: skip
    return parser


@dataclass(frozen=True)
class JobError:
    """One entry of the error file."""

    job_id: int | None
    obs_id: str | None
    result: str

    def as_json(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "obs_id": self.obs_id, "result": self.result}


class Reporter:
    """Status lines, and progress bars when stdout is a terminal (plain lines otherwise).

    ``status_stream``, when given, takes the status lines (``say``) instead of ``stream``:
    ``-l`` into a file or a pipe keeps stdout for the listing alone.
    """

    def __init__(self, stream: TextIO, verbose: bool, status_stream: TextIO | None = None) -> None:
        self.verbose = verbose
        self.interactive = stream.isatty()
        self.console = Console(
            file=stream, highlight=False, soft_wrap=True,
            force_terminal=self.interactive, no_color=not self.interactive,
        )  # fmt: skip
        self._status_console = self.console
        if status_stream is not None:
            status_terminal = status_stream.isatty()
            self._status_console = Console(
                file=status_stream, highlight=False, soft_wrap=True,
                force_terminal=status_terminal, no_color=not status_terminal,
            )  # fmt: skip
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self._overall: TaskID | None = None
        self._file_tasks: dict[tuple[int, str], TaskID] = {}

    def say(self, message: str) -> None:
        """One status line (above the progress bars when there are some)."""
        with self._lock:
            if self._progress is not None:
                self._progress.console.print(message, markup=False)
            else:
                self._status_console.print(message, markup=False)

    def job_line(self, job: Job) -> str:
        """``Job id: N Obs id: M type: T`` (with params when verbose)."""
        line = f"Job id: {job.id} Obs id: {job.obs_id} type: {job.type_name}"
        if self.verbose:
            line += f" typeid: {job.job_type} params: {dict(job.params)}"
        return line

    def job_status(self, job: Job, action: str = "UPDATE") -> str:
        """The status message of a job, as mwa_client words it."""
        if action == "DELETE":
            return f"Deleted: {self.job_line(job)}"
        if job.state == "completed":
            first = job.files[0] if job.files else None
            if first is not None and first.type in ("dug", "scratch"):
                return (f"Ready on /{first.type}: {self.job_line(job)} path: {first.path}, "
                        f"size: {first.size_bytes} bytes")  # fmt: skip
            return f"Ready for Download: {self.job_line(job)} size: {job.size_bytes} bytes"
        if job.state == "error":
            return f"Error: {job.error_text} {self.job_line(job)}"
        return f"{job.state_label}: {self.job_line(job)}"

    # -- download progress ------------------------------------------------------------

    def start_downloads(self) -> None:
        if self.interactive and self._progress is None:
            self._progress = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._overall = self._progress.add_task("all downloads", total=0)
            self._progress.start()

    def file_queued(self, job: Job, file: ProductFile) -> None:
        if self._progress is not None and self._overall is not None:
            with self._lock:
                task = self._progress.add_task(f"{job.id} {file.name}", total=file.size_bytes)
                self._file_tasks[(job.id, file.name)] = task
                total = self._progress.tasks[self._overall].total or 0
                self._progress.update(self._overall, total=total + file.size_bytes)

    def file_progress(self, job: Job, file: ProductFile, done: int, total: int) -> None:
        if self._progress is None or self._overall is None:
            return
        with self._lock:
            task = self._file_tasks.get((job.id, file.name))
            if task is None:
                return
            before = self._progress.tasks[task].completed
            self._progress.update(task, completed=done)
            self._progress.advance(self._overall, done - before)

    def stop_downloads(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class Downloads:
    """Product downloads, ``parallel`` files at a time, recording errors.

    The workers are daemon threads: an interrupted client exits at once, even with a
    download waiting on a silent connection, and its ``.part`` files hold exactly
    the bytes received, so the next run resumes them.
    """

    def __init__(
        self, session: Session, outdir: Path, parallel: int, reporter: Reporter,
        errors: list[JobError],
    ) -> None:  # fmt: skip
        self._session = session
        self._outdir = outdir
        self._reporter = reporter
        self._errors = errors
        self._errors_lock = threading.Lock()
        self._queue: queue.Queue[tuple[Job, ProductFile]] = queue.Queue()
        self._workers = [
            threading.Thread(target=self._work, name=f"download-{i}", daemon=True)
            for i in range(parallel)
        ]
        self._started: set[int] = set()

    def start(self, job: Job) -> None:
        """Queue the files of a completed job (once per job)."""
        if job.id in self._started:
            return
        self._started.add(job.id)
        self._reporter.start_downloads()
        for worker in self._workers:
            if not worker.is_alive():
                worker.start()
        for file in job.files:
            self._reporter.file_queued(job, file)
            self._queue.put((job, file))

    def wait(self) -> None:
        """Block until every queued download has finished or failed."""
        # Queue.join() in short waits, so that Ctrl-C is handled at once.
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                self._queue.all_tasks_done.wait(0.2)

    def _work(self) -> None:
        while True:
            job, file = self._queue.get()
            try:
                self._download(job, file)
            finally:
                self._queue.task_done()

    def _download(self, job: Job, file: ProductFile) -> None:
        say = self._reporter.say
        single = dataclasses.replace(job, files=(file,))
        # lexists: a symbolic link of the name is met too (and refused), even a dangling one.
        exists = os.path.lexists(self._outdir / file.name)
        if file.url:
            verb = "Verifying" if exists else "Downloading"
            say(f"{verb}: Job id: {job.id} file: {file.name} size: {file.size_bytes} bytes")
        elif file.path and Path(file.path).is_dir():  # a scratch/dug delivery on this machine
            verb = "Verifying" if exists else "Copying"
            say(f"{verb}: Job id: {job.id} path: {file.path} size: {file.size_bytes} bytes")
        try:
            (result,) = self._session.download_product(
                single, self._outdir,
                progress=lambda f, done, total: self._reporter.file_progress(job, f, done, total),
            )  # fmt: skip
        except (AsvoError, OSError) as exc:  # OSError: the local disk (full, not writable)
            # The line and the error file already name the job: not "Job N: " a second time.
            message = (
                exc.message.removeprefix(f"Job {job.id}: ")
                if isinstance(exc, AsvoError)
                else f"{file.name}: {exc}"
            )
            self._failed(job, file, message)
            return
        except Exception as exc:  # a failure nobody foresaw: still this file's, not the run's
            log.exception("download of %s (job %d) failed", file.name, job.id)
            self._failed(job, file, f"{file.name}: unexpected error: {exc!r}")
            return
        say(_describe_download(job, result))

    def _failed(self, job: Job, file: ProductFile, message: str) -> None:
        """Report a file that could not be downloaded, and record it in the error file."""
        self._reporter.say(f"Download Failed: Job id: {job.id} file: {file.name}: {message}")
        with self._errors_lock:
            self._errors.append(JobError(job.id, str(job.obs_id), f"Error: {message}"))


def _describe_download(job: Job, result: DownloadResult) -> str:
    file = result.file
    if result.outcome == "remote":
        return f"Ready on /{file.type}: Job id: {job.id} file: {file.path}"
    if result.outcome in ("copied", "exists"):
        how = {
            "exists": "already copied, file sizes verified",
            "copied": f"copied from {file.path}, {result.bytes_transferred} bytes, sizes verified",
        }[result.outcome]
        if result.redownloaded:
            count = result.files_copied
            how = (f"the copy on disk did not match: its {count} "
                   f"file{'s' if count != 1 else ''} copied again from {file.path}, "
                   f"{result.bytes_transferred} bytes, sizes verified; other files left "
                   "as they were")  # fmt: skip
        return f"Download complete: Job id: {job.id} file: {result.local_path} ({how})"
    algorithm, digest = file.checksum or ("checksum", "")
    how = {
        "verified": f"already downloaded, {algorithm} verified",
        "resumed": f"resumed, {result.bytes_transferred} bytes fetched, {algorithm} verified",
        "downloaded": f"{algorithm} verified",
    }[result.outcome]
    if result.redownloaded:
        how = "the copy on disk was corrupt and was downloaded again, " + how
    # The SHA-1 every ASVO product carries, as the guide's client prints it (whichever
    # checksum was verified: the parenthesis says which).
    published = ("sha1", file.sha1.lower()) if file.sha1 else (algorithm, digest)
    return (f"Download complete: Job id: {job.id} file: {result.local_path} "
            f"server-{published[0]}: {published[1]} ({how})")  # fmt: skip


def _submit_jobs(
    session: Session,
    jobs: Sequence[CsvJob],
    reporter: Reporter,
    errors: list[JobError],
    *,
    follow_duplicates: bool,
) -> list[int]:
    """Submit the CSV's jobs; returns the ids to follow (new, or adopted duplicates).

    A duplicate (``error_code`` 2) names the job already queued, running or complete. With
    ``follow_duplicates`` (full mode) that job is followed and downloaded as a new one
    would be, wherever it came from: an earlier run, or another run submitting the same
    file at this moment. ``-s`` follows nothing, so it says "Skipping" as the guide's
    client does.
    """
    tracked: list[int] = []
    for number, job in enumerate(jobs, start=1):
        obs_id = job.params.get("obs_id")
        try:
            job_id = session.submit(job.endpoint, job.params)
        except AsvoError as exc:
            if exc.status_code is None or exc.error_code not in (0, 2):
                reporter.say(
                    f"Error submitting job #{number} (line {job.line_number}) from csvfile."
                )
                raise
            error_text = exc.detail
            if exc.error_code == 2 and exc.job_id is not None:
                if not follow_duplicates:
                    reporter.say(f"Skipping: {exc.job_id} already running or complete.")
                    continue
                if exc.job_id not in tracked:
                    tracked.append(exc.job_id)
                reporter.say(
                    f"Following: {exc.job_id} already queued, processing or complete "
                    f"(job #{number}, line {job.line_number})."
                )
                continue
            # The server's sentence may end with its own full stop (the outage messages).
            ending = "" if error_text.rstrip().endswith((".", "!", "?")) else "."
            reporter.say(
                f"Skipping: job #{number} (line {job.line_number}) - {error_text.rstrip()}{ending}"
            )
            errors.append(JobError(None, obs_id, f"Error: {error_text}"))
            continue
        if reporter.verbose:
            # What was sent (the csv line, old keys renamed): with -s no status line follows.
            reporter.say(f"Submitted job: {job_id} params: {dict(job.params)}")
        else:
            reporter.say(f"Submitted job: {job_id} ")
        tracked.append(job_id)
    return tracked


def _follow(
    session: Session, tracked: list[int], downloads: Downloads, reporter: Reporter,
    errors: list[JobError],
) -> None:  # fmt: skip
    """Watch the tracked jobs until each has finished; download each as it completes."""
    pending = set(tracked)
    if not pending:
        return
    reporter.say("Connecting to MWA ASVO Notifier...")
    for update in session.watch(
        on_connected=lambda: reporter.say("Connected to MWA ASVO Notifier")
    ):
        job = update.job
        if job.id not in pending:
            continue
        reporter.say(reporter.job_status(job, update.action))
        if update.action == "DELETE":
            pending.discard(job.id)
        elif job.state == "completed":
            downloads.start(job)
            pending.discard(job.id)
        elif job.state in ("error", "expired"):
            text = job.error_text if job.state == "error" else "the job expired"
            errors.append(JobError(job.id, str(job.obs_id), f"Error: {text}"))
            pending.discard(job.id)
        elif job.state == "cancelled":
            # Cancelled elsewhere (the web page, another client) while this run waited for
            # it: nothing of it will be downloaded, which exit 0 would deny.
            errors.append(JobError(job.id, str(job.obs_id), "Error: the job was cancelled"))
            pending.discard(job.id)
        if not pending:
            break


def _list_jobs(session: Session, reporter: Reporter) -> None:
    """The ``-l`` listing on stdout: a table on a terminal, tab-separated lines otherwise."""
    jobs = session.get_jobs()
    header = ("Job id", "Obs id", "Type", "State", "Size (bytes)", "Error")
    if not jobs:
        reporter.say("You have no jobs.")
        if not reporter.interactive:  # a script reads a header and no rows
            reporter.console.file.write("\t".join(header) + "\n")
            reporter.console.file.flush()
        return
    rows = [
        (
            str(job.id), str(job.obs_id), job.type_name,
            "Ready" if job.state == "completed" else job.state_label.split(":")[0],
            str(job.size_bytes) if job.files else "", " ".join((job.error_text or "").split()),
        )
        for job in jobs
    ]  # fmt: skip
    if reporter.interactive:
        table = Table(*header, box=None)
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))  # never read as markup
        reporter.console.print(table)
    else:
        # For scripts reading it: one line per job, tab-separated, neither padded nor wrapped.
        # Written as they are: rich would expand the tabs.
        # Every row has the header's fields, empty ones too (a job without an error).
        reporter.console.file.write("".join("\t".join(row) + "\n" for row in (header, *rows)))
        reporter.console.file.flush()
    if reporter.verbose:  # on a terminal part of the listing; for a script, status lines
        for job in jobs:
            if reporter.interactive:
                reporter.console.print(reporter.job_status(job), markup=False)
            else:
                reporter.say(reporter.job_status(job))


def _ready_jobs(
    session: Session, job_id: int, outdir: Path, reporter: Reporter, errors: list[JobError]
) -> list[Job]:
    """The jobs ``-w`` downloads: every completed one (0), or the one asked for.

    An expired job asked for by its id is an error saying so, and the ``.part`` files of
    its product in ``outdir`` are deleted: no run could resume them. A cancelled or failed
    one is an error naming its state (and a failure's reason); one still running keeps
    the guide's "not ready for download".
    """
    jobs = session.get_jobs()
    if job_id == 0:
        ready = [job for job in jobs if job.state == "completed"]
        for ready_job in ready:
            reporter.say(reporter.job_status(ready_job))
        if not ready:
            reporter.say("You have no jobs that are ready to download.")
        return ready
    wanted = next((j for j in jobs if j.id == job_id), None)
    if wanted is None:
        errors.append(JobError(job_id, "N/A", f"Error: Job Id {job_id} is not a valid job, "
                                              "has expired or is not owned by you."))  # fmt: skip
        return []
    if wanted.state == "expired":
        deleted = "".join(
            f" (deleted {path.name}, {size} bytes)"
            for path, size in _delete_partial_downloads(outdir, wanted)
        )
        errors.append(JobError(job_id, str(wanted.obs_id),
                               f"Error: Job Id {job_id} has expired: its product is gone and can "
                               f"no longer be downloaded{deleted}"))  # fmt: skip
        return []
    if wanted.state in ("cancelled", "error"):
        # Finished without a product: waiting would not help, as the guide's "not ready
        # for download" suggests.
        why = (
            "was cancelled"
            if wanted.state == "cancelled"
            else f"failed: {' '.join((wanted.error_text or 'no reason given').split())}"
        )
        errors.append(JobError(job_id, str(wanted.obs_id),
                               f"Error: Job Id {job_id} {why}; it has no product to "
                               "download"))  # fmt: skip
        return []
    if wanted.state != "completed":
        errors.append(JobError(job_id, str(wanted.obs_id),
                               "Error: Invalid job state- job not ready for download"))  # fmt: skip
        return []
    # The status line -w all prints for each job (with its parameters under -v).
    reporter.say(reporter.job_status(wanted))
    return [wanted]


def _delete_partial_downloads(outdir: Path, job: Job) -> list[tuple[Path, int]]:
    """Delete the ``.part`` files of ``job``'s product in ``outdir``; returns them and their sizes.

    An expired job lists no files, so its products are known by the name the ASVO gives
    them, ``<obsid>_<jobid>_<kind>.tar``. Only regular files are deleted: a link or a
    directory of such a name is not a partial download of this client's.
    """
    deleted = []
    for path in sorted(outdir.glob(f"{job.obs_id}_{job.id}_*.part")):
        try:
            details = path.lstat()
            if not stat.S_ISREG(details.st_mode):
                continue
            path.unlink()
        except FileNotFoundError:  # another run deleted it meanwhile
            continue
        deleted.append((path, details.st_size))
    return deleted


def _write_error_file(path: str | None, errors: Sequence[JobError]) -> None:
    if path:
        Path(path).write_text(json.dumps([e.as_json() for e in errors], indent=4) + "\n")


def _check_error_file(path: str | None, csv_path: str | None) -> None:
    """Make sure the error file can be written, before any work is done.

    Parameters
    ----------
    path
        The ``-e`` file, if any.
    csv_path
        The ``-c`` job file, if any: the error file must not be it, as writing the errors
        would replace the jobs.

    Raises
    ------
    UsageError
        Naming the file and why not.
    """
    if not path:
        return
    target = Path(path)
    if csv_path and _same_file(target, Path(csv_path)):
        raise UsageError(
            f"Error: the error file {path} is the csv job file {csv_path}; writing the errors "
            "would replace its jobs: name another error file"
        )
    if target.is_dir():
        raise UsageError(f"Error: the error file {path} is a directory")
    existed = target.exists()
    try:
        with target.open("a"):
            pass
    except OSError as exc:
        raise UsageError(
            f"Error: cannot write the error file {path}: {exc.strerror or exc}"
        ) from None
    if not existed:
        target.unlink(missing_ok=True)


def _same_file(first: Path, second: Path) -> bool:
    """Whether two names are one file: by device and inode when both exist (a hard or
    symbolic link, ``./`` or not), else by their resolved paths."""
    try:
        return os.path.samefile(first, second)
    except OSError:  # one does not exist (yet), or cannot be looked at
        pass
    try:
        return first.resolve() == second.resolve()
    except (OSError, RuntimeError):  # a symbolic link loop (RuntimeError before Python 3.13)
        return False


def _error_result(message: str) -> str:
    """An error file ``result``: ``Error: <message>``, as the guide shows it (a console
    message tagged ``[ERROR]``, the old client's way, loses the tag rather than doubling it)."""
    text = message.strip().removeprefix("[ERROR] ")
    return text if text.startswith("Error") else f"Error: {text}"


def run(
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run mwa_client with these arguments; returns the exit code.

    Everything goes to ``stdout`` (default ``sys.stdout``), as the guide's client prints
    it, except under ``-l`` into a file or a pipe: stdout then holds only the listing, for
    scripts, and the status lines (version, connecting, errors, "finished successfully")
    go to ``stderr`` (default ``sys.stderr``).
    """
    env = os.environ if environ is None else environ
    out = stdout or sys.stdout
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # A usage error: the error file is written all the same (scripts always read it).
        message = getattr(parser, "error_message", None)
        errfile, csvfile = _error_and_csv_files_of(argv)
        if exc.code not in (0, None) and message and errfile:
            # Not over the job file (-e and -c naming one file), nor anywhere it cannot go.
            with contextlib.suppress(OSError, UsageError):
                _check_error_file(errfile, csvfile)
                _write_error_file(errfile, [JobError(None, None, f"Error: {message}")])
        raise
    listing_for_a_script = args.list_only and not out.isatty()
    reporter = Reporter(out, args.verbose, (stderr or sys.stderr) if listing_for_a_script else None)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="mwa_client: %(message)s", stream=sys.stderr,
    )  # fmt: skip
    errors: list[JobError] = []
    reporter.say(VERSION_STRING)
    try:
        _check_error_file(args.errfile, args.csvfile)
    except UsageError as exc:
        reporter.say(str(exc))
        return EXIT_OTHER
    try:
        code = _run(args, env, reporter, errors)
    except CsvJobError as exc:
        message = f"Error: {args.csvfile} {exc}"
        code = EXIT_CSV
    except CsvFileUnreadable as exc:
        message, code = str(exc), EXIT_CSV
    except AsvoError as exc:
        # What failed and the server's own message (its JSON "error"), not the raw reply.
        message = f"Error: {exc.message}"
        code = EXIT_HTTP if exc.status_code is not None else EXIT_OTHER
    except (UsageError, OSError) as exc:
        message, code = str(exc), EXIT_OTHER
    except KeyboardInterrupt:
        message, code = "Interrupted! Exiting...", EXIT_OTHER
    else:
        message = ""
    if code not in (EXIT_OK, EXIT_JOB_ERRORS):
        reporter.say(message)
        result = _error_result(message)
    try:
        if code in (EXIT_OK, EXIT_JOB_ERRORS):
            _write_error_file(args.errfile, errors)
        else:
            _write_error_file(args.errfile, [*errors, JobError(None, None, result)])
    except OSError as exc:  # checked at the start, but it may have gone since (disk full...)
        reporter.say(f"Error: cannot write the error file {args.errfile}: {exc.strerror or exc}")
        return code if code != EXIT_OK else EXIT_OTHER
    if code not in (EXIT_OK, EXIT_JOB_ERRORS):
        return code
    if errors:
        reporter.say("There were errors:")
        for error in errors:
            job_id = "" if error.job_id is None else error.job_id  # a refused job has none
            reporter.say(f"Job id: {job_id} Obs id: {error.obs_id}: {error.result}")
        return EXIT_JOB_ERRORS
    reporter.say("mwa_client finished successfully")
    return EXIT_OK


def _run(
    args: argparse.Namespace, env: Mapping[str, str], reporter: Reporter, errors: list[JobError]
) -> int:
    download_only = args.download_job_id is not None
    full = not (args.submit_only or args.list_only or download_only)
    if args.csvfile is None and (args.submit_only or full):
        raise UsageError("Error: csvfile not specified (-c FILE)")
    outdir = Path(args.outdir or ".")
    # Only the modes that download use -d: -s and -l ignore it, as their help says.
    downloads_anything = full or download_only
    if downloads_anything and args.outdir and not outdir.is_dir():
        raise UsageError(f"Error: Output directory {args.outdir} is invalid.")
    if downloads_anything and not os.access(outdir, os.W_OK | os.X_OK):
        # Said before any job is submitted: it failed only once the jobs had completed.
        raise UsageError(f"Error: Output directory {outdir} is not writable.")
    for variable in ("ASVO_USER", "ASVO_PASS"):
        if env.get(variable):
            reporter.say(OBSOLETE_VARIABLE.format(variable))
    api_key = env.get("MWA_ASVO_API_KEY", "")
    if not api_key:
        raise UsageError(API_KEY_MISSING)

    jobs_to_submit: list[CsvJob] = []
    if args.submit_only or full:
        try:
            data = Path(args.csvfile).read_bytes()
        except OSError as exc:
            raise CsvFileUnreadable(
                f"Error: cannot read the csv file {args.csvfile}: {exc.strerror or exc}"
            ) from None
        text = decode_job_csv(data)
        jobs_to_submit = parse_job_csv(text, allow_resubmit=args.allow_resubmit)
        if not jobs_to_submit:
            raise UsageError(f"Error: No jobs to submit in {args.csvfile}")

    base_url = base_url_from_environment(env)
    reporter.say(f"Connecting to MWA ASVO ({base_url})...")
    session = Session.login(api_key, base_url=base_url, verify=verify_from_environment(env))
    with session:
        reporter.say("Connected to MWA ASVO")
        if args.list_only:
            _list_jobs(session, reporter)
            return EXIT_OK
        if args.submit_only:
            _submit_jobs(session, jobs_to_submit, reporter, errors, follow_duplicates=False)
            return EXIT_OK
        downloads = Downloads(session, outdir, args.parallel, reporter, errors)
        try:
            if download_only:
                for job in _ready_jobs(session, args.download_job_id, outdir, reporter, errors):
                    downloads.start(job)
            else:
                tracked = _submit_jobs(
                    session, jobs_to_submit, reporter, errors, follow_duplicates=True
                )
                _follow(session, tracked, downloads, reporter, errors)
            downloads.wait()
        finally:
            # On an error or Ctrl-C the downloads are abandoned, not awaited.
            reporter.stop_downloads()
    return EXIT_OK


def main() -> None:
    """Console-script entry point."""
    code = run()
    if any(thread.daemon and thread.is_alive() for thread in threading.enumerate()):
        # Downloads abandoned by Ctrl-C or an error: daemon threads blocked on the network,
        # their .part files complete up to the last block written. Leave at once rather
        # than let the interpreter's shutdown (atexit, logging, stdio) meet them.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe (| head)
                stream.flush()
        os._exit(code)
    sys.exit(code)
