"""The package's flows: `edit_image` (`edit.py`), `edit_and_archive`
(`edit_and_archive.py`), `batch_edit` (`batch/`), each with its result model; every
job of each goes through `prefect_nanobanana.pipeline`.

Not to be confused with the top-level `flows/` folder of the repository: those are
the small entry-point scripts deployments point at, which import these.
"""

from .batch import (
    BatchDryRun,
    BatchEditResult,
    BatchFailedError,
    BatchJob,
    BatchRowResult,
    batch_edit,
)
from .edit import EditImageResult, edit_image
from .edit_and_archive import EditAndArchiveResult, edit_and_archive

__all__ = [
    "BatchDryRun",
    "BatchEditResult",
    "BatchFailedError",
    "BatchJob",
    "BatchRowResult",
    "EditAndArchiveResult",
    "EditImageResult",
    "batch_edit",
    "edit_and_archive",
    "edit_image",
]
