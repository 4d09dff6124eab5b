"""Injected faults: what can go wrong on the wire or in a job, and when it happens.

Resilience code is only trustworthy when every failure it claims to handle can
be produced on demand, deterministically. A `Fault` says *what* (its kind) and
*when* (which calls of which endpoint); a `FaultPlan` is the list of them for a
run; `FaultInjector` is the emulator's counting state that decides, call by
call, which faults fire.

Compact syntax, for the CLI and the control endpoint (`FaultPlan.parse`)::

    spec     = fault ("," fault)*
    fault    = endpoint ":" kind ["@" target] (":" option)*
    endpoint = submit | status | result | cancel | files | model | job | *
    target   = calls | every=N | p=P
    calls    = N or N-M, joined with "+"          (1-based call numbers)
    option   = retry_after=SECONDS | delay=SECONDS | status=HTTP_CODE
             | times=N | after_accept | every=N | p=P

Examples::

    submit:rate_limit@1:retry_after=0.1     first submit gets a 429, Retry-After: 0.1
    status:server_error@every=3             every third status poll gets a 500
    submit:server_error@1:after_accept      first submit is accepted, then answers 500
    result:drop@1+2                         first two result calls lose their connection
    *:slow:delay=0.5:times=10               the next ten calls of any endpoint take 0.5 s
    job:fail_job@p=0.1                      one job in ten (seeded) fails
    job:stuck@2                             the second job never leaves the queue

Without a target a fault fires on every matching call (bounded by `times`).
When several conditions are set they must all hold. `job` faults count accepted
submits (the Nth job created), so `job:fail_job@1` fails the first job.
"""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

HTTP_KINDS = frozenset({"rate_limit", "server_error", "slow", "drop"})
JOB_KINDS = frozenset({"fail_job", "stuck", "expire_output"})
HTTP_ENDPOINTS = ("submit", "status", "result", "cancel", "files", "model")
ANY_ENDPOINT = "*"
JOB_ENDPOINT = "job"

# The stats call the file endpoint "output"; accept that spelling for faults too.
_ENDPOINT_ALIASES = {"output": "files", "outputs": "files"}
_OPTION_NAMES = {
    "retry_after": "retry_after",
    "delay": "delay_seconds",
    "delay_seconds": "delay_seconds",
    "status": "status_code",
    "status_code": "status_code",
    "times": "times",
    "after_accept": "after_accept",
    "every": "every",
    "p": "probability",
    "probability": "probability",
}


