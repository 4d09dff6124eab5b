"""The RunComfy Model API client: HTTP, models, errors, retry policy, polling schedule.

Knows nothing of Prefect or S3.
"""

from .client import AsyncRunComfyClient, RunComfyClient
from .errors import (
    APIConnectionError,
    AuthenticationError,
    InsufficientBalanceError,
    InvalidRequestError,
    JobCancelledError,
    JobFailedError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    RunComfyError,
    ServerError,
    SubmitOutcomeUnknownError,
    WaitTimeoutError,
)
from .models import (
    DEFAULT_BASE_URL,
    NANO_BANANA_EDIT_MODEL_ID,
    OUTPUT_PIXEL_SIZES,
    CancelResult,
    NanoBananaEditInput,
    RequestHandle,
    RequestResult,
    RequestStatus,
)
from .polling import PollingPolicy, RunDurationEstimator
from .retry import RetryPolicy

__all__ = [
    "DEFAULT_BASE_URL",
    "NANO_BANANA_EDIT_MODEL_ID",
    "OUTPUT_PIXEL_SIZES",
    "APIConnectionError",
    "AsyncRunComfyClient",
    "AuthenticationError",
    "CancelResult",
    "InsufficientBalanceError",
    "InvalidRequestError",
    "JobCancelledError",
    "JobFailedError",
    "NanoBananaEditInput",
    "NotFoundError",
    "PermissionDeniedError",
    "PollingPolicy",
    "RateLimitedError",
    "RequestHandle",
    "RequestResult",
    "RequestStatus",
    "RetryPolicy",
    "RunComfyClient",
    "RunComfyError",
    "RunDurationEstimator",
    "ServerError",
    "SubmitOutcomeUnknownError",
    "WaitTimeoutError",
]
