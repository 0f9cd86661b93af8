"""Integrity of a delivery package: a BagIt-format sha256 manifest beside it, and its checks.

The manifest is ``<packpath>.manifest-sha256.txt`` next to the package (not inside it, so the
package stays exactly the tree the source document specifies). Its lines are BagIt manifest
lines, ``<sha256 hex>  <path>``, with paths starting at the package directory, e.g.
``2011.0.00229.S/sg_ouss_id/group_ouss_id/member_ouss_id/README``: the same format as
``sha256sum``, so ``sha256sum -c 2011.0.00229.S.manifest-sha256.txt`` run in the package's parent
directory checks it too. Hashing uses bagit's own routine, in parallel threads (hashlib releases
the GIL on large blocks).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import bagit

if TYPE_CHECKING:
    from observatory.packaging.qa2 import Plan


def manifest_path(packpath: Path) -> Path:
    """Where the manifest of ``packpath`` lives."""
    return packpath.parent / f"{packpath.name}.manifest-sha256.txt"


def bag_info_path(packpath: Path) -> Path:
    """Where the ``bag-info.txt`` of ``packpath`` lives (beside it, as its manifest)."""
    return packpath.parent / f"{packpath.name}.bag-info.txt"


#: BagIt's record of a payload's size: ``<total bytes>.<number of files>``.
PAYLOAD_OXUM = "Payload-Oxum"


def read_payload_oxum(packpath: Path) -> tuple[int, int] | None:
    """``(bytes, files)`` from the Payload-Oxum of the package's bag-info (None without one).

    Raises
    ------
    ValueError
        When the bag-info cannot be read, or its Payload-Oxum is not ``<bytes>.<files>``.
    """
    path = bag_info_path(packpath)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    for line in text.split("\n"):
        name, separator, value = line.partition(":")
        if separator and name.strip() == PAYLOAD_OXUM:
            size_text, dot, count_text = value.strip().partition(".")
            if not (dot and size_text.isdigit() and count_text.isdigit()):
                raise ValueError(f"{path}: malformed {PAYLOAD_OXUM} {value.strip()!r}")
            return int(size_text), int(count_text)
    return None


def payload_oxum_problem(packpath: Path, sizes: Mapping[str, int]) -> str | None:
    """What is wrong when the package's files (``sizes``: name -> bytes, as
    :func:`package_entries` gives them) do not add up to its bag-info's Payload-Oxum; None
    when they do, or when there is none to compare (a package made before it was written).

    A cheap check, without reading the files: a file a power cut left short (its data never
    reached the disk) is found without hashing the package again.

    Raises
    ------
    ValueError
        When the bag-info cannot be read (see :func:`read_payload_oxum`).
    """
    expected = read_payload_oxum(packpath)
    found = (sum(sizes.values()), len(sizes))
    if expected is None or found == expected:
        return None
    return (
        f"its files add up to {found[0]} bytes in {found[1]} files, but "
        f"{bag_info_path(packpath)} says {expected[0]} bytes in {expected[1]} files "
        f"({PAYLOAD_OXUM} {expected[0]}.{expected[1]}): a file is shorter or longer than when it "
        "was packaged (its data lost in a power cut?)"
    )


def sync_file(path: str | os.PathLike[str]) -> None:
    """``fsync`` a file: its bytes are on disk when this returns."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_directory(path: str | os.PathLike[str]) -> None:
    """``fsync`` a directory: the names made or renamed in it are on disk when this returns."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's content (bagit's hashing routine, the manifest's algorithm)."""
    return str(bagit.generate_manifest_lines(os.fspath(path), algorithms=["sha256"])[0][1])


#: Blocks in which a file is copied, compared and hashed.
COPY_BLOCK_BYTES = 1 << 20
#: Each thread's two blocks, made once: a new megabyte per file costs page faults and
#: zeroing, which with many small files costs more than copying them.
_blocks = threading.local()
#: Files this big are hashed in threads (hashlib releases the GIL on their blocks); smaller
#: ones are cheaper to hash in turn than to hand over.
THREADED_HASH_BYTES = 1 << 20


