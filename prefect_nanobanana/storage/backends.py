"""Where the archive, the ledger and manifests live: a local folder or an S3 prefix.

Both backends speak in keys relative to a root and answer with *locations* (an
absolute path or ``s3://bucket/key``), so the archive and the ledger are written
once and run unchanged on a laptop or against a bucket. Local writes are atomic
(temp file + rename) so a crash never leaves a half-written file under its final name.

A process killed mid-write cannot remove its scratch file, so every scratch name
carries its writer (a hash of the host name and the process id):
:meth:`LocalBackend.sweep_scratch` removes those whose writer is gone, and the
archive sweeps a request's folder before archiving it.

Records that several runs (on several machines) may write at once use the
conditional trio `read_versioned` / `create_bytes` / `replace_bytes`: a create
succeeds for exactly one writer, and a replace only if nobody wrote since the
version it names. Locally: a hard link of a complete temp file (atomic, fails if
the name exists) and a rename under an exclusive lock; on S3: `put_object` with
`IfNoneMatch="*"` and `IfMatch=<ETag>`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import secrets
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from .errors import LocationError, S3CredentialsError, StorageError
from .locations import HttpLocation, LocalLocation, join_key, parse_location

# The archive's default root: a folder in the working directory, no cloud needed.
DEFAULT_ARCHIVE_URI = "nanobanana-archive"

_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
# `.{name}.{host}-{pid}.{random}.part`: the writer of a scratch file, in its name.
_SCRATCH_RE = re.compile(r"^\..+\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[^.]+\.part$")
# A scratch file no download could still be writing (every download has a deadline).
_ABANDONED_AFTER_SECONDS = 24 * 3600


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _scratch_prefix(name: str) -> str:
    return f".{name}.{_host_tag()}-{os.getpid()}."


def _writer_gone(host: str, pid: int) -> bool:
    if host != _host_tag():
        return False  # another machine's process (a shared folder): not ours to judge
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def sweep_scratch_files(folder: Path) -> int:
    """Remove the scratch files in ``folder`` left by dead writers; how many were removed."""
    removed = 0
    try:
        entries = list(folder.iterdir())
    except OSError:
        return 0
    for entry in entries:
        match = _SCRATCH_RE.match(entry.name)
        if match is None:
            continue
        try:
            abandoned = time.time() - entry.stat().st_mtime > _ABANDONED_AFTER_SECONDS
        except OSError:
            continue
        if abandoned or _writer_gone(match["host"], int(match["pid"])):
            with contextlib.suppress(OSError):
                entry.unlink()
                removed += 1
    return removed


# More than the threads that may call S3 at once: anyio's 40 worker threads (a batch's
# rows) plus planning's pools. At 32 a batch of 16 lanes ran out and urllib3 logged
# "Connection pool is full" warnings.
S3_MAX_CONNECTIONS = 64
# A conditional write lost: the object exists (create) or changed (replace). S3 answers
# 409 ConditionalRequestConflict when two conditional writes of one key overlap.
_CONFLICT_CODES = frozenset({"412", "409", "PreconditionFailed", "ConditionalRequestConflict"})


def make_s3_client(**client_kwargs: Any) -> Any:
    """An S3 client from boto3's default credential chain.

    The endpoint comes from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``),
    which boto3 honours natively, so MinIO, moto or LocalStack need no code here.
    Callers with their own client (e.g. built from prefect-aws blocks) pass it instead.

    Without arguments the client is shared by the process while the AWS_*
    environment stays the same: building one loads botocore's service model
    (about 0.3 CPU-seconds), which done per staged row or archived request
    cost a batch more than its S3 round trips. boto3 clients are thread-safe.
    """
    if client_kwargs:
        return _new_s3_client(**client_kwargs)
    environment = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    return _shared_s3_client(environment)


NO_AWS_CREDENTIALS = (
    "no AWS credentials found for S3: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
    "(and AWS_SESSION_TOKEN for temporary ones), or AWS_PROFILE, or run with an instance "
    "or task role (and AWS_ENDPOINT_URL for MinIO or another S3 API)"
)


def _new_s3_client(**client_kwargs: Any) -> Any:
    """A client from boto3's default chain; S3CredentialsError when the chain finds none.

    botocore looks the credentials up when it makes the client; without any, every
    call would fail later with its bare NoCredentialsError, which names nothing to set.
    """
    import boto3
    from botocore.config import Config

    # Enough connections for a batch's lanes and parallel staging, so none waits for one.
    config = Config(max_pool_connections=S3_MAX_CONNECTIONS)
    session = boto3.session.Session()
    client = session.client("s3", **{"config": config, **client_kwargs})
    if "aws_access_key_id" not in client_kwargs and session.get_credentials() is None:
        raise S3CredentialsError(NO_AWS_CREDENTIALS)
    return client


@functools.lru_cache(maxsize=8)
def _shared_s3_client(environment: tuple[tuple[str, str], ...]) -> Any:
    return _new_s3_client()


def require_bucket(s3_client: Any, bucket: str) -> None:
    """Fail clearly, and before anything is paid for, when ``bucket`` cannot be used."""
    try:
        s3_client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        raise LocationError(
            f"bucket {bucket} does not exist or is not accessible ({_error_code(exc)})"
        ) from exc
    except BotoCoreError as exc:
        raise LocationError(f"cannot check bucket {bucket}: {exc}") from exc


def _error_code(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    return str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def is_missing(exc: ClientError) -> bool:
    """True when an S3 error means "no such object" (HEAD answers a bare 404)."""
    return _error_code(exc) in _MISSING_CODES


class Backend(Protocol):
    """A root (folder or S3 prefix) that stores files under relative keys."""

    def location(self, key: str) -> str:
        """The absolute location of ``key``: a path or ``s3://bucket/key``."""
        ...

    def check(self) -> None:
        """Raise a clear error now if the root cannot be written (missing bucket, bad folder)."""
        ...

    def read_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        ...

    def write_bytes(self, key: str, data: bytes, content_type: str) -> str:
        """Store small data (metadata, ledger entries) atomically; returns the location."""
        ...

    def temp_file(self, key: str) -> Path:
        """An empty scratch file to fill before :meth:`commit_file` puts it at ``key``."""
        ...

    def commit_file(self, temp: Path, key: str, content_type: str) -> str:
        """Move a filled scratch file to ``key`` (rename or multipart upload); its location."""
        ...

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """The object and its version (a token for `replace_bytes`), or None if missing."""
        ...

    def create_bytes(self, key: str, data: bytes, content_type: str) -> str | None:
        """Write ``key`` only if it does not exist (atomic); its version, or None if it did."""
        ...

    def replace_bytes(self, key: str, data: bytes, content_type: str, version: str) -> str | None:
        """Overwrite ``key`` only if it is still at ``version``; the new version, or None."""
        ...

    def list_keys(self, prefix: str) -> list[str]:
        """Keys directly under ``prefix``, sorted."""
        ...

    def sweep_scratch(self, prefix: str) -> int:
        """Remove scratch files under ``prefix`` whose writer died; how many were removed."""
        ...


