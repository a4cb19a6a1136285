"""CloudStack's request signature, checked the way ApiServer.verifyRequest checks it."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime
from urllib.parse import quote

_EXPIRES_FORMATS = ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S.%f%z")


def java_urlencode(value: str) -> str:
    """java.net.URLEncoder.encode(value, UTF-8) with + turned into %20.

    Java leaves only letters, digits and ``.-*_`` alone; Python's quote also spares ``~``.
    """
    return quote(value, safe="*").replace("~", "%7E")


def string_to_sign(params: Mapping[str, str]) -> str:
    """Every parameter but the signature, sorted by name (case-sensitive), lowercased."""
    parts = [
        f"{name}={java_urlencode(params[name])}"
        for name in sorted(params)
        if name.lower() != "signature"
    ]
    return "&".join(parts).lower()


def sign(params: Mapping[str, str], secret: str) -> str:
    """The base64 HMAC-SHA1 signature of ``params`` with ``secret``."""
    digest = hmac.new(secret.encode(), string_to_sign(params).encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def parse_expires(value: str) -> datetime | None:
    """An ``expires`` value such as 2026-01-01T12:00:00+0000, or None when malformed."""
    for fmt in _EXPIRES_FORMATS:
        try:
            return datetime.strptime(value, fmt)
        except ValueError:
            continue
    return None


def verify(params: Mapping[str, str], secrets: Mapping[str, str], now: datetime) -> bool:
    """Whether the request is signed by a known api key and, with version 3, not expired.

    ``secrets`` maps api keys to secret keys; ``now`` must be timezone-aware.
    """
    signature = api_key = version = expires = None
    for name, value in params.items():
        lowered = name.lower()
        if lowered == "signature":
            signature = value
        elif lowered == "apikey":
            api_key = value
        elif lowered == "signatureversion":
            version = value
        elif lowered == "expires":
            expires = value
    if signature is None or api_key is None:
        return False
    if version == "3":
        if expires is None:
            return False
        expires_at = parse_expires(expires)
        if expires_at is None or expires_at < now:
            return False
    secret = secrets.get(api_key)
    if secret is None:
        return False
    return hmac.compare_digest(sign(params, secret).encode(), signature.encode())