def hash_files(
    paths: Sequence[str | os.PathLike[str]],
    *,
    workers: int = 2,
    on_hashed: Callable[[int, int], None] | None = None,
) -> list[str]:
    """SHA-256 hex digests of ``paths``, in order.

    Large files are shared among ``workers`` threads while the calling thread hashes the
    small ones: for small files the per-file cost is Python's, which threads only contend for.
    ``on_hashed(index, size_bytes)`` is called in the calling thread as each digest is had
    (the small files' first, then the large ones' in order).
    """
    digests = [""] * len(paths)
    sizes = [os.stat(path).st_size for path in paths]
    large = [i for i, size in enumerate(sizes) if size >= THREADED_HASH_BYTES]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {i: pool.submit(file_sha256, paths[i]) for i in large}
        for i, path in enumerate(paths):
            if i not in futures:
                digests[i] = file_sha256(path)
                if on_hashed is not None:
                    on_hashed(i, sizes[i])
        for i, future in futures.items():
            digests[i] = future.result()
            if on_hashed is not None:
                on_hashed(i, sizes[i])
    return digests


def read_manifest(path: Path) -> dict[str, str]:
    """``{relative path: digest}`` from a manifest file (empty when there is none)."""
    if not path.exists():
        return {}
    entries: dict[str, str] = {}
    # Lines end in "\n" only: splitlines() would also split names at form feeds, NEL or
    # U+2028, which file names may hold (only "\n" and "\r" are refused in them).
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        digest, separator, name = line.partition("  ")
        if not separator or len(digest) != 64:
            raise ValueError(f"{path} line {number} is not '<sha256>  <path>': {line!r}")
        entries[name] = digest
    return entries


def _thread_blocks() -> tuple[bytearray, bytearray]:
    """This thread's two blocks of ``COPY_BLOCK_BYTES``."""
    if not hasattr(_blocks, "origin"):
        _blocks.origin, _blocks.copy = bytearray(COPY_BLOCK_BYTES), bytearray(COPY_BLOCK_BYTES)
    return _blocks.origin, _blocks.copy


def link_and_hash(
    origin: str | os.PathLike[str],
    link: str | os.PathLike[str],
    *,
    make_link: Callable[[str | os.PathLike[str], str | os.PathLike[str]], None] = os.link,
) -> str:
    """Hard-link ``origin`` at ``link`` (with ``make_link``); the SHA-256 of the file, read
    through the new link.

    The file opened through the link is checked to be the origin's inode (as the run's
    verification requires) by the ``fstat`` of the descriptor the hash reads from: one
    pass makes the link, checks it and hashes it, with no second lookup of either path.

    Raises
    ------
    ValueError
        When ``link`` does not lead to the origin's inode.
    OSError
        When the link cannot be made.
    """
    origin_stat = os.stat(origin)
    make_link(origin, link)
    fd = os.open(link, os.O_RDONLY)
    try:
        linked = os.fstat(fd)
        if (linked.st_dev, linked.st_ino) != (origin_stat.st_dev, origin_stat.st_ino):
            raise ValueError(f"{link} is not a hard link of {origin}")
        digest = hashlib.sha256()
        block = _thread_blocks()[1]
        offset = 0
        # A regular file's read comes back short only at its end: most files take one read.
        while n := os.preadv(fd, [block], offset):
            digest.update(memoryview(block)[:n])
            offset += n
            if n < len(block):
                break
        return digest.hexdigest()
    finally:
        os.close(fd)


def _copy_block(source_fd: int, copy_fd: int, offset: int, count: int) -> int:
    """Copy up to ``count`` bytes at ``offset`` inside the kernel; the bytes copied (0 at the end)."""
    try:
        return os.sendfile(copy_fd, source_fd, offset, count)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    data = os.pread(source_fd, count, offset)  # no sendfile between files here
    written = 0
    while written < len(data):
        written += os.pwrite(copy_fd, data[written:], offset + written)
    return written


def _read_exactly(fd: int, buffer: bytearray, count: int, offset: int) -> bool:
    """Fill ``buffer[:count]`` from ``offset``; False if the file ends first."""
    view = memoryview(buffer)
    done = 0
    while done < count:
        got = os.preadv(fd, [view[done:count]], offset + done)
        if not got:
            return False
        done += got
    return True


