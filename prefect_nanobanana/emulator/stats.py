"""What the emulator saw: the evidence tests and benchmarks assert on.

A client's claims ("a 429 was retried", "a submit was never repeated", "the
service fetched the pre-signed URL", "polling stayed quiet") are only
checkable from the server's side, so every call is counted here. Snapshots are
plain frozen values, and travel as JSON through `GET /_emulator/stats` for
emulators running in another process.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .faults import Fault

# Endpoint names as counted; the file endpoint is "output" (faults call it "files").
ENDPOINTS = ("submit", "status", "result", "cancel", "output", "model")
CANCEL_OUTCOMES = ("cancelled", "not_cancellable")


@dataclass(frozen=True)
class RequestCalls:
    """How often one request id was named in each per-request endpoint."""

    status: int = 0
    result: int = 0
    cancel: int = 0
    output: int = 0


@dataclass(frozen=True)
class EmulatorStats:
    """A snapshot of the counters since start or the last reset.

    `calls` counts every call, including those a fault answered, so
    `submits_received` (= calls["submit"]) against `submits_accepted` (jobs
    created, including those whose answer a fault then lost with after_accept)
    shows whether a client ever submitted twice. `cancel_attempts` (=
    calls["cancel"]) and `cancel_outcomes` tell cancels that came too late.
    `jobs_by_status`, `peak_in_progress` and `spent_usd` describe the job table,
    which a reset does not empty (peak restarts from the current load).
    """

    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENDPOINTS, 0))
    submits_received: int = 0
    submits_accepted: int = 0
    cancel_attempts: int = 0
    cancel_outcomes: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(CANCEL_OUTCOMES, 0)
    )
    fetched_input_urls: list[str] = field(default_factory=list)
    requests: dict[str, RequestCalls] = field(default_factory=dict)
    faults_fired: dict[str, int] = field(default_factory=dict)
    jobs_by_status: dict[str, int] = field(default_factory=dict)
    peak_in_progress: int = 0
    spent_usd: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, the body of `GET /_emulator/stats`."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EmulatorStats:
        """Read `to_json` output back, e.g. from another process's control endpoint."""
        values = {item.name: data[item.name] for item in fields(cls) if item.name in data}
        values["requests"] = {
            request_id: RequestCalls(**calls)
            for request_id, calls in dict(values.get("requests", {})).items()
        }
        return cls(**values)


@dataclass(frozen=True)
class JobTableSummary:
    """The part of the stats that the job table, not the request counters, knows."""

    jobs_by_status: dict[str, int]
    peak_in_progress: int
    spent_usd: float


class StatsRecorder:
    """Thread-safe counters behind `EmulatorStats`; handler and worker threads write here."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._calls: Counter[str] = Counter()
            self._submits_accepted = 0
            self._cancel_outcomes: Counter[str] = Counter()
            self._fetched: list[str] = []
            self._requests: dict[str, Counter[str]] = {}
            self._faults_fired: Counter[str] = Counter()

    def record_call(self, endpoint: str, request_id: str | None = None) -> None:
        with self._lock:
            self._calls[endpoint] += 1
            if request_id is not None:
                self._requests.setdefault(request_id, Counter())[endpoint] += 1

    def record_faults(self, faults: Iterable[Fault]) -> None:
        with self._lock:
            self._faults_fired.update(fault.kind for fault in faults)

    def record_submit_accepted(self) -> None:
        with self._lock:
            self._submits_accepted += 1

    def record_cancel_outcome(self, outcome: str) -> None:
        with self._lock:
            self._cancel_outcomes[outcome] += 1

    def record_fetch(self, url: str) -> None:
        with self._lock:
            self._fetched.append(url)

    def snapshot(self, jobs: JobTableSummary) -> EmulatorStats:
        with self._lock:
            return EmulatorStats(
                calls={endpoint: self._calls[endpoint] for endpoint in ENDPOINTS},
                submits_received=self._calls["submit"],
                submits_accepted=self._submits_accepted,
                cancel_attempts=self._calls["cancel"],
                cancel_outcomes={
                    outcome: self._cancel_outcomes[outcome] for outcome in CANCEL_OUTCOMES
                },
                fetched_input_urls=list(self._fetched),
                requests={
                    request_id: RequestCalls(**calls)
                    for request_id, calls in self._requests.items()
                },
                faults_fired=dict(self._faults_fired),
                jobs_by_status=dict(jobs.jobs_by_status),
                peak_in_progress=jobs.peak_in_progress,
                spent_usd=jobs.spent_usd,
            )
