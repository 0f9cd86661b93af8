"""Python API of the ASVO data-job service (what ``mwa_client`` is built on).

It speaks the protocol of manta-ray-client's ``mantaray.api`` (specs/asvo.md):
HTTP Basic login with the client version and the API key, the ``MWA_JOB_COOKIE``
session cookie, form-encoded submissions, ``get_jobs`` change-feed envelopes and
the ``/api/job_results`` websocket. It adds what that API lacks: typed results,
exceptions carrying the server's ``error_code`` and ``job_id``, a ``watch()``
iterator that falls back to polling when the websocket is unavailable, and
downloads that resume with HTTP ``Range`` and verify each file's checksum (BLAKE3,
or SHA-1 from servers that publish only that).

Example
-------
>>> session = Session.login("my-api-key", host="asvo.example.org")  # doctest: +SKIP
>>> job_id = session.submit_download_job(1104585920, download_type="vis_meta")  # doctest: +SKIP
>>> for update in session.watch():  # doctest: +SKIP
...     if update.job.id == job_id and update.job.state == "completed":
...         session.download_product(update.job, "out")
...         break
"""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import ssl
import stat
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urljoin, urlsplit

import blake3
import httpx

from observatory import __version__

if TYPE_CHECKING:
    import websockets.sync.client

log = logging.getLogger(__name__)

#: TLS verification: on (the system's CAs), off, or the CA bundle files to trust.
Verify = bool | str | tuple[str, ...]

#: What we send as the Basic-auth user name. The server checks it for compatibility;
#: we speak manta-ray-client 2.0's protocol, so we identify as that protocol version.
CLIENT_VERSION = "mantaray-clientv2.0"
USER_AGENT = f"observatory-mwa_client/{__version__}"

#: ``row.job_type`` -> description (mwa_client's names, plus the newer job types).
JOB_TYPE_NAMES = {
    0: "conversion",
    1: "download visibilities",
    2: "download metadata",
    3: "download voltage",
    4: "cancel job",
    5: "download beamformer",
    6: "imaging",
}
#: States after which a job never changes again (except to be deleted).
TERMINAL_STATES = frozenset({"completed", "error", "cancelled", "expired"})
#: Job states as users know them from the ASVO web site and the clients.
STATE_LABELS = {
    "queued": "Queued",
    "waitcal": "Waiting for calibration",
    "staging": "Staging",
    "staged": "Staged",
    "downloading": "Retrieving Files from Archive",
    "preparing": "Preparing",
    "preprocessing": "Preprocessing",
    "imaging": "Imaging",
    "delivering": "Delivering",
    "completed": "Ready",
    "error": "Error",
    "expired": "Expired",
    "cancelled": "Cancelled",
}

#: Bytes read from the network or the disk at a time.
CHUNK_BYTES = 1024 * 1024
#: A 206 answer's first byte: ``Content-Range: bytes START-END/SIZE``.
_CONTENT_RANGE_START = re.compile(r"bytes (\d+)-\d+/(?:\d+|\*)$")
#: Attempts per file for failures other than an unreachable server (a checksum mismatch
#: restarts the file, an answer the client cannot use is asked again). A server that cannot
#: be reached (restarting, a network outage) is waited out as ``watch`` waits it out.
DOWNLOAD_ATTEMPTS = 3
#: Seconds to connect and upgrade the job-notification websocket.
WEBSOCKET_OPEN_TIMEOUT_S = 30.0
#: ``watch`` and downloads: how long an unreachable server is waited for before giving up,
#: and the first and longest wait between attempts meanwhile (doubling from the first).
WATCH_OUTAGE_LIMIT_S = 600.0
WATCH_BACKOFF_FIRST_S = 1.0
WATCH_BACKOFF_MAX_S = 60.0
#: HTTP answers that mean the server is restarting or its proxy cannot reach it: waited out.
OUTAGE_STATUS_CODES = frozenset({502, 503, 504})
#: ``errno`` values of a network that cannot reach the server (not ``ConnectionError``s).
_NETWORK_ERRNOS = frozenset({
    errno.ENETDOWN, errno.ENETUNREACH, errno.ENETRESET, errno.EHOSTDOWN, errno.EHOSTUNREACH,
})  # fmt: skip


class AsvoError(Exception):
    """The server refused a request, or a request or download failed.

    Attributes
    ----------
    status_code
        HTTP status of the reply (None when no reply came).
    error_code
        The server's ``error_code`` (0 invalid request, 2 duplicate job), if any.
    job_id
        The job the error is about, if known (for a duplicate: the existing job).
    response_text
        The body of the reply, as the server sent it.
    detail
        The server's own message (its ``error``), or the whole message.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error_code: int | None = None,
        job_id: int | None = None,
        response_text: str = "",
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail or message
        self.status_code = status_code
        self.error_code = error_code
        self.job_id = job_id
        self.response_text = response_text


class ChecksumError(AsvoError):
    """A downloaded file's checksum does not match the one the server published."""


@dataclass(frozen=True)
class ProductFile:
    """One file of a completed job's product.

    ``type`` is the delivery: ``acacia`` files have a ``url`` (a signed download
    link), ``size`` and ``sha1`` (and ``blake3`` from our server); ``scratch`` and
    ``dug`` files have a ``path`` on the facility's file system.
    """

    type: str
    size_bytes: int
    url: str | None = None
    sha1: str | None = None
    path: str | None = None
    blake3: str | None = None

    @property
    def checksum(self) -> tuple[str, str] | None:
        """``(algorithm, lowercase hex digest)`` a download is verified against.

        BLAKE3 where the server publishes it: it costs a third of SHA-1's CPU time,
        which on a busy node is the difference between verifying at the network's
        speed or below it. SHA-1 otherwise (the MWA's own servers publish only that).
        """
        if self.blake3:
            return "blake3", self.blake3.lower()
        if self.sha1:
            return "sha1", self.sha1.lower()
        return None

    @property
    def name(self) -> str:
        """The local file or directory name: the last segment of the URL path or of the path."""
        if self.url:
            return os.path.basename(urlsplit(self.url).path)
        return os.path.basename((self.path or "").rstrip("/"))


@dataclass(frozen=True)
class Job:
    """A job as ``get_jobs`` and the websocket describe it."""

    id: int
    obs_id: int
    job_type: int
    state: str
    params: Mapping[str, Any] = field(default_factory=dict)
    error_text: str | None = None
    created: str | None = None
    started: str | None = None
    completed: str | None = None
    files: tuple[ProductFile, ...] = ()

    @property
    def type_name(self) -> str:
        """The job type in words (``conversion``, ``download visibilities``, ...)."""
        return JOB_TYPE_NAMES.get(self.job_type, f"type {self.job_type}")

    @property
    def size_bytes(self) -> int:
        """Total size of the product's files (0 before completion)."""
        return sum(f.size_bytes for f in self.files)

    @property
    def state_label(self) -> str:
        """The state as users know it; an error carries its text."""
        if self.state == "error":
            return f"Error: {self.error_text}"
        return STATE_LABELS.get(self.state, self.state)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Job:
        """Read one ``row`` of a get_jobs or websocket envelope."""
        params = row.get("job_params") or {}
        product = row.get("product") or {}
        files = tuple(
            ProductFile(
                type=str(f.get("type")),
                size_bytes=int(f.get("size") or 0),
                url=f.get("url"),
                sha1=f.get("sha1"),
                path=f.get("path"),
                blake3=f.get("blake3"),
            )
            for f in product.get("files") or ()
        )
        return cls(
            id=int(row["id"]),
            obs_id=int(params.get("obs_id") or 0),
            job_type=int(row.get("job_type", -1)),
            state=str(row["job_state"]),
            params=params,
            error_text=row.get("error_text"),
            created=row.get("created"),
            started=row.get("started"),
            completed=row.get("completed"),
            files=files,
        )