def copy_and_hash(
    origin: str | os.PathLike[str],
    copy: str | os.PathLike[str],
    *,
    verify: bool = True,
    durable: bool = False,
) -> str:
    """Copy ``origin`` to ``copy`` (data, then permissions and times as ``shutil.copy2``);
    the SHA-256 of the bytes copied. With ``durable`` the copy is on disk (``fsync``)
    when this returns (its name is not: the caller syncs its directory).

    Block by block: the kernel copies the block (``sendfile``, no trip through user
    space), then the copy's block is read, compared with the origin's (``verify``) and
    hashed while both are in the CPU's cache. The manifest's digest is thus of content
    known to be both the origin's and the copy's, for one hash pass; and because each
    file is hashed as it is copied, the copies of a package can run side by side
    without leaving the hash of the last file to run alone.

    Raises
    ------
    ValueError
        Naming the byte range of the first block the copy does not hold.
    """
    digest = hashlib.sha256()
    origin_block, copy_block = _thread_blocks()
    offset = 0
    with open(origin, "rb", buffering=0) as source, open(copy, "w+b", buffering=0) as target:
        source_fd, copy_fd = source.fileno(), target.fileno()
        while n := _copy_block(source_fd, copy_fd, offset, COPY_BLOCK_BYTES):
            if not _read_exactly(copy_fd, copy_block, n, offset):
                raise ValueError(f"{copy} is shorter than the bytes copied into it")
            if verify:
                # bytearrays compare with memcmp (memoryviews item by item: 80 times slower).
                same = _read_exactly(source_fd, origin_block, n, offset) and (
                    origin_block == copy_block
                    if n == COPY_BLOCK_BYTES
                    else origin_block[:n] == copy_block[:n]
                )
                if not same:
                    raise ValueError(
                        f"{copy} differs from {origin} within bytes {offset}-{offset + n - 1}"
                    )
            digest.update(memoryview(copy_block)[:n])
            offset += n
        shutil.copystat(origin, copy)
        if durable:
            os.fsync(copy_fd)  # after copystat: its mode and times are on disk too
    return digest.hexdigest()


def write_manifest(
    packpath: Path,
    member: Path,
    *,
    workers: int = 2,
    known: Mapping[str, str] | None = None,
    durable: bool = False,
    on_hashed: Callable[[str, int], None] | None = None,
) -> Path:
    """Hash every file of ``packpath/member`` into the package's manifest.

    Lines of other members are kept as they are, whether or not their files are still
    there (they are never modified by a later run: a file gone missing must still be
    reported by the validation); this member's lines are replaced. The file is replaced
    atomically; with ``durable`` it is on disk when this returns (after a move, where
    the package holds the only copy, or an append, where it holds earlier members'
    lines). Otherwise it is not synced: a manifest a power cut left short describes a
    package that is refused (tarsplit, verify) and made again.
    ``known`` maps files (``os.path.join`` strings under ``packpath/member``) to digests
    already computed, which are not hashed again; ``on_hashed(file, size_bytes)`` is called
    after each of the others is hashed (a move's whole package: progress for the user).

    Beside the manifest, ``<packpath>.bag-info.txt`` gets the package's Payload-Oxum (its
    files' total bytes and number, as BagIt's ``bag-info.txt``), by which tarsplit refuses,
    without hashing, a package whose files are not the size they were (see
    :func:`payload_oxum_problem`); written as the manifest is, just before it.
    """
    path = manifest_path(packpath)
    prefix = Path(packpath.name) / member
    previous = read_manifest(path)
    kept = {
        name: digest for name, digest in previous.items() if not Path(name).is_relative_to(prefix)
    }
    # Plain strings, not Paths: with tens of thousands of files pathlib costs more than hashing.
    # Names are the member's name in the manifest followed by the path below the member
    # (cutting the parent's text off would not do: a packpath in "." has the parent ".").
    root = os.fspath(packpath / member)
    files = sorted(
        os.path.join(directory, name) for directory, _, names in os.walk(root) for name in names
    )
    known = known or {}
    unknown = [file for file in files if file not in known]
    report = None if on_hashed is None else (lambda i, size: on_hashed(unknown[i], size))
    digests = dict(
        zip(unknown, hash_files(unknown, workers=workers, on_hashed=report), strict=True)
    )
    oxum = _kept_payload_oxum(packpath, previous, kept)
    if oxum is not None:
        sizes = [os.stat(file).st_size for file in files]
        oxum = (oxum[0] + sum(sizes), oxum[1] + len(files))
    for file in files:
        kept[f"{prefix}{file[len(root) :]}"] = known.get(file) or digests[file]
    bag_info = bag_info_path(packpath)
    if oxum is None:  # cannot be known: no record rather than a wrong one
        bag_info.unlink(missing_ok=True)
    else:
        _replace_file(bag_info, f"{PAYLOAD_OXUM}: {oxum[0]}.{oxum[1]}\n", durable=durable)
    lines = "".join(f"{digest}  {name}\n" for name, digest in sorted(kept.items()))
    _replace_file(path, lines, durable=durable)  # names are UTF-8 (others are refused)
    if durable:
        sync_directory(path.parent)
    return path


