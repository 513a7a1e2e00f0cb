"""Artifact storage: models, datasets, checkpoints and adapters behind one interface.

Everything kubetune reads or writes is named by a URI:

- ``s3://bucket/key`` — any S3-compatible store (AWS, MinIO, Ceph RGW, ...)
  through boto3 with ``endpoint_url``; credentials only from the environment;
  retries with backoff on transient errors; multipart above 64 MiB.
- ``file:///path`` — a local folder (laptops, tests, mounted volumes).
- ``pvc://claim/path`` — a PersistentVolumeClaim mounted at
  ``$KUBETUNE_PVC_ROOT/<claim>`` (``/mnt/pvc`` in pods).
- ``hf://org/name`` — read-only, a model hub through ``huggingface_hub``
  (honours ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``).

Published artifacts are write-once: writing a different file over an existing
one is refused (:class:`WriteOnceError`); writing the same bytes again is a
no-op, so a retried publish converges. The write itself is conditional where
the store can make it so (S3's ``If-None-Match: *``, a hard link in a folder),
so of two writers that both found a key free only the first lands. Every
object records its sha256, which is what digests are built from.

This module is light (boto3, no torch) so the operator can read progress and
reports with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlparse

_CHUNK = 1024 * 1024
MULTIPART_THRESHOLD = 64 * 1024 * 1024
_T = TypeVar("_T")


class StorageError(Exception):
    """The store could not be reached or answered with an error; retrying may help."""


class NotFoundError(StorageError):
    """The object does not exist."""


class WriteOnceError(Exception):
    """An artifact already exists with different content; it is never overwritten."""


class InvalidURIError(ValueError):
    """The URI has no supported scheme or is malformed."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def digest_of_files(files: dict[str, str]) -> str:
    """``sha256:`` over the canonical listing of relative path -> sha256 hex."""
    canonical = json.dumps(dict(sorted(files.items())), separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def digest_of_dir(root: Path) -> tuple[str, dict[str, str]]:
    """The folder's digest and the sha256 of each file in it.

    Hidden paths (``.cache/`` of the hub client, ``.git/``) are bookkeeping, not content.
    """
    files = {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }
    return digest_of_files(files), files


def uri_name(uri: str) -> str:
    """The last segment of a URI's path (``s3://b/data/train.jsonl`` -> ``train.jsonl``), else the URI."""
    return urlparse(uri).path.rstrip("/").rsplit("/", 1)[-1] or uri


def join(uri: str, *parts: str) -> str:
    """Join URI path segments with exactly one slash between them."""
    out = uri.rstrip("/")
    for part in parts:
        out += "/" + part.strip("/")
    return out


@dataclass(frozen=True)
class S3Settings:
    endpoint: str | None = None
    region: str = "us-east-1"
    # Tries per call; waits between them double from 0.5 s up to 8 s (6 tries span ~15 s).
    attempts: int = 6
    # Per request; the operator uses short ones, so one tenant's unreachable store cannot hold it up.
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    # Explicit credentials (the operator reads a FineTune's Secret); None: the environment's.
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)


_CLIENTS: dict[S3Settings, Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _s3_client(settings: S3Settings) -> Any:
    """One boto3 client per settings, shared by threads (boto3 clients are thread-safe).

    Creating one costs tens of milliseconds of CPU, and boto3's default session
    is not thread-safe: clients are created one at a time, each only once.
    """
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(settings)
        if client is None:
            if len(_CLIENTS) >= 64:
                _CLIENTS.clear()
            client = _CLIENTS[settings] = _new_s3_client(settings)
        return client


def warm_up() -> None:
    """Load boto3 and the S3 service model now, not on the first request (for long-running processes).

    Makes no request. The first client of a process costs ~0.1 s of CPU; later ones reuse what it loaded.
    """
    _new_s3_client(S3Settings(endpoint="http://127.0.0.1:1", access_key="warm-up", secret_key="warm-up"))


def _new_s3_client(settings: S3Settings) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or None,
        region_name=settings.region,
        aws_access_key_id=settings.access_key,
        aws_secret_access_key=settings.secret_key,
        aws_session_token=settings.session_token,
        config=Config(
            # One retry policy, ours (S3Store._call), rather than two multiplying each other.
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            s3={"addressing_style": "path"},
            signature_version="s3v4",
        ),
    )