@dataclass(frozen=True)
class JobUpdate:
    """One change of a job: ``action`` is ``DELETE`` for a removed job, else ``UPDATE``."""

    action: str
    job: Job


#: Called while a file downloads: (file, bytes on disk, total bytes).
ProgressCallback = Callable[[ProductFile, int, int], None]


@dataclass(frozen=True)
class DownloadResult:
    """What ``download_product`` did with one file of a product."""

    file: ProductFile
    local_path: Path | None
    #: ``downloaded``, ``resumed``, ``verified`` (already complete), ``copied``
    #: (scratch/dug copied from a local path), ``exists`` (copied before, and the
    #: product's files are in the copy with their names and sizes) or ``remote``
    #: (scratch/dug path not on this machine).
    outcome: str
    #: Bytes fetched (or copied) for the file as it now is (not those of a copy that
    #: failed verification).
    bytes_transferred: int = 0
    #: Whether a file on disk failed verification and was fetched again, or a copied
    #: directory on disk lacked some of the product's files (or had them with other
    #: sizes) and those were copied again.
    redownloaded: bool = False
    #: scratch/dug: how many of the product's files were copied (all of them for a first
    #: copy; for an earlier copy, those that were missing or differed).
    files_copied: int = 0


def base_url_from_environment(environ: Mapping[str, str] | None = None) -> str:
    """``{http|https}://{MWA_ASVO_HOST}:{MWA_ASVO_PORT}`` as mwa_client builds it.

    Defaults: ``asvo.mwatelescope.org``, port 443, ``MWA_ASVO_HTTPS=1`` (any other
    value means plain http). ``MWA_ASVO_HOST`` may also be written as giant-squid
    takes it, ``https://host:port`` (the scheme and port then come from it; the port
    defaults to the scheme's), or as ``host:port``. An IPv6 address is written bare
    (``::1``, its port then in ``MWA_ASVO_PORT``: ``::1:8000`` is an address too) or
    in brackets (``[::1]:8000``, ``https://[::1]:8000``).

    Raises
    ------
    AsvoError
        For a value that is none of these, one with a user name or password (the API
        key goes in ``MWA_ASVO_API_KEY``), a port that is not 1 to 65535, or a port or
        scheme that contradicts ``MWA_ASVO_PORT`` or ``MWA_ASVO_HTTPS``.
    """
    env = os.environ if environ is None else environ
    host = env.get("MWA_ASVO_HOST", "asvo.mwatelescope.org").strip()
    # Set but empty (``export MWA_ASVO_PORT=``, a common way to clear one) is unset.
    port_text = env.get("MWA_ASVO_PORT", "").strip() or None
    https_text = env.get("MWA_ASVO_HTTPS", "").strip() or None
    if not host:
        raise AsvoError("MWA_ASVO_HOST is set but empty")
    env_port = _port_number(port_text)
    if port_text is not None and env_port is None:
        raise AsvoError(f"MWA_ASVO_PORT must be a port number (1 to 65535), not {port_text!r}")
    forms = "a host name, host:port, [IPv6 address]:port or http[s]://host[:port]"
    with_scheme = "://" in host
    authority = f"[{host}]" if not with_scheme and _is_ipv6_address(host) else host
    try:
        parts = urlsplit(authority if with_scheme else f"//{authority}")
    except ValueError:  # unbalanced brackets, or brackets round what is no IPv6 address
        raise AsvoError(f"MWA_ASVO_HOST={host!r} is not {forms}") from None
    if "@" in parts.netloc:
        # Named without what precedes the @: it may be a password.
        raise AsvoError(
            f"MWA_ASVO_HOST (...@{parts.netloc.rpartition('@')[2]}) must not carry a user name "
            "or password: the server is reached with the API key of MWA_ASVO_API_KEY"
        )
    # The port as written (urlsplit's takes "h:0" and "h:" for ports, and a bare IPv6
    # address's last group for one).
    _, bracket, after = parts.netloc.rpartition("]")
    if bracket:
        if after and not after.startswith(":"):
            raise AsvoError(f"MWA_ASVO_HOST={host!r} is not {forms}")
        url_port_text = after[1:] if after else None
    elif parts.netloc.count(":") > 1:
        raise AsvoError(
            f"MWA_ASVO_HOST={host!r} is not {forms} (with a port or a scheme, an IPv6 "
            "address goes in brackets)"
        )
    else:
        url_port_text = parts.netloc.partition(":")[2] if ":" in parts.netloc else None
    url_port = _port_number(url_port_text)
    if url_port_text is not None and url_port is None:
        raise AsvoError(f"MWA_ASVO_HOST={host!r}: its port is not a port number (1 to 65535)")
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise AsvoError(f"MWA_ASVO_HOST={host!r} is not {forms}")
    if with_scheme:
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise AsvoError(f"MWA_ASVO_HOST={host!r}: the scheme must be http or https")
        if https_text is not None and (https_text == "1") != (scheme == "https"):
            raise AsvoError(
                f"MWA_ASVO_HOST={host!r} contradicts MWA_ASVO_HTTPS={https_text!r} "
                "(1 https, anything else http); give one"
            )
    else:
        scheme = "https" if (https_text or "1") == "1" else "http"
    if url_port is not None and env_port is not None and env_port != url_port:
        raise AsvoError(f"MWA_ASVO_HOST={host!r} contradicts MWA_ASVO_PORT={port_text!r}; give one")
    if url_port is not None:
        port = url_port
    elif env_port is not None:
        port = env_port
    else:  # mwa_client's default port is 443 whatever the scheme; a URL's is its scheme's
        port = (443 if scheme == "https" else 80) if with_scheme else 443
    name = parts.hostname
    return f"{scheme}://{f'[{name}]' if ':' in name else name}:{port}"


def _port_number(text: str | None) -> int | None:
    """The TCP port ``text`` gives (1 to 65535); None for none, or anything else."""
    # ASCII digits only: int() also reads other scripts' digits.
    if text is None or not (text.isascii() and text.isdigit()):
        return None
    port = int(text)
    return port if 0 < port < 65536 else None


def _is_ipv6_address(text: str) -> bool:
    """Whether ``text`` is a bare IPv6 address (``::1``)."""
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _duration_text(seconds: float) -> str:
    """``45 seconds`` or, from two minutes, ``10 minutes``."""
    return f"{seconds:.0f} seconds" if seconds < 120 else f"{seconds / 60:.0f} minutes"


