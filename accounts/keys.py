"""API key format and hashing, free of Django: `rv_<prefix>_<secret>`; only sha256(secret) is ever stored."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

KEY_SCHEME = "rv"
PREFIX_HEX_CHARS = 12
# The secret is 32 random bytes (256 bits), so one unsalted sha256 is enough: nothing to brute-force.
SECRET_BYTES = 32
_KEY_RE = re.compile(
    rf"^{KEY_SCHEME}_(?P<prefix>[0-9a-f]{{{PREFIX_HEX_CHARS}}})_(?P<secret>[A-Za-z0-9_-]{{43}})$"
)


class MalformedKeyError(ValueError):
    """The presented string is not shaped like a Ruvon API key."""


@dataclass(frozen=True)
class NewKey:
    """A freshly minted key: the public prefix, the secret's hash to store, and the full key to show once."""

    prefix: str
    secret_hash: str
    plaintext: str


def hash_secret(secret: str) -> str:
    """Return the hex sha256 of a key's secret part."""
    return hashlib.sha256(secret.encode()).hexdigest()


def mint_key() -> NewKey:
    """Return a new random key with its prefix and stored hash."""
    prefix = secrets.token_hex(PREFIX_HEX_CHARS // 2)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    return NewKey(prefix=prefix, secret_hash=hash_secret(secret), plaintext=f"{KEY_SCHEME}_{prefix}_{secret}")


def split_key(plaintext: str) -> tuple[str, str]:
    """Return (prefix, secret) of a presented key, or raise MalformedKeyError."""
    match = _KEY_RE.match(plaintext.strip())
    if match is None:
        raise MalformedKeyError("API key is malformed: expected rv_<12 hex chars>_<43 url-safe chars>")
    return match["prefix"], match["secret"]


def secret_matches(secret: str, secret_hash: str) -> bool:
    """Return whether `secret` hashes to `secret_hash`, comparing in constant time."""
    return hmac.compare_digest(hash_secret(secret), secret_hash)
