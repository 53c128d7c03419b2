"""API keys: per-tenant and admin credentials, stored hashed in REGISTRY/keys.toml.

A key reads ``muse_<id>_<secret>``.  The file keeps the id, the tenant (or
``admin = true``) and sha256(secret); the secret itself is shown once, by
`muse keys add`, and never stored.  Clients send it as
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.  The id selects the
record and the digests are compared with ``hmac.compare_digest``, so timing
tells an attacker nothing about how much of a secret was right.  A key that
verified once is remembered (id -> secret, compared the same way) until
keys.toml changes: a sha256 per request cost ~3 us (measured in-process)."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import pathlib
import secrets

import msgspec

from muse.calib.names import LimitError, check_tenant, parse_document


class KeyRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    id: str
    sha256: str
    tenant: str | None = None  # a tenant name (muse.calib.names.check_tenant)
    admin: bool = False
    created_at: str = ""
    metrics: bool = False  # may read /metrics when the server asks for a credential there

    def __post_init__(self) -> None:
        if self.tenant is not None:
            check_tenant(self.tenant, f"key {self.id}: tenant")


class KeyFile(msgspec.Struct, forbid_unknown_fields=True):
    keys: list[KeyRecord] = []


class Principal(msgspec.Struct, frozen=True):
    key_id: str
    tenant: str | None  # None: any tenant (an admin key, or no key with auth off)
    admin: bool
    metrics: bool = False


# A request without a key when auth is off: it may score for any tenant, and nothing more (the
# admin API still wants an admin key).
ANONYMOUS = Principal("-", None, False)


class AuthError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def keys_path(registry_root: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(registry_root) / "keys.toml"


def read_keys(path: pathlib.Path) -> KeyFile:
    try:
        return msgspec.convert(parse_document(path.read_bytes(), str(path), toml=True), KeyFile)
    except FileNotFoundError:
        return KeyFile()
    except (msgspec.ValidationError, msgspec.DecodeError, LimitError) as exc:
        raise ValueError(f"{path}: {exc}; fix or remove the entry (keys are managed with `muse keys`)") from None


def write_keys(path: pathlib.Path, keys: KeyFile) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(msgspec.toml.encode(keys))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def add_key(path: pathlib.Path, tenant: str | None, admin: bool, metrics: bool = False) -> tuple[KeyRecord, str]:
    """Store a new key's hash; returns the record and the one-time plain key."""
    if (tenant is not None) + admin + metrics != 1:
        raise ValueError(
            "a key is for one tenant (--tenant T), for the admin API (--admin) or for reading /metrics (--metrics)"
        )
    if tenant is not None:
        check_tenant(tenant, "--tenant")
    keys = read_keys(path)
    key_id = secrets.token_hex(4)
    secret = secrets.token_urlsafe(24).replace("_", "-")
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record = KeyRecord(key_id, _digest(secret), tenant, admin, now, metrics)
    keys.keys.append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_keys(path, keys)
    return record, f"muse_{key_id}_{secret}"


def revoke_key(path: pathlib.Path, key_id: str) -> KeyRecord:
    keys = read_keys(path)
    matches = [k for k in keys.keys if k.id == key_id]
    if not matches:
        raise ValueError(f"{path}: no key with id {key_id!r} (list them with `muse keys list`)")
    keys.keys = [k for k in keys.keys if k.id != key_id]
    write_keys(path, keys)
    return matches[0]


class Authenticator:
    """Resolves a request's credential; reloads keys.toml when it changes.  With ``required``
    False (auth off), a request without a credential is ANONYMOUS, and one with a credential
    is checked as usual (an admin key still opens the admin API)."""

    def __init__(self, path: pathlib.Path, required: bool = True):
        self.path = path
        self.required = required
        self._mtime: int | None = None
        # (id -> record, key id -> (secret, principal) verified under those records): replaced as
        # one pair, so a key verified against records a reload just dropped is not remembered.
        self._keys: tuple[dict[str, KeyRecord], dict[bytes, tuple[bytes, Principal]]] = ({}, {})
        self.reload()

    def reload(self) -> bool:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime == self._mtime:
            return False
        self._keys = ({k.id: k for k in read_keys(self.path).keys}, {})
        self._mtime = mtime
        return True

    def authenticate(self, headers: dict[bytes, bytes]) -> Principal:
        raw = headers.get(b"authorization")
        if raw is not None:
            scheme, _, token = raw.partition(b" ")
            if scheme.lower() != b"bearer":
                raise AuthError(401, "authorization: expected 'Bearer <key>'")
        else:
            api_key = headers.get(b"x-api-key")
            if api_key is None:
                if not self.required:
                    return ANONYMOUS
                raise AuthError(401, "authorization: missing credential; send 'Authorization: Bearer <key>'")
            token = api_key
        prefix, _, rest = token.strip().partition(b"_")
        key_id, _, secret = rest.partition(b"_")
        records, remembered = self._keys
        verified = remembered.get(key_id)
        if verified is not None and prefix == b"muse" and hmac.compare_digest(secret, verified[0]):
            return verified[1]
        record = records.get(key_id.decode("latin-1")) if prefix == b"muse" else None
        if record is None or not hmac.compare_digest(hashlib.sha256(secret).hexdigest(), record.sha256):
            raise AuthError(401, "authorization: unknown or revoked key")
        principal = Principal(record.id, record.tenant, record.admin, record.metrics)
        remembered[key_id] = (secret, principal)
        return principal
