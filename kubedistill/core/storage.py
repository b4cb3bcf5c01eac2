"""One interface for artifacts on a local disk or in S3 (AWS, MinIO, SeaweedFS...).

Built on `pyarrow.fs`, which Ray Data also reads and writes through, so a stage hands the same
filesystem object to `ray.data.read_parquet(..., filesystem=fs)`.

- Writes are atomic: a local file is written beside its target and renamed into place; an S3 object
  only becomes visible when its upload completes. A reader never sees half a file.
- S3 credentials come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, which the
  operator fills from `spec.storage.secretRef`); the endpoint from `spec.storage.endpoint` or
  AWS_ENDPOINT_URL; the region from `spec.storage.region`, AWS_REGION, or us-east-1.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A storage operation failed; the message says which URI and what to check."""


@dataclass(frozen=True)
class S3Options:
    endpoint: str | None = None
    region: str | None = None
    # Explicit credentials (the operator reads them from a run's secretRef); None → the environment's.
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, endpoint: str | None = None, region: str | None = None) -> S3Options:
        return cls(
            endpoint=endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            region=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        )


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def filesystem_for(uri: str, options: S3Options | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, file:// URI or s3://bucket/key URI."""
    if is_s3(uri):
        opts = options or S3Options.from_env()
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise StorageError(f"{uri}: an s3:// URI needs a bucket, e.g. s3://bucket/prefix")
        kwargs: dict[str, Any] = {"region": opts.region}
        if opts.endpoint:
            ep = urlparse(opts.endpoint)
            kwargs["endpoint_override"] = ep.netloc or ep.path
            kwargs["scheme"] = ep.scheme or "https"
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if opts.access_key and opts.secret_key:
            kwargs.update(access_key=opts.access_key, secret_key=opts.secret_key)
        elif key and secret:
            kwargs.update(access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN"))
        return _s3(tuple(sorted(kwargs.items()))), (parsed.netloc + parsed.path).rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported scheme; use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())


@functools.lru_cache(maxsize=32)
def _s3(settings: tuple[tuple[str, Any], ...]) -> pafs.S3FileSystem:
    """One S3 filesystem (and its pool of connections) per endpoint and credentials, shared by every Storage
    that uses them: the operator reconciles thousands of runs against a few stores, and a new filesystem per
    run would open a new connection, one more round trip, each time. With delayed open, an object smaller
    than a multipart part is written with one request (an error then surfaces when the stream closes, still
    inside `write_bytes`)."""
    try:  # a small object in one PutObject, not a three-request multipart upload (pyarrow >= 16)
        return pafs.S3FileSystem(**dict(settings), allow_delayed_open=True)
    except TypeError:
        return pafs.S3FileSystem(**dict(settings))


#: what a credentials error says; "403" only as a status code (an object key, a probe's random hex, may hold the digits)
_CREDENTIALS = re.compile(r"access_?denied|invalidaccesskey|signature|forbidden|\b403\b")


def _explain(uri: str, err: Exception) -> StorageError:
    text = str(err).strip()
    low = text.lower()
    hint = ""
    if _CREDENTIALS.search(low):
        hint = " Check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or spec.storage.secretRef)."
    elif any(k in low for k in ("no_such_bucket", "nosuchbucket")):
        hint = " The bucket does not exist: create it first."
    elif any(k in low for k in ("network", "connect", "curl", "timed out", "resolve")):
        hint = " Is the S3 endpoint reachable? Check spec.storage.endpoint or AWS_ENDPOINT_URL."
    return StorageError(f"{uri}: {text}{hint}")


def relative_key(rel: str) -> str:
    """`rel` when it names something under a root: not absolute, no `..` segment, no NUL. An object store allows
    such keys (`model/../../x` is a valid S3 key); copied to a local directory they would escape it."""
    parts = rel.replace("\\", "/").split("/")
    if rel.startswith("/") or ".." in parts or "\x00" in rel:
        raise ValueError(f"{rel!r} is not a relative key under the prefix (absolute, '..' or NUL)")
    return rel


class Storage:
    """Artifacts under one root URI. Paths given to methods are relative to the root, '/'-separated."""

    def __init__(self, root_uri: str, options: S3Options | None = None):
        self.root_uri = root_uri.rstrip("/")
        self.options = options or S3Options.from_env()
        self.fs, self._root = filesystem_for(self.root_uri, self.options)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    # -- naming ---------------------------------------------------------------------------
    def uri(self, rel: str = "") -> str:
        return posixpath.join(self.root_uri, relative_key(rel)) if rel else self.root_uri

    def path(self, rel: str = "") -> str:
        """The path inside `self.fs` (what pyarrow and Ray Data take with `filesystem=self.fs`)."""
        return posixpath.join(self._root, relative_key(rel)) if rel else self._root

    def child(self, rel: str) -> Storage:
        return Storage(self.uri(rel), self.options)

    # -- reads ----------------------------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        try:
            return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound
        except OSError as e:
            raise _explain(self.uri(rel), e) from e

    def is_file(self, rel: str = "") -> bool:
        try:
            return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File
        except OSError as e:
            raise _explain(self.uri(rel), e) from e

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError as e:
            raise FileNotFoundError(self.uri(rel)) from e
        except OSError as e:
            raise _explain(self.uri(rel), e) from e

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def dirs(self, rel: str = "") -> list[str]:
        """Names of the directories (prefixes) directly under `rel`, sorted. Missing directory: empty list."""
        base = self.path(rel)
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=True))
        except OSError as e:
            raise _explain(self.uri(rel), e) from e
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def list(self, rel: str = "", recursive: bool = True) -> list[str]:
        """Files under `rel`, relative to the root, sorted. Missing directory: empty list."""
        base = self.path(rel)
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=recursive, allow_not_found=True))
        except OSError as e:
            raise _explain(self.uri(rel), e) from e
        root = self._root.rstrip("/") + "/"
        return sorted(i.path[len(root) :] for i in infos if i.type == pafs.FileType.File)

    # -- writes ---------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> str:
        target = self.path(rel)
        try:
            if self.local:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            else:
                with self.fs.open_output_stream(target) as f:
                    f.write(data)
        except OSError as e:
            raise _explain(self.uri(rel), e) from e
        return self.uri(rel)

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode())

    def delete(self, rel: str) -> None:
        """Delete a file or a whole directory (prefix). Missing: no error."""
        target = self.path(rel)
        try:
            info = self.fs.get_file_info(target)
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(target)
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(target)
        except OSError as e:
            raise _explain(self.uri(rel), e) from e

    def check_writable(self) -> None:
        """Fail early, with a useful message, if the root cannot be written (bad credentials, no bucket)."""
        probe = f".kubedistill-probe-{uuid.uuid4().hex[:8]}"
        self.write_bytes(probe, b"ok")
        self.delete(probe)