class _Outage:
    """A run of failed attempts to reach the server, and how long it is waited out.

    One policy for the job list (``watch``) and downloads: a server that is restarting, or
    a network outage, is asked again after ``WATCH_BACKOFF_FIRST_S``, then at doubling
    intervals of up to ``WATCH_BACKOFF_MAX_S``, until the caller's limit has passed since
    the first failure of the run.

    One per session, shared by the job list and every download (threads): a server that
    is gone is given up on once the limit has passed since it first failed to answer,
    whichever request saw that, not a limit per file.
    """

    def __init__(self) -> None:
        self.since_s: float | None = None
        self.failures = 0
        self._lock = threading.Lock()

    def failed(self, limit_s: float) -> float | None:
        """Count a failure: the seconds to wait before asking again, or None to give up.

        Returns
        -------
        float or None
            None once the server has been unreachable for ``limit_s``.
        """
        with self._lock:
            now_s = time.monotonic()
            if self.since_s is None:
                self.since_s = now_s
            self.failures += 1
            if now_s - self.since_s >= limit_s:
                return None
            return min(WATCH_BACKOFF_MAX_S, WATCH_BACKOFF_FIRST_S * 2 ** (self.failures - 1))

    @property
    def lasted_s(self) -> float:
        """Seconds since the first failure of the run (0 when there is none)."""
        return 0.0 if self.since_s is None else time.monotonic() - self.since_s

    def ended(self) -> bool:
        """The server answered: forget the run of failures; returns whether there was one."""
        with self._lock:
            was = self.failures > 0
            self.since_s, self.failures = None, 0
            return was


def _server_unreachable(exc: BaseException) -> bool:
    """Whether a download failed because the server could not be reached or the connection
    broke (refused, reset, timed out, a network down; 502/503/504 from a restarting server
    or its proxy): what waiting can mend, unlike a refusal or a wrong answer."""
    if isinstance(exc, AsvoError):
        return exc.status_code in OUTAGE_STATUS_CODES
    if isinstance(exc, socket.gaierror):  # a name that does not resolve is no outage; a
        return exc.errno == socket.EAI_AGAIN  # resolver that cannot be reached is
    # A connection cut mid-body or mid-TLS record; not a TLS setup that fails (a certificate,
    # a protocol mismatch): waiting would not mend that.
    broken = (http.client.IncompleteRead, ssl.SSLEOFError, ssl.SSLZeroReturnError,
              ssl.SSLSyscallError)  # fmt: skip
    if isinstance(exc, (ConnectionError, TimeoutError, *broken)):
        return True
    return isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS


def _raise_for_reply(reply: httpx.Response, what: str) -> None:
    """Raise an ``AsvoError`` with the server's message and codes for a non-2xx reply."""
    if not reply.is_success:
        raise _reply_error(reply.status_code, reply.reason_phrase, reply.text, what)


def _reply_error(status: int, reason: str, text: str, what: str) -> AsvoError:
    """The ``AsvoError`` for an HTTP error reply (its JSON ``error``, ``error_code``, ``job_id``)."""
    message, error_code, job_id = text.strip() or reason, None, None
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        message = str(body.get("error") or body.get("detail") or message)
        error_code = body.get("error_code")
        job_id = body.get("job_id")
    return AsvoError(
        f"{what}: HTTP {status}: {message}",
        status_code=status,
        error_code=error_code if isinstance(error_code, int) else None,
        job_id=job_id if isinstance(job_id, int) else None,
        response_text=text,
        detail=message,
    )


def _new_digest(algorithm: str) -> Any:
    """A fresh hash object for a :attr:`ProductFile.checksum` algorithm."""
    return blake3.blake3() if algorithm == "blake3" else hashlib.new(algorithm)


def _digest_of_file(path: Path, algorithm: str, length: int | None = None) -> Any:
    """The hash object of the first ``length`` bytes of ``path`` (default all)."""
    digest = _new_digest(algorithm)
    remaining = path.stat().st_size if length is None else length
    with path.open("rb") as stream:
        while remaining > 0:
            block = stream.read(min(CHUNK_BYTES, remaining))
            if not block:
                break
            digest.update(block)
            remaining -= len(block)
    return digest


