"""Who may act on the console: the operator's session cookie and the forms' CSRF tokens (pure).

Sessions are stateless on purpose: with ``serve --workers N`` the kernel hands each connection to
any worker, so every worker must accept a cookie another one issued. A session is
``{issued}.{nonce}.{mac}``, the MAC an HMAC-SHA256 under a key derived from the operator's token:
the token itself is never in the cookie, and a new token voids every session at once (a reload).
A form's CSRF token is an HMAC of the session under the same key, so it is bound to the session.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Final

SESSION_COOKIE: Final = "gateway_console"
SESSION_MAX_AGE_S: Final = 12 * 3600
# A session issued "in the future" by more than this (clock steps between workers) is refused.
CLOCK_SLACK_S: Final = 60
_CONTEXT: Final = b"telemed-gateway console v1\x00"
_SESSION: Final = re.compile(r"[0-9]{1,12}\.[0-9a-f]{1,64}\.[0-9a-f]{64}")


def _key(token: str) -> bytes:
    return hashlib.sha256(_CONTEXT + token.encode("utf-8")).digest()


def _mac(token: str, message: str) -> str:
    return hmac.new(_key(token), message.encode("ascii"), hashlib.sha256).hexdigest()


def is_operator_token(presented: str, token: str) -> bool:
    """Whether the login form's token is the operator's (constant time, whatever the lengths)."""
    presented_digest = hashlib.sha256(presented.strip().encode("utf-8")).digest()
    return hmac.compare_digest(presented_digest, hashlib.sha256(token.encode("utf-8")).digest())


def build_session(token: str, now: float, nonce: str) -> str:
    """A session cookie value issued at ``now``; ``nonce`` is fresh randomness (hex)."""
    issued = str(int(now))
    return f"{issued}.{nonce}.{_mac(token, f'session|{issued}|{nonce}')}"


def is_valid_session(value: str | None, token: str, now: float) -> bool:
    """Whether ``value`` is a session this gateway issued with ``token``, not yet expired."""
    if not value or not _SESSION.fullmatch(value):
        return False
    issued, nonce, mac = value.split(".")
    if not hmac.compare_digest(mac, _mac(token, f"session|{issued}|{nonce}")):
        return False
    age = now - int(issued)
    return -CLOCK_SLACK_S <= age < SESSION_MAX_AGE_S


def build_csrf(token: str, session: str) -> str:
    """The CSRF token for the forms of ``session``."""
    return _mac(token, f"csrf|{session}")


def is_valid_csrf(presented: str | None, token: str, session: str) -> bool:
    if not presented:
        return False
    expected = build_csrf(token, session)
    return hmac.compare_digest(presented.encode("ascii", "replace"), expected.encode("ascii"))
