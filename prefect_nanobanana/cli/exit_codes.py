"""The one table of exit codes: a distinct code per failure kind, so scripts can branch on them.

Each failure kind carries the hint printed under the error: what to check or do
next. Expected failures (network, auth, bad input, timeouts, balance) print the
error and the hint, never a traceback (`--debug` adds it). Light to import: the
error classes of the client, nothing else until something failed.

| code | meaning |
| --- | --- |
| 0 | ok |
| 1 | unexpected failure (a bug: `--debug` shows the traceback) |
| 2 | bad input: nothing was submitted or paid for |
| 3 | the API token was refused |
| 4 | the account balance is too low |
| 5 | timed out waiting (the job may still finish) |
| 6 | the job failed or was cancelled (`result`; `batch`: rows failed, no `--allow-partial`) |
| 7 | the submit's outcome is unknown (it may have been billed; not resent) |
| 8 | the API could not be reached (network, wrong base URL) |
| 9 | the request was submitted, but its outputs could not all be saved |
| 130 | interrupted (Ctrl-C) |
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from ..client import errors
from ..client.pricing import BudgetExceededError
from ..errors import NanoBananaError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_AUTH = 3
EXIT_BALANCE = 4
EXIT_TIMEOUT = 5
EXIT_JOB_FAILED = 6
EXIT_OUTCOME_UNKNOWN = 7
EXIT_UNREACHABLE = 8
EXIT_NOT_SAVED = 9
EXIT_OVER_BUDGET = 10
EXIT_INTERRUPTED = 130

OFFLINE_HINT = 'For offline work, start the emulator: eval "$(nanobanana emulator --print-env)".'


class UsageError(NanoBananaError, ValueError):
    """A command line that cannot work as given (e.g. a credentials block that does not
    exist); found before anything is submitted."""


@dataclass(frozen=True)
class FailureContext:
    """What the hints may name: the API base URL the verb used, whether the verb has a
    `--credentials` flag (a hint must not suggest a flag that is not there), and the
    request the verb had submitted before it failed (then nothing is "not paid for")."""

    base_url: str | None = None
    has_credentials_flag: bool = False
    submitted_request_id: str | None = None


def _auth_hint(context: FailureContext) -> str:
    block = " (or pass --credentials BLOCK)" if context.has_credentials_flag else ""
    return f"Set RUNCOMFY_API_TOKEN{block} to a valid token. {OFFLINE_HINT}"


def _unreachable_hint(context: FailureContext) -> str:
    where = f"the base URL {context.base_url}" if context.base_url else "the base URL"
    block = ", the credentials block's base_url" if context.has_credentials_flag else ""
    return (
        f"Check {where} (set by RUNCOMFY_BASE_URL, --base-url{block}; the real API is "
        f"https://model-api.runcomfy.net) and your network. {OFFLINE_HINT}"
    )


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    """Input errors raised before anything is paid; imported only once something failed."""
    from pydantic import ValidationError

    from ..storage import LocationError, ManifestError, StagingError

    # Raised only where the blocks module is loaded: a failed `status` must not wait
    # for Prefect's import just to be told it is not that error.
    blocks = sys.modules.get(f"{__name__.rsplit('.', 2)[0]}.blocks.credentials")
    return (
        UsageError,
        *((blocks.CredentialsNotFoundError,) if blocks is not None else ()),
        errors.InvalidRequestError,
        errors.NotFoundError,
        ValidationError,
        LocationError,
        StagingError,
        ManifestError,
        FileNotFoundError,
    )


def _not_saved_errors() -> tuple[type[BaseException], ...]:
    from ..storage import ArchiveError

    return (ArchiveError,)


Hint = str | Callable[[FailureContext], str]

_NOT_SAVED_HINT = (
    "The outputs stay at RunComfy for a while: "
    "`nanobanana result REQUEST_ID --download DIR` saves them."
)

# Most specific first: the first matching class decides the exit code and the hint.
_FAILURES: list[tuple[tuple[type[BaseException], ...], int, Hint]] = [
    ((errors.AuthenticationError, errors.PermissionDeniedError), EXIT_AUTH, _auth_hint),
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
        (BudgetExceededError,),
        EXIT_OVER_BUDGET,
        "Raise --max-cost or --daily-budget, or run fewer rows; "
        "`nanobanana batch ... --dry-run` shows the estimate.",
    ),
    (
        (errors.SubmitOutcomeUnknownError,),
        EXIT_OUTCOME_UNKNOWN,
        "Look at your RunComfy request history before submitting again.",
    ),
    ((errors.APIConnectionError,), EXIT_UNREACHABLE, _unreachable_hint),
]


def failure_of(
    error: BaseException, context: FailureContext | None = None
) -> tuple[int, str] | None:
    """The exit code and hint for `error`, or None when it is not a known failure (a bug)."""
    context = context or FailureContext()
    request_id = context.submitted_request_id
    for classes, code, hint in [
        *_FAILURES,
        (_bad_input_errors(), EXIT_BAD_INPUT, "Fix the input named above; nothing was paid for."),
        (_not_saved_errors(), EXIT_NOT_SAVED, _NOT_SAVED_HINT),
    ]:
        if not isinstance(error, classes):
            continue
        text = hint(context) if callable(hint) else hint
        if request_id is None:
            return code, text
        if code == EXIT_BAD_INPUT:
            # Found after the submit, so not the input's fault, and the request is paid.
            code = EXIT_NOT_SAVED
            text = (
                "The request was submitted, so it may be billed: "
                "`nanobanana result REQUEST_ID` shows what RunComfy still has of it."
            )
        elif "REQUEST_ID" not in text:
            text += f" Request {request_id} was submitted: `nanobanana result REQUEST_ID`."
        return code, text.replace("REQUEST_ID", request_id)
    return None
