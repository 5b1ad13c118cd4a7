"""authenticate(): the client's bearer key -> a Principal with a model allowlist (globs)."""
from __future__ import annotations

import fnmatch
import hmac
from dataclasses import dataclass

from gateway.errors import AuthenticationError, PermissionDeniedError


@dataclass(frozen=True, slots=True)
class Principal:
    name: str                   # the key's config name ("" for an open gateway); never the key itself
    models: tuple[str, ...]     # glob patterns

    def may_use(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    def require(self, model: str) -> None:
        if not self.may_use(model):
            # Say nothing about which models exist.
            raise PermissionDeniedError("This API key is not allowed to use the requested model.", param="model")


OPEN = Principal("", ("*",))


@dataclass(frozen=True, slots=True)
class ClientKey:
    name: str
    secret: bytes
    models: tuple[str, ...]


def authenticate(authorization: bytes | None, keys: tuple[ClientKey, ...] | None) -> Principal:
    """None as `keys` means an open gateway. Every key is compared, in constant time each."""
    if keys is None:
        return OPEN
    if not authorization or not authorization[:7].lower() == b"bearer ":
        raise AuthenticationError("You didn't provide an API key (Authorization: Bearer <key>).")
    presented = authorization[7:].strip()
    found = None
    for key in keys:
        if hmac.compare_digest(presented, key.secret):
            found = key
    if found is None:
        raise AuthenticationError()
    return Principal(found.name, found.models)