class Store(ABC):
    """One bucket or folder. Keys are ``/``-separated paths below its root."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes, *, sha256: str | None = None) -> None: ...

    @abstractmethod
    def download(self, key: str, dest: Path) -> None: ...

    @abstractmethod
    def upload(self, src: Path, key: str, *, sha256: str) -> None: ...

    @abstractmethod
    def upload_new(self, src: Path, key: str, *, sha256: str) -> bool:
        """Upload ``src`` only where ``key`` does not exist; False when it does (nothing written then)."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (full keys, sorted)."""

    @abstractmethod
    def stored_sha256(self, key: str) -> str | None:
        """The sha256 recorded for ``key``, or None when the key does not exist."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int: ...


class FileStore(Store):
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in (path, *path.parents):
            raise InvalidURIError(f"key {key!r} escapes {self.root}")
        return path

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as e:
            raise NotFoundError(f"{self._path(key)} does not exist") from e

    def write_bytes(self, key: str, data: bytes, *, sha256: str | None = None) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(path)  # readers never see a half-written file

    def download(self, key: str, dest: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise NotFoundError(f"{src} does not exist")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)

    def upload(self, src: Path, key: str, *, sha256: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        shutil.copyfile(src, tmp)
        tmp.replace(path)

    def upload_new(self, src: Path, key: str, *, sha256: str) -> bool:
        """A hard link from a private copy: it fails if the name exists, atomically, on local and NFS folders."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.part")
        shutil.copyfile(src, tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: check, then rename (not atomic)
            if path.exists():
                return False
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        # Lexical paths, not resolved ones: a symlink that leads out of the root is listed, and refused when read.
        root = self.root.resolve()
        return sorted(
            p.relative_to(root).as_posix() for p in base.rglob("*") if p.is_file() and not p.name.endswith(".part")
        )

    def stored_sha256(self, key: str) -> str | None:
        path = self._path(key)
        return sha256_file(path) if path.is_file() else None

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        return len(keys)


class S3Store(Store):
    """A bucket on an S3-compatible server."""

    def __init__(self, bucket: str, settings: S3Settings) -> None:
        from boto3.s3.transfer import TransferConfig

        self.bucket = bucket
        self.attempts = max(1, settings.attempts)
        self.client = _s3_client(settings)
        self.transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        """Run one S3 call, retrying transient failures with exponential backoff."""
        delay = 0.5
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as e:
                error = self._transient(what, e)
            if attempt == self.attempts:
                raise StorageError(f"s3://{self.bucket}/{what}: gave up after {attempt} attempts: {error}") from error
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
        raise AssertionError("unreachable")

    def _transient(self, what: str, error: Exception) -> Exception:
        """``error`` when a retry may help; raises NotFoundError, StorageError or ``error`` itself when not."""
        from boto3.exceptions import RetriesExceededError, S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        # boto3's file transfers wrap the client's error (upload) or retry connection errors first (download).
        if isinstance(error, S3UploadFailedError) and isinstance(error.__context__, ClientError | BotoCoreError):
            error = error.__context__
        if isinstance(error, RetriesExceededError | BotoCoreError):
            return cast(Exception, error)  # boto3 is untyped: isinstance narrows to Any
        if not isinstance(error, ClientError):
            raise error
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in ("NoSuchKey", "404", "NotFound"):
            raise NotFoundError(f"s3://{self.bucket}/{what} does not exist") from error
        if code == "NoSuchBucket":
            raise NotFoundError(f"bucket {self.bucket!r} does not exist") from error
        # ConditionalRequestConflict (409): another conditional write of the key is in flight; ask again.
        if status < 500 and code not in ("SlowDown", "RequestTimeout", "Throttling", "ConditionalRequestConflict"):
            raise StorageError(f"s3://{self.bucket}/{what}: {code or status}: {error}") from error
        return cast(Exception, error)

    def read_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            data: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            return data

        return self._call(key, get)

    def write_bytes(self, key: str, data: bytes, *, sha256: str | None = None) -> None:
        digest = sha256 or hashlib.sha256(data).hexdigest()
        self._call(
            key,
            lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=data, Metadata={"sha256": digest}),
        )

    def download(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        self._call(key, lambda: self.client.download_file(self.bucket, key, str(tmp), Config=self.transfer))
        tmp.replace(dest)

    def upload(self, src: Path, key: str, *, sha256: str) -> None:
        self._call(
            key,
            lambda: self.client.upload_file(
                str(src), self.bucket, key, ExtraArgs={"Metadata": {"sha256": sha256}}, Config=self.transfer
            ),
        )

    def upload_new(self, src: Path, key: str, *, sha256: str) -> bool:
        """A PUT with ``If-None-Match: *`` (AWS, MinIO, Ceph RGW refuse it with 412 when the key exists).

        Above the multipart threshold the upload is checked first and then written, not atomically:
        s3transfer's multipart uploads take no condition. A store that ignores the header overwrites,
        as an unconditional PUT would.
        """
        from botocore.exceptions import ClientError

        if src.stat().st_size > MULTIPART_THRESHOLD:
            if self.stored_sha256(key) is not None:
                return False
            self.upload(src, key, sha256=sha256)
            return True

        def put() -> bool:
            with src.open("rb") as body:
                try:
                    self.client.put_object(
                        Bucket=self.bucket, Key=key, Body=body, Metadata={"sha256": sha256}, IfNoneMatch="*"
                    )
                except ClientError as e:
                    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                    if e.response.get("Error", {}).get("Code") == "PreconditionFailed" or status == 412:
                        return False
                    raise
            return True

        return self._call(key, put)

    def list(self, prefix: str) -> list[str]:
        def pages() -> list[str]:
            keys: list[str] = []
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                keys += [obj["Key"] for obj in page.get("Contents", [])]
            return sorted(keys)

        return self._call(prefix, pages)

    def stored_sha256(self, key: str) -> str | None:
        try:
            head: dict[str, Any] = self._call(key, lambda: self.client.head_object(Bucket=self.bucket, Key=key))
        except NotFoundError:
            return None
        recorded = head.get("Metadata", {}).get("sha256")
        if recorded:
            return str(recorded)
        # Written by something other than kubetune: hash the content itself.
        return hashlib.sha256(self.read_bytes(key)).hexdigest()

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self._call(prefix, partial(self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": batch}))
        return len(keys)


@dataclass(frozen=True)
class Location:
    """A store and a key (or key prefix) in it."""

    store: Store
    key: str
    uri: str

    def child(self, *parts: str) -> Location:
        key = "/".join(p.strip("/") for p in (self.key, *parts) if p.strip("/"))
        return Location(self.store, key, join(self.uri, *parts))


_CLAIM_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


def _check_path(uri: str, path: str) -> None:
    """Refuse ``..`` segments: a key must never lead out of its bucket, claim or the folder it is fetched into."""
    if ".." in path.split("/"):
        raise InvalidURIError(f"{uri}: '..' path segments are not allowed in storage URIs")


def resolve(uri: str, settings: S3Settings | None = None) -> Location:
    """The store and key a ``s3://``, ``file://`` or ``pvc://`` URI names."""
    parsed = urlparse(uri)
    _check_path(uri, parsed.path)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise InvalidURIError(f"{uri}: s3:// URIs need a bucket, e.g. s3://bucket/key")
        return Location(S3Store(parsed.netloc, settings or S3Settings()), parsed.path.lstrip("/"), uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InvalidURIError(f"{uri}: file:// URIs are absolute paths, e.g. file:///data/train.jsonl")
        path = Path(parsed.path)
        return Location(FileStore(Path(path.anchor or "/")), path.as_posix().lstrip("/"), uri)
    if parsed.scheme == "pvc":
        if not _CLAIM_NAME.fullmatch(parsed.netloc):
            raise InvalidURIError(f"{uri}: pvc:// URIs name a PersistentVolumeClaim, e.g. pvc://claim/path")
        root = Path(os.environ.get("KUBETUNE_PVC_ROOT", "/mnt/pvc")) / parsed.netloc
        return Location(FileStore(root), parsed.path.lstrip("/"), uri)
    if parsed.scheme == "hf":
        raise InvalidURIError(f"{uri}: hf:// names a model on a hub; files are read from s3://, file:// or pvc://")
    raise InvalidURIError(f"{uri}: unsupported scheme {parsed.scheme!r} (use s3://, file:// or pvc://)")


def read_json(uri: str, settings: S3Settings | None = None) -> Any:
    loc = resolve(uri, settings)
    return json.loads(loc.store.read_bytes(loc.key))


def write_json(uri: str, value: Any, settings: S3Settings | None = None) -> None:
    loc = resolve(uri, settings)
    loc.store.write_bytes(loc.key, json.dumps(value, indent=2, sort_keys=True).encode())


def fetch_file(uri: str, dest: Path, settings: S3Settings | None = None) -> Path:
    """Download one file (``hf://`` not supported: datasets come from s3/file/pvc)."""
    loc = resolve(uri, settings)
    if not loc.key or loc.key.endswith("/"):
        raise InvalidURIError(f"{uri}: names a folder, not a file")
    loc.store.download(loc.key, dest)
    return dest


def _iter_prefix(loc: Location) -> Iterator[tuple[str, str]]:
    prefix = loc.key.rstrip("/") + "/" if loc.key else ""
    for key in loc.store.list(prefix):
        if not key.endswith("/"):  # folder markers some tools write hold no content
            yield key, key[len(prefix) :]


def local_path(dest: Path, rel: str, uri: str) -> Path:
    """``dest / rel`` for a key listed under ``uri``; refused when it would lie outside ``dest``.

    Keys come from the store, not from kubetune: a bucket may hold ``a/../../x``
    or ``a//etc/x`` (``Path("/d") / "/etc/x"`` is ``/etc/x``).
    """
    if not rel or rel.startswith("/") or ".." in rel.split("/"):
        raise InvalidURIError(f"{uri}: refusing to fetch {rel!r}: it would be written outside {dest}")
    path = dest / rel
    root = dest.resolve()
    if root not in path.resolve().parents:
        raise InvalidURIError(f"{uri}: refusing to fetch {rel!r}: it would be written outside {dest}")
    return path


def fetch_dir(uri: str, dest: Path, settings: S3Settings | None = None, *, revision: str | None = None) -> Path:
    """Download every file under ``uri`` into ``dest``; ``hf://org/name`` goes through the hub client."""
    if uri.startswith("hf://"):
        from huggingface_hub import snapshot_download

        repo = uri.removeprefix("hf://").strip("/")
        # Read HF_ENDPOINT per call: huggingface_hub reads it once, at import.
        endpoint = os.environ.get("HF_ENDPOINT") or None
        return Path(snapshot_download(repo_id=repo, revision=revision, local_dir=str(dest), endpoint=endpoint))
    loc = resolve(uri, settings)
    found = False
    for key, rel in _iter_prefix(loc):
        loc.store.download(key, local_path(dest, rel, uri))
        found = True
    if not found:
        raise NotFoundError(f"{uri}: no files there")
    return dest


def upload_dir(src: Path, uri: str, settings: S3Settings | None = None) -> dict[str, str]:
    """Upload a folder (overwriting); returns relative path -> sha256."""
    loc = resolve(uri, settings)
    files: dict[str, str] = {}
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src).as_posix()
        files[rel] = sha256_file(path)
        loc.store.upload(path, loc.child(rel).key, sha256=files[rel])
    return files


def publish_dir(src: Path, uri: str, settings: S3Settings | None = None) -> dict[str, str]:
    """Upload a folder write-once; returns relative path -> sha256.

    Every file is checked before anything is written, so a refused publish
    leaves the store as it was. Each write is conditional too: a writer that
    checked at the same time as another and lost the race finds the other's
    file in place, and is refused unless it holds the same bytes.
    """
    loc = resolve(uri, settings)
    files = {p.relative_to(src).as_posix(): sha256_file(p) for p in sorted(src.rglob("*")) if p.is_file()}
    pending = []
    for rel, digest in files.items():
        existing = loc.store.stored_sha256(loc.child(rel).key)
        if existing is None:
            pending.append(rel)
        elif existing != digest:
            raise WriteOnceError(
                f"{join(uri, rel)} already exists with different content (sha256 {existing[:12]}... != "
                f"{digest[:12]}...); published artifacts are never overwritten"
            )
    for rel in pending:
        key = loc.child(rel).key
        if not loc.store.upload_new(src / rel, key, sha256=files[rel]):
            existing = loc.store.stored_sha256(key)
            if existing != files[rel]:
                raise WriteOnceError(
                    f"{join(uri, rel)} was written by another writer meanwhile, with different content (sha256 "
                    f"{str(existing)[:12]}... != {files[rel][:12]}...); published artifacts are never overwritten"
                )
    return files
