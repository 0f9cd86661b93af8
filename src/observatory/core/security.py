"""API keys and secrets: generated with ``secrets``, stored only as scrypt hashes."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict

# scrypt cost: interactive-login strength (about 16 MiB and tens of ms per check).
_SCRYPT_N = 2**14
_SCRYPT_R = 8
_SCRYPT_P = 1
_SCRYPT_DKLEN = 32


def new_api_key() -> str:
    """A fresh random API key (URL-safe text, 256 bits)."""
    return secrets.token_urlsafe(32)


def _utf8(text: str) -> bytes:
    """``text`` as UTF-8, lone surrogates too (a JSON body may hold ``"\\ud800"``): a secret
    that is not valid text simply matches nothing, rather than failing the request."""
    return text.encode("utf-8", "surrogatepass")


def hash_secret(secret: str) -> str:
    """Hash ``secret`` for storage: ``scrypt$N$r$p$<salt hex>$<hash hex>``."""
    if not secret:
        raise ValueError("a secret must not be empty")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        _utf8(secret), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=_SCRYPT_DKLEN
    )
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


#: Secrets that verified recently, as keyed digests of (stored hash, secret): scrypt is
#: deliberately slow, and a robot that triggers or logs in often should pay for it once.
_VERIFIED: OrderedDict[bytes, None] = OrderedDict()
_VERIFIED_MAX = 1024
_VERIFIED_KEY = secrets.token_bytes(32)
_VERIFIED_LOCK = threading.Lock()


def verify_secret(secret: str, stored: str) -> bool:
    """Whether ``secret`` matches a hash made by :func:`hash_secret` (constant-time compare).

    Successful checks are remembered in this process (a keyed digest, never the
    secret), so repeating one costs microseconds; a changed hash is a new entry.
    """
    remembered = hmac.new(_VERIFIED_KEY, _utf8(f"{stored}\0{secret}"), "sha256").digest()
    with _VERIFIED_LOCK:
        if remembered in _VERIFIED:
            _VERIFIED.move_to_end(remembered)
            return True
    if not _verify_scrypt(secret, stored):
        return False
    with _VERIFIED_LOCK:
        _VERIFIED[remembered] = None
        if len(_VERIFIED) > _VERIFIED_MAX:
            _VERIFIED.popitem(last=False)
    return True


def _verify_scrypt(secret: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt_hex, digest_hex = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    candidate = hashlib.scrypt(
        _utf8(secret),
        salt=bytes.fromhex(salt_hex),
        n=int(n),
        r=int(r),
        p=int(p),
        dklen=len(digest_hex) // 2,
    )
    return hmac.compare_digest(candidate.hex(), digest_hex)


def key_fingerprint(secret: str) -> str:
    """A non-secret lookup handle for a key (first 16 hex of its SHA-256).

    Lets the server find the one row to verify with scrypt instead of trying
    every user's hash.
    """
    return hashlib.sha256(_utf8(secret)).hexdigest()[:16]


def texts_match(received: str, expected: str) -> bool:
    """Whether a secret text from a request equals the expected one, in constant time.

    Any text compares (as UTF-8): ``hmac.compare_digest`` raises for a string holding
    non-ASCII characters, which a forged cookie or token may.
    """
    return hmac.compare_digest(
        received.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def sign_value(value: str, key: bytes, *, now_s: float | None = None) -> str:
    """``value`` with a timestamp and an HMAC-SHA256 signature: ``value.timestamp.signature``."""
    timestamp = str(int(time.time() if now_s is None else now_s))
    payload = f"{value}.{timestamp}"
    signature = hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()
    return f"{payload}.{signature}"


def unsign_value(
    token: str, key: bytes, *, max_age_s: float, now_s: float | None = None
) -> str | None:
    """The value of a token made by :func:`sign_value`; None if forged, malformed or too old."""
    try:
        value, timestamp, signature = token.rsplit(".", 2)
        issued_s = int(timestamp)
    except ValueError:
        return None
    payload = f"{value}.{timestamp}".encode("utf-8", "surrogatepass")
    if not texts_match(signature, hmac.new(key, payload, hashlib.sha256).hexdigest()):
        return None
    age_s = (time.time() if now_s is None else now_s) - issued_s
    if not 0 <= age_s <= max_age_s:
        return None
    return value
