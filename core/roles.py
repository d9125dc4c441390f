"""Operator and engineer: who may move thresholds, fit and change settings.

An engineer sets a PIN for a recipe; the recipe stores only a salted PBKDF2 hash of it. In
operator mode the session refuses thresholds, fitting and settings (labels stay allowed);
the PIN unlocks engineer mode. This keeps honest people from changing a line's
settings by accident; it is not protection against someone with access to the files.
"""
from __future__ import annotations

import hashlib
import hmac
import os

ENGINEER, OPERATOR = "engineer", "operator"
_ITERATIONS = 200_000


def hash_pin(pin: str, salt: bytes | None = None) -> str:
    """``pbkdf2-sha256$<iterations>$<salt hex>$<hash hex>``."""
    if len(pin) < 4:
        raise ValueError("a PIN needs at least 4 characters")
    salt = salt or os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", pin.encode(), salt, _ITERATIONS)
    return f"pbkdf2-sha256${_ITERATIONS}${salt.hex()}${digest.hex()}"


def verify_pin(pin: str, stored: str) -> bool:
    try:
        scheme, iterations, salt, digest = stored.split("$")
        if scheme != "pbkdf2-sha256":
            return False
        got = hashlib.pbkdf2_hmac("sha256", pin.encode(), bytes.fromhex(salt), int(iterations))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got.hex(), digest)
