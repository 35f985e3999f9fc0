"""Encryption at rest for stored orders: Fernet, several keys for rotation (MultiFernet).

The first key encrypts; every key decrypts, so an operator rotates by putting a new key first,
restarting, and removing the old key once no order sealed with it is left.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic import SecretStr


class SealError(Exception):
    """A sealed body that no configured key opens (a wrong key, or damaged data)."""


class Sealer:
    def __init__(self, keys: Sequence[SecretStr]) -> None:
        if not keys:
            raise ValueError("the outbox needs at least one key")
        fernets = [Fernet(key.get_secret_value()) for key in keys]
        self._first = fernets[0]
        self._fernet = MultiFernet(fernets)

    def seal(self, data: bytes) -> bytes:
        return self._fernet.encrypt(data)

    def open(self, sealed: bytes) -> bytes:
        try:
            return self._fernet.decrypt(sealed)
        except InvalidToken:
            raise SealError("no configured outbox key opens this body") from None

    def is_current(self, sealed: bytes) -> bool:
        """Whether the first key, the one that seals now, opens ``sealed``."""
        try:
            self._first.decrypt(sealed)
        except InvalidToken:
            return False
        return True


def new_key() -> str:
    """A fresh Fernet key (``gateway new-secret outbox``)."""
    return Fernet.generate_key().decode("ascii")
