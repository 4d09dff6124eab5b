"""The lock that makes a claim in Prefect's result store atomic, and how far it reaches.

`PrefectRecordStore` (bare tasks, the job block) reads and writes a job's record while
holding a lock of the result store's lock manager. Which lock manager:

1. `NANOBANANA_LOCK_URL`, when set: prefect-redis's `RedisLockManager` on that Redis
   (`redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`, `rediss://` for TLS). One Redis for
   every machine makes a claim atomic across machines. It is an environment variable
   because that is what a work pool's job variables (`env`), a worker's environment and
   a container all set; Prefect 3 itself has no setting for the result store's lock
   manager (only code sets one: a cache policy's `lock_manager`, a transaction's store).
2. Otherwise the result store's own lock manager, when code gave it one.
3. Otherwise a file lock under `PREFECT_HOME` (`FileSystemLockManager`): atomic across
   the processes of one machine only.

A lock that reaches one machine while the records it guards are shared (S3, GCS, a
network file system) lets two machines both claim one explicit `job_key`, and both
pay; `warn_if_machine_local` says so once per process, naming `NANOBANANA_LOCK_URL`.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from prefect.filesystems import LocalFileSystem, RemoteFileSystem
from prefect.locking.filesystem import FileSystemLockManager
from prefect.locking.memory import MemoryLockManager
from prefect.locking.protocol import LockManager
from prefect.results import ResultStore, get_default_result_storage
from prefect.settings import PREFECT_HOME

from .. import observe
from ..blocks.credentials import run_logger_or_none
from ..errors import NanoBananaError
from ..redaction import strip_signature

LOCK_URL_ENV_VAR = "NANOBANANA_LOCK_URL"
_REDIS_SCHEMES = ("redis", "rediss")
# File systems whose files other machines see too (from /proc/mounts).
_SHARED_FS_TYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "ocfs2",
        "gfs2",
        "afs",
        "9p",
        "virtiofs",
    }
)
_SHARED_FUSE_TYPES = ("sshfs", "s3fs", "gcsfuse", "mountpoint-s3", "rclone", "juicefs", "gluster")
_LOCAL_FSSPEC_SCHEMES = ("", "file", "local", "memory")
MOUNTS_FILE = Path("/proc/mounts")
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


class LockSettingError(NanoBananaError, ValueError):
    """`NANOBANANA_LOCK_URL` is not a Redis URL this package can lock with."""


class RecordLockError(NanoBananaError, RuntimeError):
    """The lock service of the submit records could not be reached (nothing was submitted)."""


_managers: dict[tuple[str, int], LockManager] = {}
_managers_guard = threading.Lock()
_warned = False


def lock_url() -> str | None:
    """The configured lock service (`NANOBANANA_LOCK_URL`), or None when unset or blank."""
    return os.environ.get(LOCK_URL_ENV_VAR, "").strip() or None


def _redis_lock_manager(url: str) -> LockManager:
    from prefect_redis.locking import RedisLockManager

    parts = urlsplit(url)
    if parts.scheme not in _REDIS_SCHEMES or not parts.hostname:
        raise LockSettingError(
            f"{LOCK_URL_ENV_VAR}={strip_signature(url)!r} is not a Redis URL: use "
            "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB] (rediss:// for TLS)."
        )
    path = parts.path.strip("/")
    try:
        port = parts.port or 6379
        db = int(path) if path else 0
    except ValueError:
        raise LockSettingError(
            f"{LOCK_URL_ENV_VAR}={strip_signature(url)!r}: the port and the database "
            "(the path, e.g. /0) must be numbers."
        ) from None
    return RedisLockManager(
        host=parts.hostname,
        port=port,
        db=db,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        ssl=parts.scheme == "rediss",
    )


def configured_lock_manager() -> LockManager | None:
    """The lock manager `NANOBANANA_LOCK_URL` names (one per process), or None when unset.

    Returns:
        prefect-redis's `RedisLockManager` on the configured Redis, or None.

    Raises:
        LockSettingError: The variable is set to something other than a Redis URL.
    """
    url = lock_url()
    if url is None:
        return None
    key = (url, os.getpid())  # a forked child opens its own connections
    with _managers_guard:
        if key not in _managers:
            _managers[key] = _redis_lock_manager(url)
        return _managers[key]


def record_lock_manager(result_store: ResultStore) -> LockManager:
    """The lock manager the submit records hold: the setting, the store's own, or a file lock.

    Args:
        result_store: The result store the records are written to.

    Returns:
        The lock manager to lock the records with (see the module docstring for the order).

    Raises:
        LockSettingError: `NANOBANANA_LOCK_URL` is set to something other than a Redis URL.
    """
    configured = configured_lock_manager()
    if configured is not None:
        return configured
    if result_store.lock_manager is not None:
        return result_store.lock_manager
    return FileSystemLockManager(lock_files_directory=PREFECT_HOME.value() / "locks" / "nanobanana")


def reaches_one_machine(lock_manager: LockManager) -> bool:
    """Whether the lock manager's locks exist on this machine only (files, memory)."""
    return isinstance(lock_manager, FileSystemLockManager | MemoryLockManager)


