from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from observatory.core.accounts import (
    SESSION_MAX_AGE_S,
    api_session_token,
    create_user,
    end_portal_sessions,
    portal_session_token,
    reset_api_key,
    session_user,
    set_password,
)
from observatory.core.database import utcnow
from observatory.core.security import (
    hash_secret,
    key_fingerprint,
    new_api_key,
    sign_value,
    verify_secret,
)
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


def test_the_service_hashes_with_scrypt_at_its_full_work_factor() -> None:
    """The suite lowers the factor for its own hashes (tests/conftest.py); the package, as
    any process of the services runs it, hashes at N=2**14, r=8, p=1."""
    import subprocess
    import sys

    made = subprocess.run(
        [sys.executable, "-c",
         "from observatory.core.security import hash_secret; print(hash_secret('a key'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert made.startswith("scrypt$16384$8$1$")
    assert verify_secret("a key", made) and not verify_secret("a kez", made)


def test_session_tokens_end_with_the_key_and_with_signing_out(session: Session) -> None:
    """The cookies of /api/api_login and of the portal: signed, of one kind each, and
    revocable (a new API key ends the first; signing out or a new password the second)."""
    key = b"k" * 32
    alice, _ = create_user(session, "alice", "api-key-of-alice")
    bob, _ = create_user(session, "bob", "api-key-of-bob")
    api, portal = api_session_token(alice, key), portal_session_token(alice, key)
    assert session_user(session, api, key, "api") is alice
    assert session_user(session, portal, key, "portal") is alice
    assert session_user(session, api, key, "portal") is None  # one kind each
    assert session_user(session, portal, key, "api") is None
    for bad in (None, "", "garbage", api + "0", api.replace(str(alice.id), str(bob.id), 1)):
        assert session_user(session, bad, key, "api") is None
    assert session_user(session, api, b"another key" * 3, "api") is None
    assert session_user(session, sign_value(f"user:{alice.id}", key), key, "api") is None
    stale = sign_value(f"api:{alice.id}:{alice.api_key_fingerprint}", key, now_s=0)
    assert session_user(session, stale, key, "api") is None  # older than SESSION_MAX_AGE_S
    assert SESSION_MAX_AGE_S == 7 * 86_400

    reset_api_key(session, alice, "api-key-of-alice")  # the same key: nothing ends
    assert session_user(session, api, key, "api") is alice
    reset_api_key(session, alice)
    assert session_user(session, api, key, "api") is None
    assert session_user(session, api_session_token(alice, key), key, "api") is alice
    assert session_user(session, portal, key, "portal") is alice  # a password session

    moment = utcnow()
    before = portal_session_token(alice, key, now=moment - timedelta(microseconds=1))
    after = portal_session_token(alice, key, now=moment)
    bobs = portal_session_token(bob, key)
    end_portal_sessions(session, alice, now=moment)
    assert session_user(session, portal, key, "portal") is None
    assert session_user(session, before, key, "portal") is None
    assert session_user(session, after, key, "portal") is alice  # signed in again at once
    assert session_user(session, bobs, key, "portal") is bob  # only alice's sessions end
    set_password(session, bob, "a new password")
    assert session_user(session, bobs, key, "portal") is None
    session.commit()
    session.expire_all()  # read back from the database (UTC and microseconds on both backends)
    assert session_user(session, after, key, "portal") is alice
    assert session_user(session, before, key, "portal") is None


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