class Session:
    """A logged-in connection to an ASVO server.

    Use ``Session.login`` (or ``Session.from_environment``) rather than the constructor.
    """

    def __init__(self, base_url: str, client: httpx.Client, *, verify: Verify) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = client
        self._verify = verify
        # The server's absence, as the job list and every download of this session see it.
        self._outage = _Outage()

    # -- connection ---------------------------------------------------------------

    @classmethod
    def login(
        cls,
        api_key: str,
        *,
        host: str = "asvo.mwatelescope.org",
        port: int = 443,
        https: bool = True,
        base_url: str | None = None,
        verify: Verify = True,
        timeout_s: float = 60.0,
    ) -> Session:
        """Log in with an API key (from the ASVO web site's profile page).

        Parameters
        ----------
        api_key
            The user's API key.
        host, port, https
            Where the server is (ignored when ``base_url`` is given).
        base_url
            ``http[s]://host:port`` of the server.
        verify
            Check the server's TLS certificate (True), not (False), or against the
            CA bundle at this path.
        timeout_s
            Timeout of each API call.

        Raises
        ------
        AsvoError
            When the server refuses the key or the client version, or cannot be reached.
        """
        if not api_key:
            raise AsvoError("An API key is required")
        authority = f"[{host}]" if _is_ipv6_address(host) else host
        url = base_url or f"{'https' if https else 'http'}://{authority}:{port}"
        # A TLS context costs ~35 ms (the system's CA certificates): only for https.
        tls = _tls_context(verify) if urlsplit(url).scheme == "https" else False
        client = httpx.Client(
            base_url=url, verify=tls, timeout=timeout_s, headers={"User-Agent": USER_AGENT}
        )
        session = cls(url, client, verify=verify)
        try:
            reply = client.post("/api/api_login", auth=(CLIENT_VERSION, api_key))
        except httpx.HTTPError as exc:
            client.close()
            if (refusal := _certificate_refusal(exc)) is not None:
                raise AsvoError(_certificate_message(url, refusal)) from exc
            parts = urlsplit(url)
            proxy = _proxy_for(parts.scheme, parts.hostname or "")
            # Through a proxy the failure may be the proxy's: "Connection refused" alone
            # sent people looking at the server.
            via = "" if proxy is None else (
                f" through the proxy {proxy.host}:{proxy.port} (from {parts.scheme}_proxy)"
            )  # fmt: skip
            raise AsvoError(f"Cannot reach the MWA ASVO server at {url}{via}: {exc}") from exc
        if not reply.is_success:
            client.close()
        _raise_for_reply(reply, "Login failed")
        if "MWA_JOB_COOKIE" not in client.cookies:
            client.close()
            raise AsvoError(f"The server at {url} did not start a session (no MWA_JOB_COOKIE)")
        return session

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Session:
        """Log in as mwa_client does: ``MWA_ASVO_API_KEY``, ``MWA_ASVO_HOST``/``PORT``/``HTTPS``.

        ``SSL_VERIFY=0`` turns certificate checks off; otherwise they are on, with the
        CA bundle of ``SSL_CERT_FILE`` or ``REQUESTS_CA_BUNDLE`` when one is set.
        """
        env = os.environ if environ is None else environ
        return cls.login(
            env.get("MWA_ASVO_API_KEY", ""),
            base_url=base_url_from_environment(env),
            verify=verify_from_environment(env),
        )

    def close(self) -> None:
        """Close the connection."""
        self._client.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- jobs -----------------------------------------------------------------------

    def submit(self, endpoint: str, params: Mapping[str, Any]) -> int:
        """Post a job to ``/api/<endpoint>`` with form fields; returns the new job id.

        Raises
        ------
        AsvoError
            With ``error_code`` 0 for an invalid request, 2 (and ``job_id``) when the
            same job is already queued, running or complete.
        """
        form = {key: _form_value(value) for key, value in params.items() if value is not None}
        try:
            reply = self._client.post(f"/api/{endpoint}", data=form)
        except httpx.HTTPError as exc:
            raise AsvoError(f"Could not submit the job: {exc}") from exc
        _raise_for_reply(reply, "Job refused")
        return int(reply.json()["job_id"])

    def submit_conversion_job(
        self,
        obs_id: int,
        *,
        delivery: str = "acacia",
        allow_resubmit: bool = False,
        **options: Any,
    ) -> int:
        """Submit a conversion (preprocessing) job; ``options`` are the Birli keys.

        For example ``avg_time_res=10, avg_freq_res=80, output="ms", no_rfi=True``.
        """
        return self.submit(
            "conversion_job",
            {"obs_id": obs_id, "delivery": delivery, "allow_resubmit": allow_resubmit, **options},
        )

    def submit_download_job(
        self,
        obs_id: int,
        *,
        download_type: str = "vis",
        delivery: str = "acacia",
        allow_resubmit: bool = False,
    ) -> int:
        """Submit a raw visibility (``vis``) or metadata (``vis_meta``) download."""
        return self.submit(
            "download_vis_job",
            {"obs_id": obs_id, "download_type": download_type, "delivery": delivery,
             "allow_resubmit": allow_resubmit},
        )  # fmt: skip

    def submit_voltage_job(
        self,
        obs_id: int,
        *,
        offset_s: int,
        duration_s: int,
        from_channel: int | None = None,
        to_channel: int | None = None,
        delivery: str = "scratch",
        allow_resubmit: bool = False,
    ) -> int:
        """Submit a voltage download of ``duration_s`` from ``offset_s`` after the start.

        ``from_channel`` / ``to_channel`` (receiver channels, inclusive; both, or
        neither for every channel) limit it to a channel range.

        Raises
        ------
        ValueError
            When only one of ``from_channel`` and ``to_channel`` is given (the server
            would refuse it, naming the other by its form label).
        """
        if (from_channel is None) != (to_channel is None):
            raise ValueError(
                "from_channel and to_channel go together: give both (the same channel twice "
                "for one channel), or neither for every channel"
            )
        params: dict[str, Any] = {
            "obs_id": obs_id, "download_type": "volt", "offset": offset_s,
            "duration": duration_s, "delivery": delivery, "allow_resubmit": allow_resubmit,
        }  # fmt: skip
        if from_channel is not None or to_channel is not None:
            params.update(channel_range=True, from_channel=from_channel, to_channel=to_channel)
        return self.submit("voltage_job", params)

    def get_jobs(self) -> list[Job]:
        """Every job of the user, newest last."""
        try:
            reply = self._client.get("/api/get_jobs")
        except httpx.HTTPError as exc:
            raise AsvoError(f"Could not obtain the jobs list from the server: {exc}") from exc
        _raise_for_reply(reply, "Could not obtain the jobs list from the server")
        return [Job.from_row(envelope["row"]) for envelope in reply.json()]

    def get_job(self, job_id: int) -> Job | None:
        """One job of the user, or None if there is no such job."""
        return next((job for job in self.get_jobs() if job.id == job_id), None)

    def cancel_job(self, job_id: int) -> None:
        """Cancel a job that has not finished.

        Raises
        ------
        AsvoError
            404 for an unknown job, 400 for one that already finished.
        """
        try:
            reply = self._client.get("/api/cancel_job", params={"job_id": str(job_id)})
        except httpx.HTTPError as exc:
            raise AsvoError(f"Could not cancel job {job_id}: {exc}") from exc
        _raise_for_reply(reply, f"Could not cancel job {job_id}")

    # -- watching -------------------------------------------------------------------

    def watch(
        self,
        *,
        poll_interval_s: float = 10.0,
        resync_interval_s: float = 60.0,
        outage_limit_s: float = WATCH_OUTAGE_LIMIT_S,
        on_connected: Callable[[], None] | None = None,
    ) -> Iterator[JobUpdate]:
        """Job changes as they happen, for as long as the caller iterates.

        Updates come over the ``/api/job_results`` websocket (the server first sends
        every current job, then each change). When the socket cannot be opened or
        drops, this polls ``get_jobs`` every ``poll_interval_s`` and yields the jobs
        that changed, trying the socket again now and then; while the socket is
        quiet for ``resync_interval_s``, it also checks ``get_jobs`` so that nothing
        is missed. An unchanged job is never yielded twice in a row. ``on_connected`` is
        called each time the websocket opens (mwa_client says so, as the MWA's does).

        A server that cannot be reached (or answers 502, 503 or 504: restarting, or
        behind a proxy) is asked again, at growing intervals up to
        ``WATCH_BACKOFF_MAX_S``; the jobs go on running on the server meanwhile.

        Raises
        ------
        AsvoError
            When the server has been unreachable for ``outage_limit_s``, or refuses
            the request (e.g. 401 when the session is no longer valid).
        """
        last: dict[int, Job] = {}
        outage = self._outage
        backoff_s = 0.0  # the wait before asking again after the last failure

        def poll() -> list[Job] | None:
            """``get_jobs``, or None while the server is unreachable (within the limit)."""
            nonlocal backoff_s
            try:
                jobs = self.get_jobs()
            except AsvoError as exc:
                if exc.status_code is not None and exc.status_code not in OUTAGE_STATUS_CODES:
                    raise
                wait_s = outage.failed(outage_limit_s)
                if wait_s is None:
                    raise AsvoError(
                        f"The MWA ASVO server at {self.base_url} has not answered for "
                        f"{_duration_text(outage.lasted_s)} ({exc.message}); giving up. Your "
                        "jobs carry on on the server: download them later with -w all.",
                        status_code=None,
                    ) from exc
                backoff_s = wait_s
                if outage.failures == 1:
                    log.warning("%s; trying again (the jobs carry on on the server)", exc)
                return None
            if outage.ended():
                log.warning("the server answers again")
            return jobs

        def changes(jobs: list[Job]) -> Iterator[JobUpdate]:
            current = {job.id: job for job in jobs}
            for job_id in sorted(set(last) - set(current)):
                yield JobUpdate("DELETE", last.pop(job_id))
            for job in jobs:
                if last.get(job.id) != job:
                    last[job.id] = job
                    yield JobUpdate("UPDATE", job)

        # Imported here: only watching needs it, and each import delays every run.
        import websockets.exceptions

        retry_socket_at = 0.0
        while True:
            if time.monotonic() >= retry_socket_at:
                try:
                    with self._open_websocket() as socket:
                        log.info("watching jobs over the websocket")
                        if on_connected is not None:
                            on_connected()
                        while True:
                            try:
                                message = socket.recv(timeout=resync_interval_s)
                            except TimeoutError:
                                if (jobs := poll()) is not None:
                                    yield from changes(jobs)
                                continue
                            if not message:
                                raise websockets.exceptions.ConnectionClosedError(None, None)
                            envelope = json.loads(message)
                            job = Job.from_row(envelope["row"])
                            if envelope.get("action") == "DELETE":
                                last.pop(job.id, None)
                                yield JobUpdate("DELETE", job)
                            elif last.get(job.id) != job:
                                last[job.id] = job
                                yield JobUpdate("UPDATE", job)
                except (OSError, websockets.exceptions.WebSocketException, ValueError) as exc:
                    log.warning("job notifications unavailable (%s); polling instead", exc)
                    retry_socket_at = time.monotonic() + max(30.0, 3 * poll_interval_s)
            if (jobs := poll()) is not None:
                yield from changes(jobs)
                time.sleep(poll_interval_s)
            else:  # unreachable: try again sooner at first, then less and less often
                time.sleep(backoff_s)

    def _open_websocket(self) -> websockets.sync.client.ClientConnection:
        """The ``/api/job_results`` websocket, over a socket this client opened itself.

        The socket (TLS included) has a timeout until the upgrade is done: if the
        upgrade fails, the websockets library closes the socket and waits for its
        reader thread, which a TLS read with no timeout can block for ever.
        """
        import websockets.sync.client

        parts = urlsplit(self.base_url)
        secure = parts.scheme == "https"
        host = parts.hostname or "localhost"
        port = parts.port or (443 if secure else 80)
        cookie = self._client.cookies.get("MWA_JOB_COOKIE")
        # Through the proxy of the environment, as the API calls and downloads go: a
        # CONNECT tunnel (as browsers open websockets through a proxy).
        proxy = _proxy_for(parts.scheme, host)
        sock: socket.socket = socket.create_connection(
            proxy.address if proxy else (host, port), timeout=WEBSOCKET_OPEN_TIMEOUT_S
        )
        try:
            if proxy:
                _open_tunnel(sock, host, port, proxy.headers)
            if secure:
                sock = _tls_context(self._verify).wrap_socket(sock, server_hostname=host)
            connection = websockets.sync.client.connect(
                # The socket is already TLS: a ws:// URI keeps the library from wrapping it again.
                f"ws://{parts.netloc}/api/job_results",
                sock=sock,
                additional_headers={"Cookie": f"MWA_JOB_COOKIE={cookie}", "User-Agent": USER_AGENT},
                open_timeout=WEBSOCKET_OPEN_TIMEOUT_S,
                max_size=None,
            )
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)  # open: frames may be minutes apart
        return connection

    # -- downloads ------------------------------------------------------------------

    def download_product(
        self,
        job: Job,
        dest: str | os.PathLike[str],
        *,
        resume: bool = True,
        progress: ProgressCallback | None = None,
        outage_limit_s: float = WATCH_OUTAGE_LIMIT_S,
    ) -> list[DownloadResult]:
        """Fetch every file of a completed job's product into the directory ``dest``.

        Acacia files are downloaded by their signed URL into ``<name>.part`` and
        renamed to ``<name>`` only once their checksum (``ProductFile.checksum``)
        matches the server's. An interrupted download resumes from the ``.part`` file
        with an HTTP Range request (``resume=False`` starts again). A file already at ``<name>`` is
        verified and skipped; if it does not verify it is fetched again. A file another
        process is downloading into ``dest`` is waited for, then verified. Scratch and
        dug products are copied from their path when it exists on this machine.

        A server that cannot be reached or drops the connection (restarting, a network
        outage; or answering 502, 503 or 504) is waited out as ``watch`` waits it out:
        asked again at growing intervals for up to ``outage_limit_s`` seconds, each
        attempt resuming from the ``.part`` file.

        Raises
        ------
        AsvoError
            If the job is not completed, the server has been unreachable for
            ``outage_limit_s``, or a file cannot be fetched for another reason or never
            verifies (``ChecksumError``) after ``DOWNLOAD_ATTEMPTS`` attempts.
        """
        if job.state != "completed":
            raise AsvoError(
                f"Job {job.id} is not ready for download (it is {job.state})", job_id=job.id
            )
        dest_dir = Path(dest)
        results = []
        try:
            dest_dir.mkdir(parents=True, exist_ok=True)
            for file in job.files:
                if file.type == "acacia" or file.url:
                    _check_local_name(job, file)
                    with _downloading_alone(dest_dir / file.name):
                        results.append(self._download_file(
                            job, file, dest_dir, resume, progress, outage_limit_s
                        ))  # fmt: skip
                else:
                    results.append(_copy_delivered_directory(job, file, dest_dir, progress))
        except OSError as exc:  # the local disk (not writable, full): an AsvoError, as promised
            where = exc.filename or dest_dir
            raise AsvoError(
                f"Job {job.id}: cannot save its product in {dest_dir}: {exc.strerror or exc} "
                f"({where})",
                job_id=job.id,
            ) from exc
        return results

    def _download_file(
        self,
        job: Job,
        file: ProductFile,
        dest_dir: Path,
        resume: bool,
        progress: ProgressCallback | None,
        outage_limit_s: float,
    ) -> DownloadResult:
        checksum = file.checksum
        if not file.url or checksum is None:
            raise AsvoError(f"Job {job.id}: product file without url or sha1", job_id=job.id)
        algorithm, expected_digest = checksum
        target = dest_dir / file.name
        partial = target.with_name(target.name + ".part")
        redownloaded = False
        if target.exists() and not target.is_file():
            raise AsvoError(
                f"Job {job.id}: cannot save {file.name} in {dest_dir}: {target} is a directory "
                "(or another non-file) of that name; move it away and download again",
                job_id=job.id,
            )
        if target.exists():
            if (
                target.stat().st_size == file.size_bytes
                and _digest_of_file(target, algorithm).hexdigest() == expected_digest
            ):
                if progress:
                    progress(file, file.size_bytes, file.size_bytes)
                return DownloadResult(file, target, "verified")
            log.warning(
                "%s does not match the server's %s: downloading it again", target, algorithm
            )
            target.unlink()
            redownloaded = True
        if partial.is_symlink():
            # Never written through: a link planted in a shared directory (the name is
            # predictable) would have its target overwritten.
            log.warning("%s is a symbolic link, not a partial download: removed", partial)
            partial.unlink()
        elif partial.exists() and not partial.is_file():
            raise AsvoError(
                f"Job {job.id}: cannot download {file.name} in {dest_dir}: {partial} is a "
                "directory (or another non-file) of that name; move it away and download again",
                job_id=job.id,
            )
        if not resume:
            partial.unlink(missing_ok=True)

        # Counted as the bytes are written, so those of an attempt that fails part-way (kept
        # in the .part file, which the next attempt resumes) count too.
        fetched = _Fetched()
        resumed = False
        last_error: Exception | None = None
        # An unreachable server (restarting, a network outage) is waited out as the job list
        # is (``watch``), resuming from the .part file each time; only other failures count
        # against DOWNLOAD_ATTEMPTS.
        attempt = 0
        while attempt < DOWNLOAD_ATTEMPTS:
            had_bytes = partial.stat().st_size if partial.exists() else 0
            try:
                was_resumed, digest = self._fetch_into(file, algorithm, partial, progress, fetched)
                resumed = resumed or was_resumed
            except ssl.SSLCertVerificationError as exc:
                raise AsvoError(
                    f"Job {job.id}: download of {file.name} refused: "
                    + _certificate_message(file.url, exc),
                    job_id=job.id,
                ) from exc
            except (OSError, http.client.HTTPException, AsvoError) as exc:
                if isinstance(exc, AsvoError) and exc.status_code in (401, 403, 404, 410):
                    # No later run can resume it: the job's product is gone or refused.
                    kept = partial.stat().st_size if partial.exists() else 0
                    partial.unlink(missing_ok=True)
                    raise AsvoError(
                        f"Job {job.id}: {file.name} can no longer be downloaded ({exc.message}); "
                        "the product may have expired"
                        + (f" (deleted {partial.name}, {kept} bytes)" if kept else ""),
                        status_code=exc.status_code, job_id=job.id,
                    ) from exc  # fmt: skip
                last_error = exc
                if _server_unreachable(exc):
                    self._wait_out(job, file, partial, exc, had_bytes, outage_limit_s)
                    continue
                attempt += 1
                if attempt == DOWNLOAD_ATTEMPTS:  # no retry follows: say so, and do not wait
                    log.warning(
                        "download of %s interrupted (%s); attempt %d of %d, giving up "
                        "(the .part file is kept: the next run resumes it)",
                        file.name, exc, attempt, DOWNLOAD_ATTEMPTS,
                    )  # fmt: skip
                    break
                log.warning(
                    "download of %s interrupted (%s); attempt %d of %d, trying again",
                    file.name, exc, attempt, DOWNLOAD_ATTEMPTS,
                )  # fmt: skip
                time.sleep(min(2.0**attempt, 10.0) * 0.25)
                continue
            if self._outage.ended():
                log.warning("download of %s: the server answers again", file.name)
            attempt += 1
            if partial.stat().st_size == file.size_bytes and digest == expected_digest:
                os.replace(partial, target)
                outcome = "resumed" if resumed else "downloaded"
                return DownloadResult(file, target, outcome, fetched.bytes, redownloaded)
            last_error = ChecksumError(
                f"Job {job.id}: {file.name} has {algorithm} {digest}, "
                f"the server says {expected_digest}",
                job_id=job.id,
            )
            partial.unlink(missing_ok=True)
            if attempt == DOWNLOAD_ATTEMPTS:  # no download follows: do not promise one
                log.warning(
                    "%s; deleted it (attempt %d of %d, giving up)",
                    last_error, attempt, DOWNLOAD_ATTEMPTS,
                )  # fmt: skip
                break
            log.warning(
                "%s; deleting it and downloading again (attempt %d of %d)",
                last_error, attempt, DOWNLOAD_ATTEMPTS,
            )  # fmt: skip
            redownloaded = True
            # What is reported is the fetch that ends with the file: a fresh one now.
            fetched.bytes, resumed = 0, False
        if isinstance(last_error, ChecksumError):
            raise last_error
        raise AsvoError(
            f"Job {job.id}: download of {file.name} failed after {DOWNLOAD_ATTEMPTS} attempts: "
            f"{last_error}",
            job_id=job.id,
        )

    def _wait_out(
        self,
        job: Job,
        file: ProductFile,
        partial: Path,
        exc: Exception,
        had_bytes: int,
        limit_s: float,
    ) -> None:
        """Wait before the next attempt at a download the server's absence interrupted.

        An attempt that added to the ``.part`` file reached the server: the outage (if
        any) ended, and this failure starts a new one.

        Raises
        ------
        AsvoError
            Once the server has been unreachable for ``limit_s`` (the ``.part`` file is
            kept: a later run resumes it).
        """
        outage = self._outage
        if (partial.stat().st_size if partial.exists() else 0) > had_bytes:
            outage.ended()
        wait_s = outage.failed(limit_s)
        if wait_s is None:
            log.warning(
                "download of %s interrupted (%s); the server has not answered for %s, "
                "giving up (the .part file is kept: the next run resumes it)",
                file.name, exc, _duration_text(outage.lasted_s),
            )  # fmt: skip
            raise AsvoError(
                f"Job {job.id}: download of {file.name} stopped: the server has not answered "
                f"for {_duration_text(outage.lasted_s)} ({exc}); {partial.name} is kept, and "
                "a later download resumes it",
                job_id=job.id,
            ) from exc
        if outage.failures == 1:
            log.warning(
                "download of %s interrupted (%s); waiting for the server (up to %s), then "
                "resuming from the .part file",
                file.name, exc, _duration_text(limit_s),
            )  # fmt: skip
        time.sleep(wait_s)

    def _fetch_into(
        self,
        file: ProductFile,
        algorithm: str,
        partial: Path,
        progress: ProgressCallback | None,
        fetched: _Fetched,
    ) -> tuple[bool, str]:
        """Append the missing bytes of ``file`` to ``partial``, counting them in ``fetched``.

        Returns whether the download resumed, and the ``algorithm`` digest of the whole
        file (hashed as it is written; a resumed file's first part is read once).
        """
        have = partial.stat().st_size if partial.exists() else 0
        if have > file.size_bytes:
            partial.unlink()
            have = 0
        if have == file.size_bytes:
            return False, _digest_of_file(partial, algorithm).hexdigest()
        headers = {"User-Agent": USER_AGENT}
        if have:
            headers["Range"] = f"bytes={have}-"
        assert file.url is not None
        with _http_get(file.url, headers, self._verify) as reply:
            if reply.status == 200:
                have = 0  # the server sent the whole file: start again
                fetched.bytes = 0  # what was fetched before is overwritten
            elif reply.status == 206:
                content_range = reply.getheader("content-range", "")
                resumed_at = _CONTENT_RANGE_START.match(content_range)
                if resumed_at is None:
                    raise AsvoError(
                        f"the server answered a resumed download with Content-Range "
                        f"{content_range!r}, not 'bytes {have}-...'"
                    )
                if int(resumed_at[1]) != have:
                    raise AsvoError(f"the server resumed at byte {resumed_at[1]}, not {have}")
            else:
                text = reply.read(65536).decode("utf-8", "replace")
                raise _reply_error(reply.status, reply.reason, text, f"Download of {file.name}")
            resumed = have > 0
            digest = (
                _digest_of_file(partial, algorithm, have) if resumed else _new_digest(algorithm)
            )
            received = 0
            # One buffer, filled straight from the socket: no per-block allocation or copy.
            buffer = memoryview(bytearray(CHUNK_BYTES))
            # O_NOFOLLOW: a symbolic link put here since the check above is refused (ELOOP).
            descriptor = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            with os.fdopen(descriptor, "r+b") as stream:
                stream.seek(have)
                stream.truncate()
                while count := reply.readinto(buffer):
                    block = buffer[:count]
                    stream.write(block)
                    digest.update(block)
                    received += count
                    fetched.bytes += count
                    if progress:
                        progress(file, have + received, file.size_bytes)
        if have + received < file.size_bytes:
            # A broken connection (a server stopped mid-transfer): waited out and resumed.
            raise ConnectionAbortedError(
                f"the connection closed after {have + received} of {file.size_bytes} bytes"
            )
        return resumed, digest.hexdigest()


