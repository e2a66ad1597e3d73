"""API keys, stored only as hashes.

Keys are random tokens (`dgq-hash-key --generate` makes 32 random bytes), not passwords people choose, so one SHA-256
is as good as a slow salted hash against someone who reads the configuration: guessing a 256-bit key is out of
reach either way, and salt only defeats precomputed tables of *likely* inputs. A slow hash (scrypt, PBKDF2) would
instead cost tens of milliseconds of CPU on every request and hand anyone without a key a cheap way to load the
API. So a stored key is `sha256:<64 hex digits>`, a presented key is hashed once per request, and the digest is
compared with every stored one in constant time. `hash_api_key` refuses keys short enough to guess.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

SCHEME = "sha256"
MIN_KEY_CHARS = 20
"""Shortest key `hash_api_key` accepts: 20 characters of a random base64 key are ~120 bits."""
KEY_HASH = re.compile(rf"^{SCHEME}:[0-9a-f]{{64}}$")
HASH_HELP = "make one with `dgq-hash-key` (it reads the key from stdin or a prompt and prints the line to store)"


class WeakKey(ValueError):
    """A key too short to be safe with a fast hash."""


def generate_api_key() -> str:
    """A new random API key (32 bytes, URL-safe base64)."""
    return secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """The form of `key` to store in `api_keys`: `sha256:<hex>`.

    Args:
        key (`str`): the key clients will send as `Authorization: Bearer <key>`.

    Raises:
        WeakKey: the key is shorter than `MIN_KEY_CHARS`.
    """
    if len(key) < MIN_KEY_CHARS:
        raise WeakKey(
            f"the key has {len(key)} characters; use at least {MIN_KEY_CHARS} random ones "
            "(`dgq-hash-key --generate` makes one)"
        )
    return f"{SCHEME}:{_digest(key)}"


def is_key_hash(value: str) -> bool:
    """Whether `value` is a stored key hash (`sha256:<64 hex digits>`), not a plain-text key."""
    return KEY_HASH.fullmatch(value) is not None


def key_id(key_hash: str) -> str:
    """A short name of a stored key for rate-limit buckets and logs: its first 12 hex digits (the key itself stays
    unknown: it is the hash of 256 random bits)."""
    return key_hash.removeprefix(f"{SCHEME}:")[:12]


def match_api_key(presented: str, key_hashes: list[str]) -> str | None:
    """The stored hash that `presented` matches, None when none does.

    Args:
        presented (`str`): the key a client sent.
        key_hashes (`list[str]`): the configured `sha256:<hex>` hashes.
    """
    digest = _digest(presented).encode()
    found = None
    for stored in key_hashes:  # compares with all of them, no early exit: the time says nothing about which
        if hmac.compare_digest(digest, stored.removeprefix(f"{SCHEME}:").encode()):
            found = stored
    return found


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
