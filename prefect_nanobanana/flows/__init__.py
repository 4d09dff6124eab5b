"""Flows a deployment can point at; each module holds one flow and its result model."""

from .batch import BatchEditResult, BatchFailedError, BatchJob, BatchRowResult, batch_edit
from .edit import EditImageResult, edit_image
from .pipeline import EditAndArchiveResult, edit_and_archive

__all__ = [
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