@dataclass(frozen=True)
class Fault:
    """One injected failure; see the module docstring for kinds and targeting.

    `endpoint` is one of submit/status/result/cancel/files/model or "*" for the
    wire faults; job faults (fail_job, stuck, expire_output) always count
    accepted submits, whatever endpoint is given.
    """

    kind: str
    endpoint: str = ANY_ENDPOINT
    calls: Sequence[int] | None = None
    every: int | None = None
    probability: float | None = None
    retry_after: float | None = None
    delay_seconds: float | None = None
    status_code: int | None = None
    after_accept: bool = False
    times: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in HTTP_KINDS | JOB_KINDS:
            raise ValueError(
                f"unknown fault kind {self.kind!r}; use one of {sorted(HTTP_KINDS | JOB_KINDS)}"
            )
        endpoint = _ENDPOINT_ALIASES.get(self.endpoint, self.endpoint)
        if self.kind in JOB_KINDS:
            if endpoint not in (ANY_ENDPOINT, JOB_ENDPOINT, "submit"):
                raise ValueError(f"{self.kind} is a job fault; target 'job', not {endpoint!r}")
            endpoint = JOB_ENDPOINT
        elif endpoint not in (*HTTP_ENDPOINTS, ANY_ENDPOINT):
            raise ValueError(
                f"unknown endpoint {self.endpoint!r}; use one of {[*HTTP_ENDPOINTS, ANY_ENDPOINT]}"
            )
        object.__setattr__(self, "endpoint", endpoint)
        if self.calls is not None:
            calls = tuple(int(call) for call in self.calls)
            if not calls or min(calls) < 1:
                raise ValueError("calls must be a non-empty list of 1-based call numbers")
            object.__setattr__(self, "calls", calls)
        if self.every is not None and self.every < 1:
            raise ValueError("every must be at least 1")
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must be between 0 and 1")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be at least 1")
        self._check_kind_options()

    def _check_kind_options(self) -> None:
        """Reject options that the kind would silently ignore: they are always a mistake."""
        if self.retry_after is not None and (self.kind != "rate_limit" or self.retry_after < 0):
            raise ValueError("retry_after is a non-negative number for rate_limit faults only")
        if self.kind == "slow":
            if self.delay_seconds is None or self.delay_seconds < 0:
                raise ValueError("a slow fault needs a non-negative delay_seconds")
        elif self.delay_seconds is not None:
            raise ValueError("delay_seconds is for slow faults only")
        if self.status_code is not None and (
            self.kind != "server_error" or not 500 <= self.status_code <= 599
        ):
            raise ValueError("status_code is a 5xx code for server_error faults only")
        if self.after_accept and (
            self.endpoint != "submit" or self.kind not in ("server_error", "drop")
        ):
            raise ValueError("after_accept is for server_error or drop faults on submit only")

    def to_json(self) -> dict[str, Any]:
        """The fields that differ from their defaults, ready for `json.dumps`."""
        data: dict[str, Any] = {"kind": self.kind, "endpoint": self.endpoint}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name not in data and value != item.default:
                data[item.name] = list(value) if item.name == "calls" else value
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fault:
        """Build a fault from `to_json` output; unknown keys are an error, not ignored."""
        known = {item.name for item in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault fields {sorted(unknown)}")
        return cls(**data)

    def to_spec(self) -> str:
        """This fault in the compact syntax of `FaultPlan.parse`."""
        text = f"{self.endpoint}:{self.kind}"
        if self.calls is not None:
            text += "@" + "+".join(str(call) for call in self.calls)
        options = [
            ("every", self.every),
            ("p", self.probability),
            ("retry_after", self.retry_after),
            ("delay", self.delay_seconds),
            ("status", self.status_code),
            ("times", self.times),
        ]
        text += "".join(f":{name}={value}" for name, value in options if value is not None)
        return text + (":after_accept" if self.after_accept else "")


@dataclass(frozen=True)
class FaultPlan:
    """The faults of one run, in order; an empty plan is a well-behaved service."""

    faults: Sequence[Fault] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "faults", tuple(self.faults))

    @classmethod
    def parse(cls, spec: str) -> FaultPlan:
        """Read the compact syntax described in this module's docstring."""
        return cls([_parse_fault(part) for part in spec.split(",") if part.strip()])

    def to_spec(self) -> str:
        """The plan in the compact syntax; `FaultPlan.parse(plan.to_spec()) == plan`."""
        return ",".join(fault.to_spec() for fault in self.faults)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (`{"faults": [...]}`), the body of `POST /_emulator/faults`."""
        return {"faults": [fault.to_json() for fault in self.faults]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> FaultPlan:
        """Read `to_json` output (a dict or its JSON text); `{"spec": "..."}` is accepted too."""
        if isinstance(data, str):
            data = json.loads(data)
        if not isinstance(data, Mapping):
            raise ValueError("a fault plan is a JSON object")
        if "spec" in data:
            return cls.parse(str(data["spec"]))
        faults = data.get("faults", [])
        if not isinstance(faults, list) or not all(isinstance(item, Mapping) for item in faults):
            raise ValueError("'faults' must be a list of objects")
        return cls([Fault.from_json(item) for item in faults])


def _parse_fault(text: str) -> Fault:
    parts = [part.strip() for part in text.strip().split(":")]
    if len(parts) < 2:
        raise ValueError(f"fault {text!r} is not 'endpoint:kind[@target][:option...]'")
    endpoint, kind_and_target, *options = parts
    kind, _, target = kind_and_target.partition("@")
    values: dict[str, Any] = {}
    if target:
        if "=" in target:
            options.insert(0, target)
        else:
            values["calls"] = _parse_calls(target)
    for option in options:
        name, has_value, raw = option.partition("=")
        key = _OPTION_NAMES.get(name.strip())
        if key is None:
            raise ValueError(f"unknown option {name!r} in fault {text!r}")
        if key == "after_accept":
            values[key] = not has_value or raw.strip().lower() in ("1", "true", "yes")
        elif key in ("status_code", "times", "every"):
            values[key] = int(raw)
        else:
            values[key] = float(raw)
    return Fault(kind=kind.strip(), endpoint=endpoint, **values)


def _parse_calls(text: str) -> tuple[int, ...]:
    calls: list[int] = []
    for part in text.split("+"):
        first, dash, last = part.strip().partition("-")
        calls.extend(range(int(first), int(last) + 1) if dash else [int(first)])
    return tuple(calls)


@dataclass(frozen=True)
class CallFaults:
    """What the faults decided for one HTTP call: a delay, at most one failure, all that fired."""

    delay_seconds: float = 0.0
    failure: Fault | None = None
    fired: tuple[Fault, ...] = ()


class FaultInjector:
    """The counting state behind a plan: call numbers per endpoint and firings per fault.

    Counting restarts whenever a plan is set, so `calls=[1]` in a plan set at
    runtime means "the next call", which is what a test reconfiguring a running
    emulator wants.
    """

    def __init__(self, plan: FaultPlan, seed: int | None) -> None:
        self._lock = threading.Lock()
        # A separate stream from the duration draws, so adding a fault never shifts durations.
        self._rng = random.Random(None if seed is None else f"{seed}:faults")
        self._set(plan)

    def _set(self, plan: FaultPlan) -> None:
        self._plan = plan
        self._calls: Counter[str] = Counter()
        self._fired = [0] * len(plan.faults)

    @property
    def plan(self) -> FaultPlan:
        with self._lock:
            return self._plan

    def set_plan(self, plan: FaultPlan) -> None:
        with self._lock:
            self._set(plan)

    def on_call(self, endpoint: str) -> CallFaults:
        """Count one call of `endpoint` and decide which wire faults hit it."""
        with self._lock:
            self._calls[endpoint] += 1
            self._calls[ANY_ENDPOINT] += 1
            delay = 0.0
            failure: Fault | None = None
            fired: list[Fault] = []
            for index, fault in enumerate(self._plan.faults):
                if fault.kind not in HTTP_KINDS or fault.endpoint not in (endpoint, ANY_ENDPOINT):
                    continue
                if fault.kind != "slow" and failure is not None:
                    continue
                if self._fires(index, fault, self._calls[fault.endpoint]):
                    fired.append(fault)
                    if fault.kind == "slow":
                        delay += fault.delay_seconds or 0.0
                    else:
                        failure = fault
            return CallFaults(delay, failure, tuple(fired))

    def on_job(self) -> Fault | None:
        """Count one accepted submit and return the job fault it gets, if any."""
        with self._lock:
            self._calls[JOB_ENDPOINT] += 1
            number = self._calls[JOB_ENDPOINT]
            for index, fault in enumerate(self._plan.faults):
                if fault.kind in JOB_KINDS and self._fires(index, fault, number):
                    return fault
            return None

    def _fires(self, index: int, fault: Fault, number: int) -> bool:
        if fault.times is not None and self._fired[index] >= fault.times:
            return False
        if fault.calls is not None and number not in fault.calls:
            return False
        if fault.every is not None and number % fault.every:
            return False
        if fault.probability is not None and self._rng.random() >= fault.probability:
            return False
        self._fired[index] += 1
        return True


def plan_of(faults: FaultPlan | Iterable[Fault] | str | None) -> FaultPlan:
    """Accept the forms people naturally pass (a plan, a list of faults, a spec string)."""
    if faults is None:
        return FaultPlan()
    if isinstance(faults, FaultPlan):
        return faults
    if isinstance(faults, str):
        return FaultPlan.parse(faults)
    return FaultPlan(list(faults))
