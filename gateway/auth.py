"""Client and admin keys: bearer key -> Principal with a model allowlist (globs) and optional rate limits.

Keys come from env vars named in config or from a key file of SHA-256 hashes. Presented keys are hashed
and compared with every known hash in constant time, so neither timing nor early exits tell anything.
"""
from __future__ import annotations

import fnmatch
import hashlib
import hmac
from hmac import compare_digest
from dataclasses import dataclass
from pathlib import Path

import yaml

from gateway.config import ConfigError, GatewayConfig, StrictYamlLoader, resolve_secret, yaml_problem
from gateway.errors import AuthenticationError, PermissionDeniedError


ALL_MODELS = ("*",)


@dataclass(frozen=True, slots=True)
class Principal:
    name: str                   # the key's config name ("" for an open gateway); never the key itself
    models: tuple[str, ...]     # glob patterns
    rpm: int | None = None
    tpm: int | None = None
    priority: str = "normal"    # admission class (gateway/policies/admission.py)

    def may_use(self, model: str) -> bool:
        if self.models == ALL_MODELS:  # the common case, without fnmatch's per-call cost
            return True
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    def require(self, model: str) -> None:
        if self.models != ALL_MODELS and not self.may_use(model):
            # Say nothing about which models exist.
            raise PermissionDeniedError("This API key is not allowed to use the requested model.", param="model")


OPEN = Principal("", ("*",))


@dataclass(frozen=True, slots=True)
class ClientKey:
    digest: bytes               # sha256 of the key
    principal: Principal


def digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def bearer(authorization: bytes | None) -> bytes | None:
    if not authorization or authorization[:7].lower() != b"bearer ":
        return None
    return authorization[7:].strip() or None


def match_key(presented: bytes, digests: list[bytes]) -> int:
    """Index of the matching digest or -1; every digest is compared, whatever matched."""
    presented_digest, found = digest(presented), -1
    for index, known in enumerate(digests):
        if hmac.compare_digest(presented_digest, known):
            found = index
    return found


def authenticate(authorization: bytes | None, keys: tuple[ClientKey, ...] | None) -> Principal:
    """None as `keys` means an open gateway."""
    if keys is None:
        return OPEN
    presented = bearer(authorization)
    if presented is None:
        raise AuthenticationError("You didn't provide an API key (Authorization: Bearer <key>).")
    presented_digest, found = hashlib.sha256(presented).digest(), None
    for key in keys:  # match_key() without a list per request: every digest is compared, whatever matched
        if compare_digest(presented_digest, key.digest):
            found = key
    if found is None:
        raise AuthenticationError()
    return found.principal


def load_client_keys(config: GatewayConfig) -> tuple[ClientKey, ...] | None:
    auth = config.auth
    if auth.client_keys is None and auth.key_file is None:
        return None
    keys = []
    for key in auth.client_keys or ():
        secret = resolve_secret(key.key_env)
        if secret is None:
            raise ConfigError(f"auth.client_keys[{key.name}]: the env var {key.key_env} is not set")
        keys.append(ClientKey(digest(secret.encode()), Principal(key.name, key.models, key.rpm, key.tpm, key.priority)))
    if auth.key_file is not None:
        keys.extend(read_key_file(Path(auth.key_file)))
    return tuple(keys)


def read_key_file(path: Path) -> list[ClientKey]:
    """A YAML list of `{name, sha256, models, rpm, tpm}`; `kimi-gateway hash-key` prints the sha256."""
    try:
        entries = yaml.load(path.read_text(), Loader=StrictYamlLoader)  # noqa: S506 (a SafeLoader)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the key file: {exc.strerror}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        problem = yaml_problem(exc) if isinstance(exc, yaml.YAMLError) else "not UTF-8 text"
        raise ConfigError(f"{path}: the key file is {problem}") from exc
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: expected a list of keys")
    keys = []
    for index, entry in enumerate(entries):
        hexdigest = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(hexdigest, str) or len(hexdigest) != 64:
            raise ConfigError(f"{path}: [{index}].sha256: expected 64 hex digits (kimi-gateway hash-key)")
        try:
            raw = bytes.fromhex(hexdigest)
        except ValueError as exc:
            raise ConfigError(f"{path}: [{index}].sha256: not hexadecimal") from exc
        name = str(entry.get("name") or f"key-{index}")
        models = entry.get("models") or ["*"]
        if not isinstance(models, list) or not all(isinstance(model, str) for model in models):
            raise ConfigError(f"{path}: [{index}].models: expected a list of model names")
        models = tuple(models)
        for limit in ("rpm", "tpm"):
            value = entry.get(limit)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{path}: [{index}].{limit}: expected a whole number of 1 or more")
        priority = entry.get("priority", "normal")
        if priority not in ("high", "normal", "low"):
            raise ConfigError(f"{path}: [{index}].priority: expected high, normal or low")
        keys.append(ClientKey(raw, Principal(name, models, entry.get("rpm"), entry.get("tpm"), priority)))
    return keys


def load_admin_digests(config: GatewayConfig) -> list[bytes]:
    """Comma-separated admin keys from the named env var; none configured = the admin API refuses all."""
    value = resolve_secret(config.auth.admin_keys_env) or ""
    return [digest(key.strip().encode()) for key in value.split(",") if key.strip()]
