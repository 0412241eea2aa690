"""API keys: `Authorization: Bearer KEY` (or HTTP Basic with the key as password, for browsers).

Only SHA-256 hashes of the keys are held and stored; a key itself is never logged or written.
"""

from __future__ import annotations

import base64
import os

from starlette.requests import Request

from llmbatch.jobs.files import owner_of


def keys_from_env(name: str = "LLMBATCH_API_KEYS") -> list[str]:
    return [k.strip() for k in os.environ.get(name, "").split(",") if k.strip()]


def admin_keys_from_env() -> list[str]:
    """Operator keys: every API call as any other key, plus /metrics over every owner."""
    return keys_from_env("LLMBATCH_ADMIN_KEYS")


class Unauthorized(Exception):
    def __init__(self, message: str, browser: bool = False):
        super().__init__(message)
        self.browser = browser  # a page: ask the browser for credentials (Basic) instead


class KeyCheck:
    def __init__(self, keys: list[str], admin_keys: list[str] = ()):
        self.admins = frozenset(owner_of(k) for k in admin_keys)
        self.owners = frozenset(owner_of(k) for k in keys) | self.admins

    def is_admin(self, owner: str | None) -> bool:
        """Without keys everything is visible anyway; with keys, only an operator key sees every owner."""
        return not self.enabled or owner in self.admins

    @property
    def enabled(self) -> bool:
        return bool(self.owners)

    def owner(self, request: Request, browser: bool = False) -> str | None:
        """The caller's owner hash; None when the server runs without keys. Raises Unauthorized."""
        if not self.enabled:
            return None
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        key = None
        if scheme.lower() == "bearer":
            key = credentials.strip()
        elif scheme.lower() == "basic":
            try:
                key = base64.b64decode(credentials, validate=True).decode().partition(":")[2]
            except Exception:
                key = None
        if not key:
            raise Unauthorized("missing API key: send 'Authorization: Bearer KEY'", browser)
        owner = owner_of(key)
        if owner not in self.owners:
            raise Unauthorized("invalid API key", browser)
        return owner
