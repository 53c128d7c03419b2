"""Object storage for a registry at a URL (``s3://bucket/prefix``): the few calls the registry
needs, over obstore (Rust's object_store), with errors that name the URL and the fix.

Why obstore (bench/object_store.py, the README's "Object-store client"): one wheel with no
Python dependencies, conditional writes in its public API (create-if-absent for claiming a
generation, If-Match for moving `current`), and conditional reads (If-None-Match) for the
poll every replica makes four times a second.

Credentials, region and endpoint come from the standard environment, as every AWS tool reads
them: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION,
AWS_ENDPOINT_URL (an S3-compatible server; plain http is allowed only for an endpoint given
as http://, e.g. a test server on loopback)."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import re
from typing import Any

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    NotModifiedError,
    PreconditionError,
)
from obstore.store import ObjectStore as _Store
from obstore.store import S3Store, from_url

SCHEMES = ("s3", "gs", "az")
MAX_OBJECT_BYTES = 2 << 30  # a larger object in a registry is a mistake, not a model: refused before its bytes
SHA256 = "sha256"  # user metadata every object we write carries: the mirror checks downloads against it
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,221}[a-z0-9]$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._\-=]{1,255}$")
_RETRY: Any = {"max_retries": 3, "retry_timeout": datetime.timedelta(seconds=20)}
_HINTS = {
    "s3": "credentials and endpoint come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and "
    "AWS_ENDPOINT_URL",
    "gs": "credentials come from GOOGLE_SERVICE_ACCOUNT (a key file) or the machine's service account",
    "az": "credentials come from AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or a managed identity)",
}


def _hint(scheme: str) -> str:
    return _HINTS.get(scheme, _HINTS["s3"])


def _first_line(exc: BaseException) -> str:
    """obstore's messages carry a multi-line debug dump: the first line says what happened."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class StoreError(OSError):
    """The object store could not do what was asked; the message names the URL and the fix."""


class ObjectMissing(StoreError):
    pass


class ObjectExists(StoreError):
    """A create-if-absent found the key taken."""


class ObjectChanged(StoreError):
    """A write conditional on an ETag found the object changed (or gone)."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str | None


@dataclasses.dataclass(frozen=True)
class Blob:
    data: bytes
    etag: str | None
    sha256: str | None  # as written by us; None for an object another tool wrote


def parse_url(url: str) -> tuple[str, str, str]:
    """(scheme, bucket, prefix) of ``scheme://bucket[/prefix]``; ValueError naming the rule."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"registry URL {url!r}: use {' or '.join(s + '://BUCKET/PREFIX' for s in SCHEMES)}")
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET_RE.match(bucket):
        raise ValueError(f"registry URL {url!r}: bucket {bucket!r} is not a valid bucket name")
    for segment in prefix.split("/") if prefix else ():
        if not _SEGMENT_RE.match(segment) or segment in (".", ".."):
            raise ValueError(
                f"registry URL {url!r}: prefix part {segment!r} must be letters, digits, '.', '_', '-' or '=' "
                "(not '.' or '..')"
            )
    return scheme, bucket, prefix


class ObjectStore:
    """Keys are relative to the URL's prefix, '/'-separated."""

    def __init__(self, url: str):
        scheme, bucket, prefix = parse_url(url)
        self.url = f"{scheme}://{bucket}" + (f"/{prefix}" if prefix else "")
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
        client: Any = {"timeout": "30s", "connect_timeout": "5s"}
        if endpoint.startswith("http://"):
            client["allow_http"] = True
        self._store: _Store
        try:
            if scheme == "s3":
                self._store = S3Store(bucket, prefix=prefix or None, client_options=client, retry_config=_RETRY)
            else:  # Google Cloud Storage, Azure: obstore reads their standard environment likewise
                self._store = from_url(self.url, client_options=client, retry_config=_RETRY)
        except (BaseError, ValueError) as exc:  # e.g. a missing account name, a malformed setting
            raise StoreError(f"{self.url}: cannot use the store ({_first_line(exc)}); {_hint(scheme)}") from None

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    def where(self, key: str) -> str:
        return f"{self.url}/{key}"

    def _failed(self, what: str, key: str, exc: BaseException) -> StoreError:
        return StoreError(
            f"{self.where(key)}: {what} failed ({type(exc).__name__}: {_first_line(exc)}); {_hint(self.url[:2])}"
        )

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        try:
            found = []
            for page in obstore.list(self._store, prefix or None, chunk_size=1000):
                found += [ObjectInfo(m["path"], m["size"], m["e_tag"]) for m in page]
            return found
        except (BaseError, FileNotFoundError) as exc:  # e.g. no such bucket
            raise self._failed("listing", prefix, exc) from None

    def head(self, key: str) -> ObjectInfo | None:
        """The object's size and ETag; None when absent."""
        try:
            meta = obstore.head(self._store, key)
        except FileNotFoundError:
            return None
        except BaseError as exc:
            raise self._failed("reading", key, exc) from None
        return ObjectInfo(meta["path"], meta["size"], meta["e_tag"])

    def get(self, key: str, if_none_match: str | None = None) -> Blob | None:
        """The object; None when ``if_none_match`` is its ETag (unchanged); ObjectMissing if absent."""
        options: dict[str, Any] = {"if_none_match": if_none_match} if if_none_match else {}
        try:
            result = obstore.get(self._store, key, options=options)  # type: ignore[arg-type]
            size = result.meta["size"]
            if size > MAX_OBJECT_BYTES:  # before its bytes: they would be held in memory whole
                raise StoreError(
                    f"{self.where(key)}: {size:,} bytes, more than the {MAX_OBJECT_BYTES:,} an object of a "
                    "registry may hold; remove it"
                )
            data = bytes(result.bytes())
        except NotModifiedError:
            return None
        except FileNotFoundError:
            raise ObjectMissing(f"{self.where(key)}: no such object") from None
        except BaseError as exc:
            raise self._failed("reading", key, exc) from None
        attrs: dict[str, Any] = dict(result.attributes)
        return Blob(data, result.meta["e_tag"], attrs.get(SHA256))

    def put(self, key: str, data: bytes, *, create: bool = False, if_match: str | None = None) -> str | None:
        """Write ``data`` with its sha256; returns the new ETag.  ``create``: only if the key is
        free (ObjectExists otherwise); ``if_match``: only if the object still has that ETag
        (ObjectChanged otherwise)."""
        mode: Any = "create" if create else {"e_tag": if_match} if if_match else "overwrite"
        try:
            result = obstore.put(self._store, key, data, mode=mode, attributes={SHA256: sha256(data)})
        except AlreadyExistsError:
            raise ObjectExists(f"{self.where(key)} already exists") from None
        except (PreconditionError, FileNotFoundError):
            raise ObjectChanged(f"{self.where(key)} changed since it was read") from None
        except BaseError as exc:
            raise self._failed("writing", key, exc) from None
        return result["e_tag"]

    def delete(self, key: str) -> None:
        try:
            obstore.delete(self._store, key)
        except BaseError as exc:
            raise self._failed("deleting", key, exc) from None