def is_lock_service_error(error: BaseException) -> bool:
    """Whether `error` is the lock service not answering (Redis down, unreachable, slow)."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return isinstance(error, RedisConnectionError | RedisTimeoutError)


def lock_service_error(error: Exception) -> RecordLockError:
    """The error for a lock service that did not answer, naming the setting (no password)."""
    url = lock_url()
    where = f"{LOCK_URL_ENV_VAR}={strip_signature(url)}" if url else "the result store's lock"
    return RecordLockError(
        f"Could not lock the submit record at {where}: {type(error).__name__}: {error}. "
        "Nothing was submitted."
    )


def _mount_type(path: Path, mounts_file: Path) -> str | None:
    """The file-system type of the mount that holds `path` (None when unknown)."""
    try:
        lines = mounts_file.read_text().splitlines()
    except OSError:
        return None
    best, fs_type = "", None
    target = str(path)
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts escapes blanks in mount points as octal (\040).
        point = _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), fields[1])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fs_type = point, fields[2]
    return fs_type


def _shared_fs_type(fs_type: str | None) -> bool:
    if fs_type is None:
        return False
    if fs_type.startswith("fuse."):
        return any(name in fs_type for name in _SHARED_FUSE_TYPES)
    return fs_type in _SHARED_FS_TYPES


def shared_storage(result_store: ResultStore, mounts_file: Path | None = None) -> str | None:
    """Where the result store keeps its records, when other machines can reach it too.

    Detected: a storage block other than a local folder (S3, GCS, Azure: prefect-aws's
    `S3Bucket`, a `RemoteFileSystem` on `s3://`, `gs://`, …) and a local folder on a
    network file system (NFS, SMB, CephFS, a FUSE mount of a bucket…, from
    `/proc/mounts`). Not detected: a folder that another machine reaches some other way.

    Args:
        result_store: The result store of the records.
        mounts_file: The mount table to read (`/proc/mounts`).

    Returns:
        A short description of the shared storage, or None when it looks local.
    """
    storage: Any = result_store.result_storage
    if storage is None:
        try:
            storage = get_default_result_storage(_sync=True)  # type: ignore[call-arg]
        except Exception:  # a default storage block that cannot be read: not our question
            return None
    if isinstance(storage, LocalFileSystem):
        path = Path(storage.basepath or ".").expanduser().resolve()
        fs_type = _mount_type(path, mounts_file or MOUNTS_FILE)
        return f"{path} (a {fs_type} mount)" if _shared_fs_type(fs_type) else None
    if isinstance(storage, RemoteFileSystem):
        scheme = urlsplit(storage.basepath).scheme
        return None if scheme in _LOCAL_FSSPEC_SCHEMES else strip_signature(storage.basepath)
    return type(storage).__name__


def warn_if_machine_local(result_store: ResultStore, lock_manager: LockManager) -> bool:
    """Warn once per process when the records are shared but their lock is not.

    Called when a caller names a `job_key` of its own: a key meant to span runs, which
    runs on two machines may claim at the same moment.

    Args:
        result_store: The result store of the records.
        lock_manager: The lock manager the records are written under.

    Returns:
        Whether this call logged the warning.
    """
    global _warned
    if _warned or not reaches_one_machine(lock_manager):
        return False
    shared = shared_storage(result_store)
    if shared is None:
        return False
    _warned = True
    (run_logger_or_none() or observe.logger).warning(
        "The submit records of an explicit job_key are kept in %s, which other machines "
        "reach, but their lock (%s) is on this machine only: runs on two machines can "
        "both claim one job_key and both pay. Set %s=redis://HOST:6379/0 on every "
        "worker (a work pool's job variables `env`) to lock on one Redis.",
        shared,
        type(lock_manager).__name__,
        LOCK_URL_ENV_VAR,
    )
    return True


def _reset_warning() -> None:
    """Forget that the warning was logged (tests)."""
    global _warned
    _warned = False