@dataclass
class _Fetched:
    """Bytes fetched for the copy of a file being downloaded, over all its attempts."""

    bytes: int = 0


@contextmanager
def _http_get(
    url: str, headers: Mapping[str, str], verify: Verify, redirects: int = 5
) -> Iterator[http.client.HTTPResponse]:
    """GET ``url`` with http.client, following redirects and the ``*_proxy`` variables.

    Products are large: http.client reads the body straight into the caller's buffer
    (``readinto``), at about twice the speed of a pure-Python HTTP parser. The signed
    URL carries its own authorisation, so no cookie is sent, and it may be on another
    host (object storage).
    """
    for _ in range(redirects + 1):
        parts = urlsplit(url)
        host = parts.hostname or ""
        https = parts.scheme == "https"
        port = parts.port or (443 if https else 80)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        proxy = _proxy_for(parts.scheme, host)
        request_headers = dict(headers)
        connection: http.client.HTTPConnection
        if proxy:
            if https:  # a CONNECT tunnel through the proxy, TLS end to end
                connection = http.client.HTTPSConnection(
                    *proxy.address, timeout=60, context=_tls_context(verify)
                )
                connection.set_tunnel(host, port, headers=proxy.headers)
            else:  # a plain proxy request with the absolute URL
                connection = http.client.HTTPConnection(*proxy.address, timeout=60)
                target = url
                request_headers.update(proxy.headers)
        elif https:
            connection = http.client.HTTPSConnection(
                host, port, timeout=60, context=_tls_context(verify)
            )
        else:
            connection = http.client.HTTPConnection(host, port, timeout=60)
        try:
            connection.request("GET", target, headers=request_headers)
            reply = connection.getresponse()
            location = reply.getheader("location")
            if reply.status in (301, 302, 303, 307, 308) and location:
                url = urljoin(url, location)
                continue
            yield reply
            return
        finally:
            connection.close()
    raise AsvoError(f"too many redirects from {url}")


