"""How carriers sign tracking webhooks: HMAC-SHA256 over ``timestamp + "." + body`` with
the carrier's secret, hex-encoded as ``sha256=<hex>``. Pure functions, shared by the
webhook route and the simulated carrier."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from datetime import datetime, timedelta

TIMESTAMP_HEADER = "X-Carrier-Timestamp"
"""Unix time in whole seconds at which the carrier signed the request."""
SIGNATURE_HEADER = "X-Carrier-Signature"
"""``sha256=`` followed by the lowercase hex HMAC-SHA256 of ``timestamp + "." + body``."""
SCHEME = "sha256="


class SignatureRejected(ValueError):
    """The request is not provably from the carrier, or not from now."""


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return SCHEME + digest


def verify(
    secrets: Sequence[str],
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    *,
    now: datetime,
    tolerance: timedelta,
) -> None:
    """Raise ``SignatureRejected`` unless the signature matches one of the carrier's secrets
    (the current one, or the previous one while the carrier rotates) and the timestamp is
    within tolerance."""
    if isinstance(secrets, str):
        raise TypeError("secrets is a list of secrets, not one string")
    if not timestamp or not signature:
        raise SignatureRejected(f"{TIMESTAMP_HEADER} and {SIGNATURE_HEADER} are required")
    try:
        seconds = int(timestamp)
    except ValueError:
        raise SignatureRejected(f"{TIMESTAMP_HEADER} must be unix seconds") from None
    given = signature.strip().lower().encode()
    # Every secret is compared (no early exit), so timing says nothing about which matched.
    matches = [hmac.compare_digest(sign(secret, seconds, body).encode(), given) for secret in secrets]
    if not any(matches):
        raise SignatureRejected("signature does not match")
    # Checked after the signature so an attacker learns nothing about the clock.
    if abs(now.timestamp() - seconds) > tolerance.total_seconds():
        raise SignatureRejected("timestamp is too far from now; replays are refused")
