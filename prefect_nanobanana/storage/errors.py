"""The storage room's errors: one base class, one subclass per job.

Input problems (a missing file, a bad location, a malformed manifest) are also
``ValueError``s, so callers that validate before a paid submit can catch them
with the exception type they already expect for bad input.
"""

from __future__ import annotations

from ..errors import NanoBananaError
from ..redaction import redact_text


class StorageError(NanoBananaError):
    """Base class for everything the storage room raises on purpose.

    Its messages often quote a URL or a server's answer, so they go through the one
    redaction when the error is made: no signature rides it into a log or a state.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact_text(arg) if isinstance(arg, str) else arg for arg in args))


class LocationError(StorageError, ValueError):
    """A location string cannot be used: unknown scheme, non-HTTPS remote URL, bad bucket."""


class S3CredentialsError(LocationError):
    """No AWS credentials were found for S3; nothing was read or written.

    Raised when the S3 client is made from boto3's default chain, so every verb
    and flow that uses an ``s3://`` location says what to set, before anything is paid.
    """


class StagingError(StorageError, ValueError):
    """An asset cannot be staged; nothing has been submitted (paid for) yet.

    Validation failures are raised before the first upload; upload failures name the file.
    """


class ManifestError(StorageError, ValueError):
    """A batch manifest cannot be read; the message names the line."""


class LedgerError(StorageError):
    """The ledger has no entry for a job, or an entry cannot be read."""