@dataclass(frozen=True)
class _Proxy:
    """A proxy of the ``*_proxy`` variables: where it is, and the headers it wants."""

    host: str
    port: int
    #: ``Proxy-Authorization`` when the variable names a user (``http://u:p@proxy:3128``),
    #: as httpx sends it for the API calls.
    headers: dict[str, str]

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


def _proxy_for(scheme: str, host: str) -> _Proxy | None:
    """The proxy the ``*_proxy`` variables give for ``scheme`` URLs to ``host``."""
    if urllib.request.proxy_bypass(host):
        return None
    proxy = urllib.request.getproxies().get(scheme)
    if not proxy:
        return None
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    headers = {}
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
    return _Proxy(parts.hostname or "", parts.port or 80, headers)


def _open_tunnel(sock: socket.socket, host: str, port: int, headers: Mapping[str, str]) -> None:
    """Ask the proxy at the other end of ``sock`` for a tunnel to ``host:port`` (CONNECT),
    with ``headers`` (its authorisation).

    Raises
    ------
    OSError
        If the proxy refuses (its status line is in the message) or closes.
    """
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{extra}\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        block = sock.recv(4096)
        if not block or len(head) > 65536:
            raise OSError(f"the proxy closed the tunnel to {authority} before answering")
        head += block
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    if not status_line.split(" ")[1:2] or not status_line.split(" ")[1].startswith("2"):
        raise OSError(f"the proxy refused a tunnel to {authority}: {status_line}")


