"""Run times earlier runs observed, kept with the archive, so a new run starts from them.

The client's wait schedule stays quiet while a running job is unlikely to be done;
how long that is comes from run times. The reported ones are third-party guesses,
and a run that learns only from its own jobs starts from the guess every time. So
a run saves what it saw to ``{archive}/_run_times.json`` (per model and resolution,
the newest ``keep`` runs, in the model's seconds) and the next run reads it first.
A run is its seconds, or ``[low, high]`` when it was known only within bounds (a
queued job that started in a long gap between polls); a reader that knows only
numbers skips the pairs.

Two runs saving at once may lose one's samples (last writer wins): these are
priors, not records, and the next run saves again.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .backends import DEFAULT_ARCHIVE_URI, open_backend

# One run: its seconds, or [low, high] seconds.
Run = float | list[float]

RUN_TIMES_KEY = "_run_times.json"
RUN_TIMES_SCHEMA = "prefect-nanobanana/run-times/v1"
DEFAULT_KEEP = 50


class RunTimeHistory:
    """Observed run seconds per model and resolution under ``{archive_uri}/_run_times.json``."""

    def __init__(
        self,
        archive_uri: str | os.PathLike[str] = DEFAULT_ARCHIVE_URI,
        s3_client: Any = None,
        keep: int = DEFAULT_KEEP,
    ) -> None:
        self.backend = open_backend(archive_uri, s3_client)
        self.keep = keep

    @property
    def location(self) -> str:
        return self.backend.location(RUN_TIMES_KEY)

    def _document(self) -> dict[str, Any]:
        raw = self.backend.read_bytes(RUN_TIMES_KEY)
        if raw is None:
            return {}
        try:
            document = json.loads(raw)
        except ValueError:
            return {}  # a damaged file is only a lost prior: start from the reported times
        return document if isinstance(document, dict) else {}

    def load(self, model_id: str) -> dict[str, list[Run]]:
        """The runs saved for `model_id`, per resolution, oldest first."""
        return _runs_of(self._document(), model_id)

    def save(self, model_id: str, observed: Mapping[str, Sequence[Run]]) -> None:
        """Add this run's run seconds to what is saved; keep the newest `keep` per resolution."""
        new = {resolution: list(runs) for resolution, runs in observed.items() if runs}
        if not new:
            return
        document = self._document()
        models = document.get("models") if isinstance(document.get("models"), dict) else {}
        merged = _runs_of(document, model_id)
        for resolution, runs in new.items():
            merged[resolution] = [*merged.get(resolution, []), *runs][-self.keep :]
        models[model_id] = {
            resolution: [_rounded(run) for run in runs] for resolution, runs in merged.items()
        }
        body = {
            "schema": RUN_TIMES_SCHEMA,
            "updated_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "models": models,
        }
        self.backend.write_bytes(
            RUN_TIMES_KEY, json.dumps(body, indent=2).encode(), "application/json"
        )


def _runs_of(document: dict[str, Any], model_id: str) -> dict[str, list[Run]]:
    models = document.get("models")
    saved = models.get(model_id) if isinstance(models, dict) else None
    if not isinstance(saved, dict):
        return {}
    return {
        str(resolution): [run for run in map(_valid_run, runs) if run is not None]
        for resolution, runs in saved.items()
        if isinstance(runs, list)
    }


def _valid_run(run: Any) -> Run | None:
    """A run as saved, or None for anything else (a damaged entry is a lost sample)."""
    if isinstance(run, (int, float)) and not isinstance(run, bool):
        return float(run)
    if (
        isinstance(run, list)
        and len(run) == 2
        and all(isinstance(bound, (int, float)) and not isinstance(bound, bool) for bound in run)
    ):
        return [float(run[0]), float(run[1])]
    return None


def _rounded(run: Run) -> Run:
    return round(run, 3) if isinstance(run, float) else [round(bound, 3) for bound in run]