class LocalBackend:
    """A folder on this machine."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()

    def _path(self, key: str) -> Path:
        parts = PurePosixPath(key).parts
        if not parts or PurePosixPath(key).is_absolute() or ".." in parts:
            raise LocationError(f"unsafe key {key!r}")
        return self.root.joinpath(*parts)

    def location(self, key: str) -> str:
        return str(self._path(key))

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LocationError(f"cannot create folder {self.root}: {exc}") from exc

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def write_bytes(self, key: str, data: bytes, content_type: str) -> str:
        return self.commit_file(self._complete_temp(key, data), key, content_type)

    def temp_file(self, key: str) -> Path:
        # Next to the destination, so the final rename stays on one filesystem (atomic).
        # Made with mode 0o666 like any new file, so the umask decides who may read the
        # archive: mkstemp's 0600 left a shared archive readable by its writer alone.
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        while True:
            name = target.parent / f"{_scratch_prefix(target.name)}{secrets.token_hex(6)}.part"
            try:
                os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            except FileExistsError:
                continue
            return name

    def sweep_scratch(self, prefix: str) -> int:
        return sweep_scratch_files(self.root / prefix if prefix else self.root)

    def commit_file(self, temp: Path, key: str, content_type: str) -> str:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, target)
        return str(target)

    @staticmethod
    def _version(stat: os.stat_result) -> str:
        # Every write is a new file (temp + rename or link): a new inode and mtime.
        return f"{stat.st_ino}-{stat.st_mtime_ns}-{stat.st_size}"

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        try:
            with self._path(key).open("rb") as handle:
                # One open file: its content and its version always belong together.
                return handle.read(), self._version(os.fstat(handle.fileno()))
        except FileNotFoundError:
            return None

    def _complete_temp(self, key: str, data: bytes) -> Path:
        """A scratch file next to ``key`` holding ``data``, flushed to disk."""
        temp = self.temp_file(key)
        try:
            with temp.open("wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return temp

    def create_bytes(self, key: str, data: bytes, content_type: str) -> str | None:
        target = self._path(key)
        temp = self._complete_temp(key, data)
        try:
            # link() of a complete file is atomic and refuses an existing name, so no
            # reader ever sees a half-written record and only one creator wins.
            os.link(temp, target)
        except FileExistsError:
            return None
        finally:
            temp.unlink(missing_ok=True)
        return self._version(target.stat())

    def replace_bytes(self, key: str, data: bytes, content_type: str, version: str) -> str | None:
        target = self._path(key)
        with self._exclusive(target):
            try:
                if self._version(target.stat()) != version:
                    return None
            except FileNotFoundError:
                return None
            temp = self._complete_temp(key, data)
            os.replace(temp, target)
            return self._version(target.stat())

    @staticmethod
    @contextlib.contextmanager
    def _exclusive(target: Path) -> Iterator[None]:
        """An exclusive lock on ``target`` among writers (readers need none: renames are atomic)."""
        import fcntl  # POSIX only; imported here so that the module loads anywhere

        lock_path = target.with_name(f".{target.name}.lock")
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # closing releases the lock

    def list_keys(self, prefix: str) -> list[str]:
        folder = self.root / prefix if prefix else self.root
        if not folder.is_dir():
            return []
        return sorted(
            path.relative_to(self.root).as_posix()
            for path in folder.iterdir()
            if path.is_file() and not path.name.startswith(".")
        )


class S3Backend:
    """A prefix in an S3 bucket."""

    def __init__(self, s3_client: Any, bucket: str, prefix: str = "") -> None:
        self.s3 = s3_client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def object_key(self, key: str) -> str:
        return join_key(self.prefix, key)

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.object_key(key)}"

    def check(self) -> None:
        require_bucket(self.s3, self.bucket)

    def head(self, key: str) -> dict[str, Any] | None:
        """The object's HEAD answer (size, type), or None when it does not exist."""
        try:
            return self.s3.head_object(Bucket=self.bucket, Key=self.object_key(key))
        except ClientError as exc:
            if is_missing(exc):
                return None
            raise StorageError(f"cannot read {self.location(key)}: {_error_code(exc)}") from exc

    def read_range(self, key: str, length: int) -> bytes:
        """The first ``length`` bytes of an object, without downloading the rest."""
        response = self.s3.get_object(
            Bucket=self.bucket, Key=self.object_key(key), Range=f"bytes=0-{length - 1}"
        )
        return response["Body"].read()

    def presign_get(self, key: str, expires_in: int) -> str:
        """A pre-signed GET URL for ``key``, valid for ``expires_in`` seconds."""
        return self.s3.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self.object_key(key)},
            ExpiresIn=expires_in,
        )

    def read_bytes(self, key: str) -> bytes | None:
        found = self.read_versioned(key)
        return found[0] if found is not None else None

    def write_bytes(self, key: str, data: bytes, content_type: str) -> str:
        try:
            self.s3.put_object(
                Bucket=self.bucket, Key=self.object_key(key), Body=data, ContentType=content_type
            )
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"cannot write {self.location(key)}: {exc}") from exc
        return self.location(key)

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        try:
            response = self.s3.get_object(Bucket=self.bucket, Key=self.object_key(key))
        except ClientError as exc:
            if is_missing(exc):
                return None
            raise StorageError(f"cannot read {self.location(key)}: {_error_code(exc)}") from exc
        return response["Body"].read(), response["ETag"]

    def _put_if(self, key: str, data: bytes, content_type: str, **condition: str) -> str | None:
        try:
            response = self.s3.put_object(
                Bucket=self.bucket,
                Key=self.object_key(key),
                Body=data,
                ContentType=content_type,
                **condition,
            )
        except ClientError as exc:
            if _error_code(exc) in _CONFLICT_CODES or is_missing(exc):
                return None
            raise StorageError(f"cannot write {self.location(key)}: {_error_code(exc)}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"cannot write {self.location(key)}: {exc}") from exc
        return response["ETag"]

    def create_bytes(self, key: str, data: bytes, content_type: str) -> str | None:
        return self._put_if(key, data, content_type, IfNoneMatch="*")

    def replace_bytes(self, key: str, data: bytes, content_type: str, version: str) -> str | None:
        return self._put_if(key, data, content_type, IfMatch=version)

    def temp_file(self, key: str) -> Path:
        handle, name = tempfile.mkstemp(prefix=_scratch_prefix("nanobanana"), suffix=".part")
        os.close(handle)
        return Path(name)

    def sweep_scratch(self, prefix: str) -> int:
        # Nothing reaches S3 before the upload; scratch files live in the system temp folder.
        return sweep_scratch_files(Path(tempfile.gettempdir()))

    def put_file(self, path: Path, key: str, content_type: str) -> str:
        """Upload a local file to ``key`` (the file stays); returns the location."""
        try:
            # upload_file goes multipart for large files and reads from disk, never all in memory.
            self.s3.upload_file(
                str(path),
                self.bucket,
                self.object_key(key),
                ExtraArgs={"ContentType": content_type},
            )
        except Exception as exc:  # boto3's S3UploadFailedError is no ClientError subclass
            raise StorageError(f"cannot upload to {self.location(key)}: {exc}") from exc
        return self.location(key)

    def commit_file(self, temp: Path, key: str, content_type: str) -> str:
        try:
            return self.put_file(temp, key, content_type)
        finally:
            with contextlib.suppress(OSError):
                temp.unlink()

    def list_keys(self, prefix: str) -> list[str]:
        full_prefix = join_key(self.prefix, prefix)
        paginator = self.s3.get_paginator("list_objects_v2")
        keys: list[str] = []
        for page in paginator.paginate(
            Bucket=self.bucket, Prefix=f"{full_prefix}/" if full_prefix else "", Delimiter="/"
        ):
            for item in page.get("Contents", []):
                keys.append(item["Key"][len(self.prefix) :].lstrip("/"))
        return sorted(keys)


def open_backend(uri: str | os.PathLike[str], s3_client: Any = None) -> Backend:
    """The backend for a folder or ``s3://bucket/prefix``; no network call yet (see ``check``)."""
    location = parse_location(uri)
    if isinstance(location, LocalLocation):
        return LocalBackend(location.path)
    if isinstance(location, HttpLocation):
        raise LocationError(f"expected a local folder or s3://bucket/prefix, got {location}")
    return S3Backend(s3_client or make_s3_client(), location.bucket, location.key)


def open_object(location: str | os.PathLike[str], s3_client: Any = None) -> tuple[Backend, str]:
    """A backend rooted at a single file's parent, and the file's key under it."""
    parsed = parse_location(location)
    if isinstance(parsed, LocalLocation):
        path = parsed.path.absolute()
        return LocalBackend(path.parent), path.name
    if isinstance(parsed, HttpLocation):
        raise LocationError(f"expected a local file or s3://bucket/key, got {parsed}")
    if not parsed.key:
        raise LocationError(f"s3://{parsed.bucket}/ names a bucket, not an object")
    return S3Backend(s3_client or make_s3_client(), parsed.bucket), parsed.key
