"""Where files live: a small interface over a directory or any fsspec filesystem.

Keys are relative POSIX paths (``1131733552/1131733552.metafits``). A key can
never escape the storage root, and every write is atomic: bytes go to a
temporary name beside the target and are renamed into place, so a reader never
sees half a file and a crash leaves nothing under the real name.
"""

from __future__ import annotations

import glob
import hashlib
import os
import posixpath
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem


class StorageKeyError(ValueError):
    """A storage key that is empty, absolute or climbs out of the root."""


def clean_key(key: str) -> str:
    """Normalise a storage key, refusing anything that could leave the root.

    Raises
    ------
    StorageKeyError
        For empty keys, absolute paths, ``..`` components, backslashes or NUL bytes.
    """
    if not key or "\x00" in key or "\\" in key:
        raise StorageKeyError(f"invalid storage key {key!r}")
    if key.startswith("/") or (len(key) > 1 and key[1] == ":"):
        raise StorageKeyError(f"storage key {key!r} must be relative")
    parts = key.split("/")
    if any(part == ".." for part in parts):
        raise StorageKeyError(f"storage key {key!r} may not contain '..'")
    normalised = posixpath.normpath(key)
    if normalised in {".", ""}:
        raise StorageKeyError(f"invalid storage key {key!r}")
    return normalised


class Storage:
    """Files under a root, on the local disk (default) or any fsspec filesystem.

    A local root is created if its parent directory exists; a missing parent is not
    created until something is written.

    Parameters
    ----------
    root
        A directory path, or an fsspec URL such as ``s3://bucket/prefix``.
    storage_options
        Passed to fsspec (credentials, endpoint URL, ...).
    """

    def __init__(self, root: str | Path, **storage_options: object) -> None:
        root_text = str(root)
        protocol = fsspec.utils.get_protocol(root_text)
        self.fs = fsspec.filesystem(protocol, **storage_options)
        if isinstance(self.fs, LocalFileSystem):
            local_root = Path(fsspec.utils.stringify_path(root_text).removeprefix("file://"))
            # The root, but not its missing parents: the root is usually DATA_DIR/archive,
            # and a data directory on a share that is not mounted must not be made on the
            # local disk below the mount point (readiness reports it missing instead).
            # Writes still make what they need.
            with suppress(FileNotFoundError):
                local_root.mkdir(exist_ok=True)
            self.root = str(local_root.resolve())
        else:
            self.root = self.fs._strip_protocol(root_text).rstrip("/")
        self.protocol = protocol

    @property
    def is_local(self) -> bool:
        """Whether keys map to paths on this machine's disk."""
        return isinstance(self.fs, LocalFileSystem)

    def full_path(self, key: str) -> str:
        """The filesystem path of ``key`` (validated)."""
        return f"{self.root}/{clean_key(key)}"

    def local_path(self, key: str) -> Path:
        """The local path of ``key``; only for local storage."""
        if not self.is_local:
            raise RuntimeError("local_path() needs local storage")
        return Path(self.full_path(key))

    def exists(self, key: str) -> bool:
        """Whether ``key`` is stored."""
        return bool(self.fs.exists(self.full_path(key)))

    def size(self, key: str) -> int:
        """Size of ``key`` in bytes."""
        return int(self.fs.size(self.full_path(key)))

    @contextmanager
    def open_write(self, key: str) -> Iterator[IO[bytes]]:
        """Open ``key`` for writing; it appears under its name only if the block succeeds."""
        target = self.full_path(key)
        parent = posixpath.dirname(target)
        self.fs.makedirs(parent, exist_ok=True)
        temporary = f"{parent}/.{posixpath.basename(target)}.tmp-{secrets.token_hex(4)}"
        try:
            with self.fs.open(temporary, "wb") as handle:
                yield handle
            self.fs.mv(temporary, target)
        except BaseException:
            if self.fs.exists(temporary):
                self.fs.rm(temporary)
            raise

    def write_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically."""
        with self.open_write(key) as handle:
            handle.write(data)

    def put_file(self, source: str | Path, key: str) -> None:
        """Copy a local file into storage under ``key`` atomically."""
        with open(source, "rb") as src, self.open_write(key) as dst:
            shutil.copyfileobj(src, dst, length=4 * 1024 * 1024)

    def read_bytes(self, key: str) -> bytes:
        """The contents of ``key``."""
        with self.fs.open(self.full_path(key), "rb") as handle:
            return handle.read()

    def open_read(self, key: str) -> IO[bytes]:
        """A binary file object reading ``key``."""
        return self.fs.open(self.full_path(key), "rb")

    def delete(self, key: str) -> None:
        """Remove ``key`` (no error if it is already gone)."""
        path = self.full_path(key)
        if self.fs.exists(path):
            self.fs.rm(path)

    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (recursively), relative to the root, sorted."""
        base = self.full_path(prefix) if prefix else self.root
        if not self.fs.exists(base):
            return []
        found = self.fs.find(base)
        return sorted(posixpath.relpath(self.fs._strip_protocol(p), self.root) for p in found)


