"""The one table of exit codes: a distinct code per failure kind, so scripts can branch on them.

Each failure kind carries the hint printed under the error. Light to import: the
error classes of the client, nothing else until something failed.
"""

from __future__ import annotations

from ..client import errors

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_AUTH = 3
EXIT_BALANCE = 4
EXIT_TIMEOUT = 5
EXIT_JOB_FAILED = 6
EXIT_OUTCOME_UNKNOWN = 7
EXIT_INTERRUPTED = 130


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    """Input errors raised before anything is paid; imported only once something failed."""
    from pydantic import ValidationError

    from ..storage import LocationError, ManifestError, StagingError

    return (
        errors.InvalidRequestError,
        errors.NotFoundError,
        ValidationError,
        LocationError,
        StagingError,
        ManifestError,
        FileNotFoundError,
    )


# Most specific first: the first matching class decides the exit code and the hint.
_FAILURES: list[tuple[tuple[type[BaseException], ...], int, str]] = [
    (
        (errors.AuthenticationError, errors.PermissionDeniedError),
        EXIT_AUTH,
        "Set RUNCOMFY_API_TOKEN (or pass --credentials BLOCK) to a valid token.",
    ),
    ((errors.InsufficientBalanceError,), EXIT_BALANCE, "Top up the RunComfy account."),
    (
        (errors.WaitTimeoutError,),
        EXIT_TIMEOUT,
        "The job may still finish: `nanobanana result REQUEST_ID` collects it later.",
    ),
    (
        (errors.JobFailedError, errors.JobCancelledError),
        EXIT_JOB_FAILED,
        "Check the prompt and that every input URL is publicly fetchable.",
    ),
    (
        (errors.SubmitOutcomeUnknownError,),
        EXIT_OUTCOME_UNKNOWN,
        "Look at your RunComfy request history before submitting again.",
    ),
]


def failure_of(error: BaseException) -> tuple[int, str] | None:
    """The exit code and hint for `error`, or None when it is not a known failure (a bug)."""
    for classes, code, hint in [
        *_FAILURES,
        (_bad_input_errors(), EXIT_BAD_INPUT, "Fix the input named above; nothing was paid for."),
    ]:
        if isinstance(error, classes):
            return code, hint
    return None