def _replace_file(path: Path, text: str, *, durable: bool) -> None:
    """Replace ``path`` atomically through ``<path>.partial`` (synced with ``durable``; its
    name is not: the caller syncs the directory)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    if durable:
        sync_file(partial)
    os.replace(partial, path)


def _kept_payload_oxum(
    packpath: Path, previous: Mapping[str, str], kept: Mapping[str, str]
) -> tuple[int, int] | None:
    """``(bytes, files)`` of the files of the manifest lines ``kept`` (other members'), or
    None when that cannot be known (one of them is missing).

    The previous bag-info's figure when it describes exactly those lines (the record of the
    run that wrote them: a file of theirs cut short since is not taken for the truth);
    otherwise their sizes now.
    """
    if not kept:
        return 0, 0
    try:
        recorded = read_payload_oxum(packpath)
    except (OSError, ValueError):
        recorded = None
    if recorded is not None and recorded[1] == len(kept) and previous.keys() == kept.keys():
        return recorded
    total = 0
    for name in kept:
        try:
            total += os.stat(packpath.parent / name).st_size
        except FileNotFoundError:
            return None
    return total, len(kept)


_NOT_A_FILE = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFIFO: "a named pipe",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a device",
    stat.S_IFBLK: "a device",
}


def not_a_file(mode: int) -> str:
    """What an entry of this ``st_mode`` is, said of one a package must not hold."""
    return _NOT_A_FILE.get(stat.S_IFMT(mode), "not a file")


def package_entries(
    packpath: Path, sizes: dict[str, int] | None = None
) -> tuple[set[str], dict[str, str]]:
    """The package's regular files, and its other entries that are not directories (name ->
    what it is), named as in the manifest (from the package's own name on).

    Symbolic links are not followed, to directories either: the packager makes files and
    directories only, and a link (a hand edit) would deliver a name without its data.
    ``sizes``, when given, gets each regular file's size (name -> bytes).
    """
    files: set[str] = set()
    others: dict[str, str] = {}
    pending = [(os.fspath(packpath), os.path.basename(os.path.abspath(packpath)))]
    while pending:
        directory, name = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                entry_name = f"{name}/{entry.name}"
                if entry.is_dir(follow_symlinks=False):
                    pending.append((entry.path, entry_name))
                elif entry.is_file(follow_symlinks=False):
                    files.add(entry_name)
                    if sizes is not None:
                        sizes[entry_name] = entry.stat(follow_symlinks=False).st_size
                else:
                    others[entry_name] = not_a_file(entry.stat(follow_symlinks=False).st_mode)
    return files, others


def validate_manifest(packpath: Path, *, workers: int = 2) -> list[str]:
    """Re-hash the whole package against its manifest; the problems found (empty when valid).

    A full validation: every byte is read (a same-size change is caught); files missing from
    the package, files the manifest does not list and entries that are neither files nor
    directories (a symbolic link put in place of a file or beside them) are reported.
    """
    path = manifest_path(packpath)
    if not path.exists():
        return [f"{path} does not exist"]
    expected = read_manifest(path)
    sizes: dict[str, int] = {}
    files, others = package_entries(packpath, sizes)
    listed = sorted(expected)
    present = [name for name in listed if name in files]
    problems = [f"missing: {name}" for name in listed if name not in files and name not in others]
    paths = [packpath.parent / name for name in present]
    for name, digest in zip(present, hash_files(paths, workers=workers), strict=True):
        if digest != expected[name]:
            problems.append(f"changed: {name} (manifest {expected[name]}, file {digest})")
    problems += [f"not in the manifest: {name}" for name in sorted(files - set(expected))]
    problems += [
        f"not a file: {name} ({what}; a package holds files and directories only)"
        for name, what in sorted(others.items())
    ]
    if problems:
        return problems  # each named: the sizes' sum would only repeat them
    try:
        oxum = payload_oxum_problem(packpath, sizes)
    except (OSError, ValueError) as exc:
        oxum = f"its bag-info cannot be read: {exc}"
    return [] if oxum is None else [f"size: {oxum}"]  # as tarsplit refuses it


def verify_against_sources(plan: Plan, packpath: Path) -> None:
    """Check that every moved file is symlinked from its origin (copies are compared byte
    for byte, and hard links checked to be the origin's inode, as they are made).

    Raises
    ------
    PackagingError
        Naming every file that does not match.
    """
    from observatory.packaging.qa2 import PackagingError

    member = packpath / plan.member
    problems: list[str] = []
    for action in plan.actions:
        if action.kind != "move" or action.source is None:
            continue
        source = action.source
        target = member / action.destination_text
        if not (source.is_symlink() and os.path.samefile(source, target)):
            problems.append(f"{source} is not a symlink to {target}")
    if problems:
        raise PackagingError("the package does not match its origin: " + "; ".join(problems))