@contextmanager
def _downloading_alone(target: Path) -> Iterator[None]:
    """Held while ``target`` is downloaded or copied: another process (an overlapping cron
    run, a second terminal) fetching it into the same directory waits for this one, then
    finds it there and verifies it, rather than both writing one ``.part`` file (or one
    temporary copy of a delivered directory).

    A ``flock`` on the hidden ``.<name>.lock`` beside it (on the shared file system, so
    runs on other nodes wait too), removed when the download ends.
    """
    lock_path = target.with_name(f".{target.name}.lock")
    while True:
        try:
            # O_NOFOLLOW: a symbolic link planted at the lock's name would have its target
            # created; it is removed instead.
            descriptor = os.open(
                lock_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644
            )
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            lock_path.unlink()
            continue
        handle = os.fdopen(descriptor, "a")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("%s is being downloaded by another process: waiting for it", target)
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                same = os.fstat(handle.fileno()).st_ino == os.stat(lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file its holder removed while this one waited
                try:
                    yield
                finally:
                    lock_path.unlink(missing_ok=True)
                return
        finally:
            handle.close()


def _check_local_name(job: Job, file: ProductFile) -> None:
    """Refuse a product whose name (the last segment of its URL or path) is no file name.

    A path ending in ``/..`` would put the product beside the destination, not in it, and
    ``/`` would name the destination itself.
    """
    if file.name in ("", ".", "..") or "\x00" in file.name:
        raise AsvoError(
            f"Job {job.id}: the server's product {file.url or file.path!r} has no usable file "
            f"name ({file.name!r}); nothing written",
            job_id=job.id,
        )


def _copy_delivered_directory(
    job: Job, file: ProductFile, dest_dir: Path, progress: ProgressCallback | None
) -> DownloadResult:
    """Copy a scratch/dug product into ``dest_dir`` when its path is on this machine.

    The server records only the product's total size, so a copy is checked by that
    and by its files' names and sizes against the delivered directory's. A first copy
    is made under a temporary name and renamed when complete. A directory of the
    product's name already in ``dest_dir`` is taken as an earlier copy: if every file
    of the product is in it with its size, it is kept (``exists``); otherwise only the
    product's files that are missing or differ are copied again, each replacing its
    namesake atomically. Nothing else in it (the user's own files) is touched: the
    client deletes or replaces only what the product has.

    Raises
    ------
    AsvoError
        If the delivered directory does not hold what the server says it does, or
        changes while it is copied; or if the product's name in ``dest_dir``, or a
        path in it where the product has a file or directory, is something else (a
        symbolic link, a file where the product has a directory, ...). That is left
        as it is, and nothing is written.
    """
    source = Path(file.path or "")
    if not file.path or not source.is_dir():
        return DownloadResult(file, None, "remote")
    _check_local_name(job, file)
    target = dest_dir / file.name
    source_sizes = _file_sizes(source)
    if sum(source_sizes.values()) != file.size_bytes:
        raise AsvoError(
            f"Job {job.id}: {source} holds {sum(source_sizes.values())} bytes, the server "
            f"says {file.size_bytes}",
            job_id=job.id,
        )
    # Another run copying this product here (an overlapping `-w all`) holds the lock: this
    # one waits, then finds that run's copy and verifies it, instead of taking its
    # temporary copy for a leftover and deleting it under it.
    with _downloading_alone(target):
        kind = _kind_of(target)
        if kind is None:
            return _copy_whole_directory(job, file, source, target, source_sizes, progress)
        if kind != "a directory":
            raise AsvoError(
                f"Job {job.id}: {target} is {kind}, not a copy of the product; it was left as "
                "it is: move it away or download into another directory",
                job_id=job.id,
            )
        return _update_copied_directory(job, file, source, target, source_sizes, progress)


def _kind_of(path: Path) -> str | None:
    """What is at ``path``, without following a symbolic link: None if nothing."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a file" if stat.S_ISREG(mode) else "not a regular file"


def _copy_whole_directory(
    job: Job,
    file: ProductFile,
    source: Path,
    target: Path,
    source_sizes: Mapping[str, int],
    progress: ProgressCallback | None,
) -> DownloadResult:
    """The first copy of a product, into ``target`` (which does not exist).

    Called with the product's lock held (``_downloading_alone``).

    Raises
    ------
    AsvoError
        If the copy fails (naming the files that could not be copied) or the delivered
        directory changes meanwhile; nothing of the copy is left.
    """
    # Copied under a temporary name, so an interrupted copy is never taken for a finished
    # one. The name is the client's own and the lock is held: what is there is the
    # leftover of a run that was stopped.
    staging = target.with_name(f".{target.name}.copying")
    if _kind_of(staging) == "a directory":
        shutil.rmtree(staging)
    else:  # a leftover file, or a link: unlinked, never followed
        staging.unlink(missing_ok=True)
    copied = 0

    def copy_reporting(from_path: str, to_path: str) -> None:
        nonlocal copied
        shutil.copy2(from_path, to_path)
        copied += os.path.getsize(to_path)
        if progress:
            progress(file, copied, file.size_bytes)

    try:
        try:
            shutil.copytree(source, staging, copy_function=copy_reporting)
        except shutil.Error as exc:  # an OSError whose text is a list of tuples
            raise AsvoError(
                f"Job {job.id}: could not copy {source}: {_copy_failures(exc)}", job_id=job.id
            ) from exc
        if _file_sizes(staging) != source_sizes:  # the delivered directory changed meanwhile
            raise AsvoError(f"Job {job.id}: {source} changed while it was copied", job_id=job.id)
        # Fails (rather than replaces) if something other than an empty directory took the
        # name meanwhile.
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return DownloadResult(file, target, "copied", copied, files_copied=len(source_sizes))


def _copy_failures(error: shutil.Error, shown: int = 3) -> str:
    """What ``shutil.copytree`` could not copy, readably: ``PATH: reason`` for the first
    ``shown`` files, and how many more there were."""
    failures = error.args[0] if error.args and isinstance(error.args[0], list) else []
    described = [f"{source}: {reason}" for source, _destination, reason in failures[:shown]]
    if len(failures) > shown:
        described.append(f"and {len(failures) - shown} more")
    return "; ".join(described) if described else str(error)


def _update_copied_directory(
    job: Job,
    file: ProductFile,
    source: Path,
    target: Path,
    source_sizes: Mapping[str, int],
    progress: ProgressCallback | None,
) -> DownloadResult:
    """Bring the earlier copy ``target`` (a directory) up to date with ``source``.

    Every path is checked before anything is written, so that a refusal leaves the
    directory as it was; no symbolic link is followed (one where the product has a
    directory would have the copy written elsewhere, one where it has a file replaced).
    """
    stale: list[str] = []
    for relative, size in sorted(source_sizes.items()):
        path = target / relative
        for parent in reversed(Path(relative).parents[:-1]):  # "a/b/c": a, then a/b
            _expect_kind(job, target / parent, ("a directory",), "a directory")
        if _expect_kind(job, path, ("a file",), "a file") and path.stat().st_size == size:
            continue
        # The temporary copy's name is the client's own: a file there is a run's leftover.
        _expect_kind(job, _copying_name(path), ("a file",), None)
        stale.append(relative)
    if not stale:
        if progress:
            progress(file, file.size_bytes, file.size_bytes)
        return DownloadResult(file, target, "exists")
    log.warning(
        "%s does not match %s (%d of %d files missing or different): copying every file of "
        "the product again; other files are left as they are",
        target, source, len(stale), len(source_sizes),
    )  # fmt: skip
    # Every file of the product, not only those whose size differs: a measurement set
    # whose tables kept their sizes after an edit would otherwise mix two versions.
    stale = sorted(source_sizes)
    kept = 0
    copied = 0
    for relative in stale:
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = _copying_name(path)
        # A leftover there may be a hard or symbolic link: written through, it would
        # overwrite what it points at. Removed, the copy makes a file of its own.
        partial.unlink(missing_ok=True)
        try:
            shutil.copy2(source / relative, partial)
            if partial.stat().st_size != source_sizes[relative]:
                raise AsvoError(
                    f"Job {job.id}: {source} changed while it was copied", job_id=job.id
                )
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        copied += source_sizes[relative]
        if progress:
            progress(file, kept + copied, file.size_bytes)
    return DownloadResult(
        file, target, "copied", copied, redownloaded=True, files_copied=len(stale)
    )


def _copying_name(path: Path) -> Path:
    """The temporary name a file is copied under before it replaces ``path``."""
    return path.with_name(f".{path.name}.copying")


def _expect_kind(job: Job, path: Path, allowed: tuple[str, ...], product_has: str | None) -> bool:
    """Whether ``path`` exists, as one of the ``allowed`` kinds (see ``_kind_of``).

    Raises
    ------
    AsvoError
        Naming ``path``, if something else is there (where the product has ``product_has``,
        said when given).
    """
    kind = _kind_of(path)
    if kind is not None and kind not in allowed:
        where = "" if product_has is None else f" where the product has {product_has}"
        raise AsvoError(
            f"Job {job.id}: {path} is {kind}{where}; nothing was copied and it was left as it "
            "is: move it away or download into another directory",
            job_id=job.id,
        )
    return kind is not None


def _file_sizes(root: Path) -> dict[str, int]:
    """``{path relative to root: size}`` of every file under ``root``."""
    return {
        str(path.relative_to(root)): path.stat().st_size
        for path in root.rglob("*")
        if path.is_file()
    }


def verify_from_environment(environ: Mapping[str, str] | None = None) -> Verify:
    """TLS verification from ``SSL_VERIFY`` (``0`` off) and the CA bundles of
    ``SSL_CERT_FILE`` and ``REQUESTS_CA_BUNDLE``: both are trusted when both are set (HPC
    modules and conda often set one for everyone, and the user the other)."""
    env = os.environ if environ is None else environ
    if env.get("SSL_VERIFY", "1") == "0":
        return False
    bundles = tuple(dict.fromkeys(
        env[name] for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE") if env.get(name)
    ))  # fmt: skip
    if not bundles:
        return True
    return bundles[0] if len(bundles) == 1 else bundles


def _certificate_refusal(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate check that failed behind ``exc`` (httpx wraps it), if that is why."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _certificate_message(url: str, refusal: ssl.SSLCertVerificationError) -> str:
    """Why a TLS connection was refused, and what the user can do about it."""
    reason = refusal.verify_message or refusal.reason or str(refusal)
    return (
        f"the TLS certificate of {urlsplit(url).netloc} was not accepted ({reason}). For a "
        "server with a private certificate authority, set SSL_CERT_FILE (or REQUESTS_CA_BUNDLE) "
        "to its CA file; SSL_VERIFY=0 skips the check (for test servers only)"
    )


def _tls_context(verify: Verify) -> ssl.SSLContext:
    """A TLS context that checks certificates (against the CA files or directories
    ``verify`` names, as requests takes them) or not.

    Raises
    ------
    AsvoError
        If a CA file or directory cannot be read (naming it).
    """
    bundles = (verify,) if isinstance(verify, str) else verify if isinstance(verify, tuple) else ()
    context = (
        ssl.create_default_context() if not bundles else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    )
    for bundle in bundles:
        kind = "capath" if os.path.isdir(bundle) else "cafile"
        try:
            context.load_verify_locations(**{kind: bundle})
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise AsvoError(
                f"the CA certificates {bundle} (SSL_CERT_FILE or REQUESTS_CA_BUNDLE) cannot be "
                f"read: {reason}"
            ) from exc
    if verify is False:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _form_value(value: Any) -> str:
    """Form fields as the server reads them: booleans as ``true``/``false``."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
