"""Sortable opaque ids: a prefix, then 26 lowercase Crockford base32 characters (ULID layout:
48 bits of milliseconds, 80 random bits), so ordering by id is ordering by creation time."""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # ascending in ASCII: string order = numeric


def new_id(prefix: str) -> str:
    value = (int(time.time() * 1000) << 80) | secrets.randbits(80)
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return f"{prefix}_{''.join(reversed(chars))}"
