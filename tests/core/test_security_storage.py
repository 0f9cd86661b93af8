from pathlib import Path

import pytest

from observatory.core.security import hash_secret, key_fingerprint, new_api_key, verify_secret
from observatory.core.storage import Storage, StorageKeyError, clean_key, sha1_of_file


def test_hash_and_verify() -> None:
    key = new_api_key()
    stored = hash_secret(key)
    assert key not in stored
    assert stored.startswith("scrypt$")
    assert verify_secret(key, stored)
    assert not verify_secret(key + "x", stored)
    assert hash_secret(key) != stored  # salted
    assert not verify_secret(key, "garbage")
    assert len(key_fingerprint(key)) == 16


def test_empty_secret_refused() -> None:
    with pytest.raises(ValueError):
        hash_secret("")


@pytest.mark.parametrize(
    "bad", ["", "/etc/passwd", "../x", "a/../../x", "a/..", "a\\b", "a\x00b", "C:x", "."]
)
def test_keys_cannot_escape(bad: str) -> None:
    with pytest.raises(StorageKeyError):
        clean_key(bad)


def test_key_normalised() -> None:
    assert clean_key("a/./b//c") == "a/b/c"


@pytest.mark.parametrize("root", ["local", "memory"])
def test_storage_round_trip(tmp_path: Path, root: str) -> None:
    storage = Storage(tmp_path / "store" if root == "local" else f"memory://test-{tmp_path.name}")
    storage.write_bytes("1/a.bin", b"abc")
    assert storage.exists("1/a.bin")
    assert storage.size("1/a.bin") == 3
    assert storage.read_bytes("1/a.bin") == b"abc"
    assert storage.list() == ["1/a.bin"]
    storage.delete("1/a.bin")
    assert not storage.exists("1/a.bin")
    storage.delete("1/a.bin")


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "store")
    storage.write_bytes("x/file", b"old")
    with pytest.raises(RuntimeError), storage.open_write("x/file") as handle:
        handle.write(b"new, half written")
        raise RuntimeError("disk full")
    assert storage.read_bytes("x/file") == b"old"
    assert storage.list() == ["x/file"]  # no temporary left behind


def test_put_file_and_sha1(tmp_path: Path) -> None:
    source = tmp_path / "src.bin"
    source.write_bytes(b"hello")
    storage = Storage(tmp_path / "store")
    storage.put_file(source, "k/src.bin")
    assert (
        sha1_of_file(storage.local_path("k/src.bin")) == "aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d"
    )


def test_atomic_output(tmp_path: Path) -> None:
    from observatory.core.storage import atomic_output

    target = tmp_path / "sub" / "out.bin"
    with atomic_output(target) as temporary:
        assert temporary.parent == target.parent
        temporary.write_bytes(b"done")
        assert not target.exists()
    assert target.read_bytes() == b"done"
    with pytest.raises(RuntimeError), atomic_output(target) as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("crash")
    assert target.read_bytes() == b"done"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]
