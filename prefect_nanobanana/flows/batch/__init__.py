"""The `batch_edit` flow as a package of small modules, each one job.

- `models.py`: `BatchJob` (a row in), `BatchRowResult` / `BatchEditResult` (rows out),
  `BatchFailedError`, and the plan of one row.
- `plan.py`: validate every row, find what earlier runs did, stage the inputs still needed.
- `lanes.py`: the lane scheduler (a lane per request in flight), testable alone.
- `row.py`: one row in one task run: submit (at most once), wait, archive.
- `limit.py`: the global concurrency limit all batch runs share.
- `report.py`: the results manifest, the artifacts, the progress.
- `chunks.py`: scale-out over child deployment runs.
- `flow.py`: the flow itself, composing the above.
"""

from .flow import batch_edit
from .models import BatchEditResult, BatchFailedError, BatchJob, BatchRowResult
from .report import ROW_PROGRESS

__all__ = [
    "ROW_PROGRESS",
    "BatchEditResult",
    "BatchFailedError",
    "BatchJob",
    "BatchRowResult",
    "batch_edit",
]
