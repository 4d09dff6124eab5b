"""The RunComfy Model API client: HTTP, models, errors, retry policy, polling schedule.

Knows nothing of Prefect or S3. Names resolve on first use (see `_lazy`).
"""

from .._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["AsyncRunComfyClient", "RunComfyClient"], ".client"),
    **dict.fromkeys(
        [
            "APIConnectionError",
            "AuthenticationError",
            "InsufficientBalanceError",
            "InvalidBaseURLError",
            "InvalidRequestError",
            "JobCancelledError",
            "JobFailedError",
            "NotFoundError",
            "PermissionDeniedError",
            "ProtocolError",
            "RateLimitedError",
            "RunComfyError",
            "ServerError",
            "SubmitOutcomeUnknownError",
            "SubmitProtocolError",
            "WaitTimeoutError",
        ],
        ".errors",
    ),
    **dict.fromkeys(
        [
            "CancelResult",
            "MAX_PROMPT_CHARS",
            "MAX_REQUEST_ID_CHARS",
            "ModelInfo",
            "NanoBananaEditInput",
            "RequestHandle",
            "RequestResult",
            "RequestStatus",
            "check_request_id",
        ],
        ".models",
    ),
    **dict.fromkeys(
        [
            "DEFAULT_BASE_URL",
            "DEFAULT_OUTPUT_HOSTS",
            "NANO_BANANA_EDIT_MODEL_ID",
            "OUTPUT_PIXEL_SIZES",
            "AspectRatio",
            "OutputFormat",
            "Resolution",
        ],
        ".vocabulary",
    ),
    **dict.fromkeys(["PollingPolicy", "RunDurationEstimator"], ".polling"),
    **dict.fromkeys(
        ["BudgetExceededError", "CostBudget", "CostEstimate", "estimate_cost"], ".pricing"
    ),
    **dict.fromkeys(["DEFAULT_TOTAL_TIMEOUT", "RetryPolicy"], ".retry"),
    **dict.fromkeys(["MAX_ANSWER_BYTES", "MAX_INLINE_RESULT_BYTES"], ".transport"),
    "DEFAULT_WAIT_TIMEOUT": ".waiting",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
