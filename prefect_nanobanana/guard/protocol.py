"""The one submit guard: every paid submit of the package goes through `submit_once`.

A submit is billed and the API has no idempotency key, so each logical job has a
*job key* and a record in a store (`records.py`: the archive's ledger, Prefect's
result store + flow-run labels, or memory), and the guard keeps one rule for all:

1. **Claim.** Before sending, the guard *creates* the job's record as "submitting"
   (an atomic create: of two runs, on two machines, exactly one wins). A record that
   says "failed" (the server refused, or the job failed) may be claimed again, by a
   conditional replace, so again only one claimant wins.
2. **Submit, then record.** The winner submits and replaces its claim with the
   request id at once (conditionally; only the claim's owner can). A submit the
   server provably refused (auth, validation, balance, rate limit) turns the claim
   into "failed", so a retry may claim it again.
3. **Adopt.** Whoever finds a request id in the record never submits: it takes that
   request (`resumed` when its own earlier attempt made it, `adopted` when another
   run did) and waits on it like on its own. Whoever finds a live "submitting"
   claim waits until the owner records the id, then adopts it.
4. **Outcome unknown.** A "submitting" claim whose owner died mid-submit (or whose
   submit ended ambiguously: a 5xx, a read timeout) stays as it is: RunComfy may or
   may not have billed it, so the guard raises `SubmitOutcomeUnknownError` (the one
   error for it) instead of paying again.

A claim is alive while its owner is: the same process knows its claims in flight,
the same host asks whether the owner's pid runs, another host trusts a claim for
`SUBMIT_CLAIM_SECONDS`. Once the id is recorded, archiving is claimed the same way
(`archive_claim`), so every output is archived once even when two runs wait on
one request. A caller that will archive what it submits (a batch row) claims the
archiving in the same write as the request id (`hold_archiving`): on S3 that is a
request a row fewer, and the cost is only that another host trusts that claim for
`HELD_ARCHIVE_GRACE_SECONDS` after the request ended, so an owner that takes longer
to archive may see a second run archive the same outputs too (idempotent).

A request id the API issued is recorded even when the process is told to stop
just after: a run's stop never interrupts a submit (see `prefect_nanobanana.stop`),
blocking submits defer signals until the id is recorded, and records still being
written when the process exits are written on the way out.

Which of these applies to a record is decided in one place, `decide`: "done",
"adopt", "wait", "pay" or "unknown", asked by the batch's planning, its dry run
and the claim alike.

**Job keys**, one scheme (`storage.job_key_for`): sha256 of the prompt, the sources
(as the user gave them, signatures removed), the options, and a row id or scope.
A batch row's key is its content and row id (so a rerun, or a second run of the
same manifest, finds it); a task's default key adds the flow run id as scope (a
retry or rerun of that flow run resumes its request; pass `job_key` to span runs).

Also here: the one way to withdraw a request that is still queued when the run
that owns it stops (`withdraw`, `cancel_if_queued`). Knows nothing of Prefect:
the Prefect layer (`tasks.guard`) passes in its run's id and logger.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import datetime, timezone
from typing import Any, Literal, NamedTuple
from uuid import uuid4

from anyio import to_thread
from pydantic import BaseModel, Field

from ..client import (
    AsyncRunComfyClient,
    NanoBananaEditInput,
    RequestStatus,
    RunComfyClient,
    RunComfyError,
    SubmitOutcomeUnknownError,
    WaitTimeoutError,
)
from ..client.pricing import BudgetExceededError
from ..redaction import redact, redact_text
from ..stop import RunStopped
from .records import ClaimOwner, LedgerEntry, RecordStore, VersionedEntry

__all__ = [
    "ARCHIVE_CLAIM_SECONDS",
    "SUBMIT_CLAIM_SECONDS",
    "ArchiveTurn",
    "Decision",
    "SubmittedRequest",
    "Unread",
    "abandons_request",
    "acancel_if_queued",
    "archive_claim",
    "cancel_if_queued",
    "claim_alive",
    "decide",
    "end_archiving_claim",
    "let_go",
    "log_cancel_outcome",
    "mark_archived",
    "mark_failed",
    "new_owner",
    "outcome_unknown",
    "release_archiving",
    "submit_once",
    "withdraw",
]

# A "submitting" claim made on another host is trusted this long: the submit's own
# timeouts and its retries of refusals (connection refused, 429) end well before.
SUBMIT_CLAIM_SECONDS = 300.0
# An archiving claim made on another host is trusted this long (large outputs).
ARCHIVE_CLAIM_SECONDS = 900.0
# An archiving claim made with the request id on another host (`hold_archiving`) is
# trusted this long once the request has ended, not the whole ARCHIVE_CLAIM_SECONDS
# from its submit: a live owner has then long since archived (its wait sees the end
# within seconds), and one whose machine died would otherwise hold its rows' archives
# up for a quarter of an hour. Should the owner still be at it, both archive: the
# same keys, the same bytes.
HELD_ARCHIVE_GRACE_SECONDS = 60.0
# How often a waiting claimant reads the record again: quick at first, then calmer.
_WAIT_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0)

logger = logging.getLogger(__name__)
Log = logging.Logger | logging.LoggerAdapter  # type: ignore[type-arg]


class SubmittedRequest(BaseModel):
    """The request a job key owns, and how this caller came to hold it."""

    job_key: str
    request_id: str
    status_url: str | None = None
    result_url: str | None = None
    cancel_url: str | None = None
    submitted_at: datetime | None = Field(
        default=None, description="Unknown when resumed from a flow-run label alone."
    )
    resumed: bool = Field(default=False, description="An earlier attempt of this run made it.")
    adopted: bool = Field(default=False, description="Another run submitted it; not paid here.")
    submitted_by: str | None = Field(
        default=None, description="The flow run that submitted it, when known."
    )
    archiving_token: str | None = Field(
        default=None,
        exclude=True,
        repr=False,
        description="The archiving claim written with the request id (`hold_archiving`), "
        "live in this process until `archive_claim` or `release_archiving` ends it.",
    )
    record: VersionedEntry | None = Field(
        default=None,
        exclude=True,
        repr=False,
        description="The job's record as this caller last wrote or read it: the version a "
        "next conditional write names, so it need not read the record first.",
    )


# --------------------------------------------------------------------------- job keys


# --------------------------------------------------------------------------- owners


# Tokens of the claims this process holds right now (a claim outlives no process).
_LIVE_CLAIMS: set[str] = set()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def new_owner(run_id: str | None = None) -> ClaimOwner:
    """A claim owner for this process, this run (`run_id`, if any) and this moment."""
    return ClaimOwner(
        token=uuid4().hex,
        host=socket.gethostname(),
        pid=os.getpid(),
        flow_run_id=run_id,
        claimed_at=_now(),
    )


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it runs, as another user
    return True


def claim_alive(owner: ClaimOwner | None, trusted_seconds: float) -> bool:
    """Whether the process that made a claim may still be working on it."""
    if owner is None:
        return False
    if owner.host == socket.gethostname() and owner.pid == os.getpid():
        return owner.token in _LIVE_CLAIMS
    # No claim is worked on longer than `trusted_seconds`, even by a process that runs on.
    young = (_now() - owner.claimed_at).total_seconds() < trusted_seconds
    if owner.host == socket.gethostname():
        return young and _pid_runs(owner.pid)
    return young


def _same_run(owner: ClaimOwner | None, me: ClaimOwner) -> bool:
    if owner is None:
        return False
    if owner.flow_run_id or me.flow_run_id:
        return owner.flow_run_id == me.flow_run_id
    return (owner.host, owner.pid) == (me.host, me.pid)


# --------------------------------------------------------------------------- errors


def outcome_unknown(job_key: str, where: str) -> SubmitOutcomeUnknownError:
    """The one "outcome unknown" error: a claim stopped mid-submit; nothing is sent again.

    Args:
        job_key: The job whose submit may or may not have been billed.
        where: Where its record is, so a person can check it (and delete it to resubmit).

    Returns:
        The `SubmitOutcomeUnknownError` to raise (exit code 7 on the command line).
    """
    return SubmitOutcomeUnknownError(
        f"An earlier attempt of job {job_key!r} stopped while submitting, so RunComfy may or "
        "may not have accepted (and billed) that request. It was NOT submitted again. Check "
        "your RunComfy request history; to submit anew on purpose, run with a new job_key "
        f"(or delete the record: {where})"
    )


# --------------------------------------------------------------------------- store calls


async def _read(store: RecordStore, job_key: str) -> VersionedEntry | None:
    return await to_thread.run_sync(store.read, job_key)


async def _create(store: RecordStore, entry: LedgerEntry) -> str | None:
    return await to_thread.run_sync(store.create, entry)


async def _replace(store: RecordStore, entry: LedgerEntry, version: str) -> str | None:
    return await to_thread.run_sync(store.replace, entry, version)


# --------------------------------------------------------------------------- pending records

# Request ids the API issued whose record is being written. A process that exits
# meanwhile (an exception on the main thread while a sync task's guard runs on
# Prefect's loop thread) writes them on its way out: an issued id is always
# recorded. The exit hook is registered on the first submit, not on import.
_PENDING: dict[str, tuple[RecordStore, LedgerEntry, str]] = {}
_PENDING_LOCK = threading.Lock()
_EXIT_HOOKED = False


def _flush_pending() -> None:
    with _PENDING_LOCK:
        pending = list(_PENDING.values())
        _PENDING.clear()
    for store, entry, version in pending:
        with contextlib.suppress(Exception):
            store.replace(entry, version)  # None: it was written meanwhile


def _hook_exit() -> None:
    global _EXIT_HOOKED
    with _PENDING_LOCK:
        if not _EXIT_HOOKED:
            atexit.register(_flush_pending)
            _EXIT_HOOKED = True


async def _record(store: RecordStore, entry: LedgerEntry, version: str) -> str | None:
    """Write the request id over the claim, even if this run is being cancelled meanwhile."""
    _hook_exit()
    with _PENDING_LOCK:
        _PENDING[entry.owner.token if entry.owner else entry.job_key] = (store, entry, version)
    writing = asyncio.ensure_future(_replace(store, entry, version))
    try:
        return await asyncio.shield(writing)
    except asyncio.CancelledError:
        # The run stops: the write goes on in its thread; wait for it, then stop.
        with contextlib.suppress(Exception):
            await writing
        raise
    finally:
        with _PENDING_LOCK:
            _PENDING.pop(entry.owner.token if entry.owner else entry.job_key, None)


# --------------------------------------------------------------------------- the guard


Decision = Literal["done", "adopt", "wait", "pay", "unknown"]


def decide(entry: LedgerEntry | None) -> Decision:
    """What a job's record says to do with it: the one answer that planning, a dry run
    and the claim all ask for.

    - "pay": no record, or one that says the job failed (refused, withdrawn, or the
      job failed): a submit may be claimed;
    - "done": archived; nothing to do;
    - "adopt": a request id is recorded: wait on that request, never pay again;
    - "wait": another run is submitting right now: its request id is coming;
    - "unknown": a claim whose owner stopped mid-submit: RunComfy may or may not have
      billed it, so nothing is sent again (`SubmitOutcomeUnknownError`).
    """
    if entry is None or entry.status == "failed":
        return "pay"
    if entry.status == "archived":
        return "done"
    if entry.request_id and entry.status in ("submitted", "archiving"):
        return "adopt"
    return "wait" if claim_alive(entry.owner, SUBMIT_CLAIM_SECONDS) else "unknown"


def _held(versioned: VersionedEntry, me: ClaimOwner, log: Log) -> SubmittedRequest:
    """The request a record names, as this caller now holds it (resumed or adopted)."""
    entry = versioned.entry
    assert entry.request_id is not None
    same_run = _same_run(entry.owner, me)
    log.info(
        "Job %s already owns RunComfy request %s (%s); %s it instead of submitting again",
        entry.job_key,
        entry.request_id,
        "submitted by this run" if same_run else "submitted by another run",
        "resuming" if same_run else "adopting",
    )
    return SubmittedRequest(
        job_key=entry.job_key,
        request_id=entry.request_id,
        status_url=entry.facts.get("status_url"),
        result_url=entry.facts.get("result_url"),
        cancel_url=entry.facts.get("cancel_url"),
        submitted_at=entry.submitted_at if entry.owner is not None else None,
        resumed=same_run,
        adopted=not same_run,
        submitted_by=entry.owner.flow_run_id if entry.owner else None,
        record=versioned,
    )


def _claim_over(entry: LedgerEntry, me: ClaimOwner) -> LedgerEntry:
    """A "submitting" claim replacing a failed record; its request id goes to the history."""
    history = list(entry.previous_request_ids)
    if entry.request_id:
        history.append(entry.request_id)
    now = _now()
    return LedgerEntry(
        job_key=entry.job_key,
        status="submitting",
        submitted_at=now,
        updated_at=now,
        previous_request_ids=history,
        owner=me,
    )


Unread = object()


async def submit_once(
    job_key: str,
    store: RecordStore,
    client: AsyncRunComfyClient,
    edit: NanoBananaEditInput | None,
    *,
    facts: Mapping[str, Any] | None = None,
    before_submit: Callable[[], Awaitable[None]] | None = None,
    known: VersionedEntry | object | None = Unread,
    hold_archiving: bool = False,
    run_id: str | None = None,
    log: Log = logger,
) -> SubmittedRequest:
    """The request of `job_key`: the one its record names, else one paid `submit()`.

    Args:
        job_key: The logical job (see the module docstring for the scheme).
        store: Where the job's record lives.
        client: Sends the edit: the one call of the client's paid submit in the
            package, made at most once, and only by the claim's winner.
        edit: What to submit; None when the caller could not prepare it (a batch row
            whose inputs were not staged because another run held the claim when
            it planned): then the guard can only adopt, and a won claim is released.
        facts: Kept in the record with the request id (model, parameters, sources…).
        before_submit: Runs after the claim is won and just before the paid submit
            (a budget check); raising there releases the claim, nothing is sent.
        known: The job's record as the caller just read it (a batch's plan), to
            save a read; the guard reads again whenever a write loses.
        hold_archiving: The caller will archive what it submits: the request id's write
            also claims the archiving (`SubmittedRequest.archiving_token`), which the
            caller then ends with `archive_claim` or `release_archiving`.
        run_id: The run this caller works for (a flow run id): a later attempt of the
            same run resumes the request instead of adopting it.
        log: Where to say what the guard did (adopted, could not record).

    Returns:
        The request the job owns: submitted now, or `resumed` / `adopted`.

    Raises:
        SubmitOutcomeUnknownError: A claim stopped mid-submit (now or earlier).
        RunComfyError: The server refused the submit (the claim is released).
    """
    me = new_owner(run_id)
    _LIVE_CLAIMS.add(me.token)
    try:
        claim, version = await _claim(job_key, store, me, known, log)
        if version is None:
            return claim  # type: ignore[return-value]  # a request held, not a claim
        return await _submit_claimed(
            store, claim, version, client, edit, facts, before_submit, hold_archiving, log
        )
    finally:
        _LIVE_CLAIMS.discard(me.token)


async def _claim(
    job_key: str,
    store: RecordStore,
    me: ClaimOwner,
    known: VersionedEntry | object | None,
    log: Log,
) -> tuple[Any, str | None]:
    """(claim, version) when this caller won the claim, (request, None) when one exists."""
    # A record handed in (`known`, from the plan's listing) may be stale: it may show a
    # claim whose owner has since recorded its request id. Only a fresh read may
    # declare a claim dead.
    fresh = known is Unread
    versioned = await _read(store, job_key) if fresh else known
    waits = 0
    while True:
        assert versioned is None or isinstance(versioned, VersionedEntry)
        decision = decide(versioned.entry if versioned is not None else None)
        if decision in ("done", "adopt"):
            assert versioned is not None
            return _held(versioned, me, log), None
        if decision == "pay":
            if versioned is None:
                now = _now()
                claim = LedgerEntry(
                    job_key=job_key,
                    status="submitting",
                    submitted_at=now,
                    updated_at=now,
                    owner=me,
                )
                if (version := await _create(store, claim)) is not None:
                    return claim, version
            else:  # "failed": refused, withdrawn, or the job failed; may be submitted again
                claim = _claim_over(versioned.entry, me)
                if (version := await _replace(store, claim, versioned.version)) is not None:
                    return claim, version
        elif decision == "unknown":
            if fresh:
                raise outcome_unknown(job_key, store.location(job_key))
        else:  # "wait": another run is submitting right now; its request id is coming
            await asyncio.sleep(_WAIT_DELAYS[min(waits, len(_WAIT_DELAYS) - 1)])
            waits += 1
        versioned, fresh = await _read(store, job_key), True


async def _submit_claimed(
    store: RecordStore,
    claim: LedgerEntry,
    version: str,
    client: AsyncRunComfyClient | RunComfyClient,
    edit: NanoBananaEditInput | None,
    facts: Mapping[str, Any] | None,
    before_submit: Callable[[], Awaitable[None]] | None,
    hold_archiving: bool,
    log: Log,
) -> SubmittedRequest:
    try:
        if edit is None:
            raise ValueError(
                f"job {claim.job_key}: its inputs were not prepared by this run (another run "
                "held the job when this one planned); rerun to take it up"
            )
        if before_submit is not None:
            await before_submit()
        if isinstance(client, RunComfyClient):
            handle = await to_thread.run_sync(client.submit_edit, edit)
        else:
            handle = await client.submit_edit(edit)
    except SubmitOutcomeUnknownError:
        raise  # the claim stays "submitting": a rerun must not submit blindly
    except (RunComfyError, ValueError, BudgetExceededError, RunStopped) as error:
        # Provably not sent (refused, held back by the budget, or stopped before sending):
        # release the claim.
        released = claim.model_copy(
            update={"status": "failed", "updated_at": _now(), "error": _error_text(error)}
        )
        with contextlib.suppress(Exception):
            await _replace(store, released, version)
        raise
    now = _now()
    archiver = (
        new_owner(claim.owner.flow_run_id if claim.owner else None) if hold_archiving else None
    )
    if archiver is not None:
        _LIVE_CLAIMS.add(archiver.token)
    recorded = claim.model_copy(
        update={
            "status": "submitted",
            "archiver": archiver,
            "request_id": handle.request_id,
            "submitted_at": now,
            "updated_at": now,
            "facts": redact(
                {
                    **(facts or {}),
                    "status_url": handle.status_url,
                    "result_url": handle.result_url,
                    "cancel_url": handle.cancel_url,
                }
            ),
        }
    )
    submitted = SubmittedRequest(
        job_key=claim.job_key,
        request_id=handle.request_id,
        status_url=handle.status_url,
        result_url=handle.result_url,
        cancel_url=handle.cancel_url,
        submitted_at=now,
        submitted_by=claim.owner.flow_run_id if claim.owner else None,
    )
    try:
        if (recorded_version := await _record(store, recorded, version)) is None:
            raise RuntimeError("the claim was overwritten while submitting")
        submitted.record = VersionedEntry(recorded, recorded_version)
        submitted.archiving_token = archiver.token if archiver is not None else None
    except BaseException as error:
        if archiver is not None:
            _LIVE_CLAIMS.discard(archiver.token)
        if not isinstance(error, Exception):
            raise
        log.warning(
            "Could not record RunComfy request %s for job %s; this run goes on with it, but "
            "a rerun after a crash will refuse to submit again until you check the request "
            "history",
            submitted.request_id,
            submitted.job_key,
            exc_info=True,
        )
    return submitted


def _error_text(error: BaseException) -> str:
    return redact_text(f"{type(error).__name__}: {error}")


# --------------------------------------------------------------------------- after the wait


class ArchiveTurn(NamedTuple):
    """What `archive_claim` found: another run's archive, or this caller's turn."""

    elsewhere: LedgerEntry | None
    """The record another run archived (its locations), or None: archive now."""
    claim: VersionedEntry | None
    """This caller's archiving claim as written (None without a record): `mark_archived`
    names its version instead of reading the record first."""
    started_before: bool = True
    """Whether an archiving of the request may have begun before (a run that died while
    archiving, or no record to tell): then look for what it wrote."""


def _archiving_elsewhere(entry: LedgerEntry, held_token: str | None, waited: float) -> bool:
    """Whether another run may still be archiving the job, after this caller has waited
    `waited` seconds for it since its own wait on the request ended."""
    archiver = entry.archiver
    if entry.status not in ("submitted", "archiving") or archiver is None:
        return False
    if archiver.token == held_token or not claim_alive(archiver, ARCHIVE_CLAIM_SECONDS):
        return False
    held_elsewhere = entry.status == "submitted" and archiver.host != socket.gethostname()
    return not (held_elsewhere and waited >= HELD_ARCHIVE_GRACE_SECONDS)


async def _claim_archive(
    store: RecordStore,
    job_key: str,
    me: ClaimOwner,
    known: VersionedEntry | None,
    held_token: str | None = None,
    waited: float = 0.0,
) -> ArchiveTurn:
    """This caller's turn (holding the archiving), or the record of whoever archived or does.

    `known` (the record as this caller last wrote it) saves the first read; a stale
    one only makes the conditional write lose, and then the record is read. When
    `known` is the caller's own id write that claimed the archiving (`held_token`),
    the turn is its own without a write.
    """
    if (
        known is not None
        and held_token is not None
        and held_token in _LIVE_CLAIMS
        and known.entry.archiver is not None
        and known.entry.archiver.token == held_token
    ):
        return ArchiveTurn(None, known, started_before=False)
    versioned = known
    while True:
        if versioned is None:
            versioned = await _read(store, job_key)
        if versioned is None:
            return ArchiveTurn(None, None)  # no record (a store that lost it): archive
        entry = versioned.entry
        if entry.status == "archived":
            return ArchiveTurn(entry, None)
        if _archiving_elsewhere(entry, held_token, waited):
            return ArchiveTurn(entry, None)
        claimed = entry.model_copy(
            update={"status": "archiving", "archiver": me, "updated_at": _now()}
        )
        if (version := await _replace(store, claimed, versioned.version)) is not None:
            started = entry.status == "archiving" or entry.archiver is not None
            return ArchiveTurn(None, VersionedEntry(claimed, version), started)
        versioned = None


async def _wait_archived(store: RecordStore, job_key: str, since: float) -> LedgerEntry | None:
    """The record once another run's archiving ended well; None if it died or failed
    (or, held with the request id on another host, is overdue: see `_archiving_elsewhere`)."""
    waits = 0
    while True:
        versioned = await _read(store, job_key)
        if versioned is None:
            return None
        entry = versioned.entry
        if entry.status == "archived":
            return entry
        if not _archiving_elsewhere(entry, None, time.monotonic() - since):
            return None
        await asyncio.sleep(_WAIT_DELAYS[min(waits, len(_WAIT_DELAYS) - 1)])
        waits += 1


@contextlib.asynccontextmanager
async def archive_claim(
    store: RecordStore,
    job_key: str,
    known: VersionedEntry | None = None,
    held_token: str | None = None,
    run_id: str | None = None,
) -> AsyncIterator[ArchiveTurn]:
    """Hold the archiving of a finished request, so its outputs are archived once.

    Yields this caller's turn (`elsewhere` None: archive now, holding the claim until
    the block ends; `mark_archived` inside it, with `known=turn.claim`), or the
    record another run archived, with its locations: then there is nothing to do.
    A run that died while archiving is taken over (archiving is idempotent: it costs
    nothing and writes only what is missing). `known` is the record as the caller
    last wrote it (`SubmittedRequest.record`): on S3 a read fewer per row.
    `held_token` (`SubmittedRequest.archiving_token`): the archiving this caller
    claimed with the request id, which ends with the block.

    Args:
        store: Where the job's record lives.
        job_key: The job.
        known: The record as the caller last wrote it, to save a read.
        held_token: The archiving claim taken with the request id, if any.
        run_id: The run this caller works for.

    Yields:
        An `ArchiveTurn`: archive now (`elsewhere` is None), or the record of the
        run that archived it.
    """
    me = new_owner(run_id)
    _LIVE_CLAIMS.add(me.token)
    held = held_token
    since = time.monotonic()
    try:
        while True:
            waited = time.monotonic() - since
            turn = await _claim_archive(store, job_key, me, known, held, waited)
            if turn.elsewhere is None:
                break
            known, held = None, None
            archived_elsewhere = await _wait_archived(store, job_key, since)
            if archived_elsewhere is not None:
                turn = ArchiveTurn(archived_elsewhere, None)
                break
        yield turn
    finally:
        _LIVE_CLAIMS.discard(me.token)
        if held_token is not None:
            _LIVE_CLAIMS.discard(held_token)


def end_archiving_claim(submitted: SubmittedRequest) -> str | None:
    """Stop holding, in this process, the archiving claimed with the request id; the
    token it held, if any. Safe to call more than once, on any way out."""
    token, submitted.archiving_token = submitted.archiving_token, None
    if token is not None:
        _LIVE_CLAIMS.discard(token)
    return token


async def release_archiving(store: RecordStore, submitted: SubmittedRequest) -> None:
    """End the archiving claim the request id's write made, in the record too, when the
    caller will not archive after all: so a run on another host need not wait for it.

    A record written since (failed, withdrawn) is left as it is.
    """
    if end_archiving_claim(submitted) is None or submitted.record is None:
        return
    released = submitted.record.entry.model_copy(update={"archiver": None, "updated_at": _now()})
    with contextlib.suppress(Exception):
        await _replace(store, released, submitted.record.version)


async def _settle(
    store: RecordStore,
    job_key: str,
    update: dict[str, Any],
    known: VersionedEntry | None = None,
    only_if: Callable[[LedgerEntry], bool] | None = None,
) -> LedgerEntry | None:
    """Apply `update` to the job's record (from `known` first, if given), rereading when
    another writer came first; left alone (None) when `only_if` says the record moved on."""
    versioned = known
    while True:
        if versioned is None:
            versioned = await _read(store, job_key)
        if versioned is None or (only_if is not None and not only_if(versioned.entry)):
            return None
        settled = versioned.entry.model_copy(update={**update, "updated_at": _now()})
        if await _replace(store, settled, versioned.version) is not None:
            return settled
        versioned = None


async def mark_archived(
    store: RecordStore,
    job_key: str,
    *,
    metadata_location: str | None,
    output_locations: list[str],
    cost: float | None,
    known: VersionedEntry | None = None,
) -> LedgerEntry | None:
    """Record that the job's outputs are archived (and what it cost): the job is done.

    Args:
        store: Where the job's record lives.
        job_key: The job.
        metadata_location: Where its `metadata.json` went.
        output_locations: Where its outputs went.
        cost: The billed cost (kept for `nanobanana spend`).
        known: The record as the caller last wrote it (`ArchiveTurn.claim`), saving a read.

    Returns:
        The record as written, or None when it could not be written.
    """
    return await _settle(
        store,
        job_key,
        {
            "status": "archived",
            "metadata_location": metadata_location,
            "output_locations": list(output_locations),
            "cost": cost,
            "error": None,
        },
        known,
    )


async def mark_failed(store: RecordStore, job_key: str, error: str | BaseException) -> None:
    """Record that the job failed after its submit (it may be claimed and paid again).

    Args:
        store: Where the job's record lives.
        job_key: The job.
        error: Why it failed (redacted before it is written).
    """
    text = error if isinstance(error, str) else _error_text(error)
    await _settle(store, job_key, {"status": "failed", "error": redact_text(text)})


WITHDRAWN = "withdrawn while queued: the run that submitted it stopped"


async def withdraw(
    store: RecordStore,
    client: AsyncRunComfyClient,
    submitted: SubmittedRequest,
    *,
    log: Log = logger,
) -> str | None:
    """A stopping run lets go of its request: withdrawn if still queued, else left recorded.

    A queued request is cancelled at RunComfy (nothing is billed) and its record
    says "failed: withdrawn", so the next run submits the job again. A running one
    cannot be withdrawn: its record keeps the request id for the next run to adopt,
    and the archiving claimed with it is released so nobody waits for it.

    Returns:
        "cancelled", "not_cancellable", or None when the request was already over or
        the API could not be asked (logged; the record then stays for a rerun to adopt).
    """
    try:
        outcome = await acancel_if_queued(client, submitted.request_id, log=log)
    except RunComfyError as error:
        log.warning("Could not cancel RunComfy request %s: %s", submitted.request_id, error)
        outcome = None
    if outcome == "cancelled":
        end_archiving_claim(submitted)
        await _settle(
            store,
            submitted.job_key,
            {"status": "failed", "error": WITHDRAWN, "archiver": None},
            submitted.record,
            only_if=lambda entry: (
                entry.request_id == submitted.request_id and entry.status == "submitted"
            ),
        )
    else:
        await release_archiving(store, submitted)
    return outcome


async def let_go(
    store: RecordStore,
    client: AsyncRunComfyClient,
    submitted: SubmittedRequest,
    *,
    reason: str,
    log: Log = logger,
) -> bool:
    """A run that stops waiting lets go of the request it holds, and says so.

    Its own request is withdrawn if still queued (`withdraw`); another run's (adopted)
    is left to that run, or the next, to collect.

    Args:
        store: Where the job's record lives.
        client: Cancels the request.
        submitted: The request the run holds.
        reason: Why the run stops waiting, for the log.
        log: Where to say it.

    Returns:
        True when the request was withdrawn (still queued: nothing billed).
    """
    log.info(
        "The run is stopping (%s); letting go of RunComfy request %s", reason, submitted.request_id
    )
    if submitted.adopted:
        return False
    return await withdraw(store, client, submitted, log=log) == "cancelled"


# --------------------------------------------------------------------------- release


def abandons_request(error: BaseException) -> bool:
    """Whether a run is ending for good, so nobody will collect its request.

    Signals, cancellation and interrupts are not `Exception`s; timeouts are. Other
    errors (say, the API down for a while) leave the request alone, so a retry of
    the flow run can resume it.

    Args:
        error: What ended the run's wait.

    Returns:
        True when the request should be withdrawn if it is still queued.
    """
    return not isinstance(error, Exception) or isinstance(error, (TimeoutError, WaitTimeoutError))


def log_cancel_outcome(log: Log, request_id: str, outcome: str) -> None:
    """The one wording for what a cancel achieved; in-progress jobs run on, and say so."""
    if outcome == "cancelled":
        log.info("Cancelled queued RunComfy request %s", request_id)
    else:
        log.warning(
            "RunComfy request %s is already running (or finished) and cannot be cancelled; "
            "it will still be billed. Collect its output later with its request id, e.g. "
            "`get_request_result(%r)`",
            request_id,
            request_id,
        )


def _cancel_outcome(status: RequestStatus) -> str | None:
    """None: over already; "not_cancellable": running; "cancel": queued, to be cancelled."""
    if status.is_terminal:
        return None
    return "not_cancellable" if status.status == "in_progress" else "cancel"


def cancel_if_queued(client: RunComfyClient, request_id: str, *, log: Log = logger) -> str | None:
    """Cancel `request_id` if it still waits in the queue; what happened, or None if over.

    A queued job is withdrawn (nothing is billed), a running one is reported with
    its request id so its output can still be collected, and a finished one is
    left alone.

    Args:
        client: A blocking client.
        request_id: The request.
        log: Where to say what happened.

    Returns:
        "cancelled", "not_cancellable", or None when the request was over already.
    """
    outcome = _cancel_outcome(client.status(request_id))
    if outcome == "cancel":
        outcome = client.cancel(request_id).outcome
    if outcome is not None:
        log_cancel_outcome(log, request_id, outcome)
    return outcome


async def acancel_if_queued(
    client: AsyncRunComfyClient, request_id: str, *, log: Log = logger
) -> str | None:
    """`cancel_if_queued` with the async client."""
    outcome = _cancel_outcome(await client.status(request_id))
    if outcome == "cancel":
        outcome = (await client.cancel(request_id)).outcome
    if outcome is not None:
        log_cancel_outcome(log, request_id, outcome)
    return outcome