def sha1_of_file(path: str | Path, chunk_bytes: int = 4 * 1024 * 1024) -> str:
    """Lowercase hex SHA-1 of a local file, read in chunks."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def temporary_name(target_name: str, kind: str) -> str:
    """The start of a hidden temporary's name beside ``target_name``, marked with its owner.

    ``.<target>.<kind>-<host>-<pid>-`` (the caller adds a random ending): if the process
    dies without cleaning up (``kill -9``, the OOM killer), a later run on the same host
    can tell the leftover from a temporary still in use (:func:`remove_leftover_temporaries`).
    """
    return f".{target_name}.{kind}-{socket.gethostname()}-{os.getpid()}-"


def leftover_temporaries(target: str | Path, *, any_owner: bool = False) -> list[Path]:
    """The temporaries beside ``target`` left by processes of this host that are gone
    (by any process, with ``any_owner``).

    Only names made by :func:`temporary_name` are considered; those of live processes,
    and of other hosts (a shared file system), are not leftovers unless ``any_owner``.

    Parameters
    ----------
    target : str or Path
        The file the temporaries were made for.
    any_owner : bool
        The caller holds a lock that every writer of these temporaries holds while it
        writes them: every one is a dead run's, whatever host or PID its name carries
        (a run killed on another host of a shared file system, or in a container, whose
        PID a new process may have now, would otherwise be taken for a live one forever).

    Returns
    -------
    list[Path]
        The leftovers found.
    """
    target = Path(target)
    host = socket.gethostname()
    owner_glob = "*" if any_owner else glob.escape(host)
    found = []
    for candidate in target.parent.glob(f".{glob.escape(target.name)}.*-{owner_glob}-*-*"):
        # <kind>-<host>-<pid>-<random ending>; host names may hold dashes, the rest do not
        owner = candidate.name[len(f".{target.name}.") :].split("-", 1)[1].rpartition("-")[0]
        owner_host, _, pid_text = owner.rpartition("-")
        if not (owner_host and pid_text.isdigit()):
            continue  # not a name temporary_name made
        if any_owner or (owner_host == host and not _process_alive(int(pid_text))):
            found.append(candidate)
    return found


def remove_leftover_temporaries(target: str | Path, *, any_owner: bool = False) -> list[Path]:
    """Remove the :func:`leftover_temporaries` beside ``target`` (``any_owner``: see there);
    what was removed."""
    removed = leftover_temporaries(target, any_owner=any_owner)
    for candidate in removed:
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that is renamed to ``path`` if the block succeeds.

    For writers that want a file name (astropy, casacore, numpy) rather than a
    file object. On an exception the temporary is removed and ``path`` is
    untouched. A directory (a measurement set) replaces an existing one: the old one
    is renamed aside first and removed after, as ``os.replace`` cannot replace a
    directory that is not empty.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(temporary_name(target.name, "tmp") + secrets.token_hex(4))
    try:
        yield temporary
        if temporary.is_dir() and target.is_dir() and not target.is_symlink():
            previous = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
            os.replace(target, previous)
            os.replace(temporary, target)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(temporary, target)
    except BaseException:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)
        raise
