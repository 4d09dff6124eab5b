"""The storage room: locations, staging, archive, ledger and manifests.

Knows files, S3, HTTP downloads and checksums; knows nothing of RunComfy's
client or of Prefect. Names resolve on first use (see `_lazy`), so importing the
package does not import boto3.
"""

from .._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    # The guard's record types, which the ledger stores.
    **dict.fromkeys(["ClaimOwner", "LedgerEntry", "VersionedEntry"], "..guard.records"),
    **dict.fromkeys(
        [
            "LedgerError",
            "LocationError",
            "ManifestError",
            "S3CredentialsError",
            "StagingError",
            "StorageError",
        ],
        ".errors",
    ),
    **dict.fromkeys(
        [
            "HttpLocation",
            "LocalLocation",
            "Location",
            "S3Location",
            "host_allowed",
            "is_loopback_host",
            "parse_location",
            "redact",
            "redact_text",
            "s3_location_of_url",
            "strip_signature",
        ],
        ".locations",
    ),
    **dict.fromkeys(
        [
            "MAX_INLINE_BYTES",
            "MAX_INPUT_PIXELS",
            "MAX_URL_INPUT_BYTES",
            "ImageFacts",
            "check_inline_size",
            "check_pixels",
            "check_url_input_size",
            "data_uri_length",
            "read_image_facts",
            "sniff_image_type",
        ],
        ".media",
    ),
    **dict.fromkeys(["DEFAULT_ARCHIVE_URI", "make_s3_client", "require_bucket"], ".backends"),
    **dict.fromkeys(
        [
            "DEFAULT_EXPIRES_IN",
            "MAX_INPUT_BYTES",
            "StagedAsset",
            "check_assets",
            "check_sources",
            "check_urls",
            "probe_image_url",
            "url_input_problem",
            "stage_assets",
        ],
        ".staging",
    ),
    "STAGING_TOKEN_ENV": ".staging",
    **dict.fromkeys(
        [
            "DEFAULT_DOWNLOAD_TIMEOUT",
            "MAX_OUTPUT_BYTES",
            "ArchiveError",
            "ArchiveMetadata",
            "ArchiveLayout",
            "ArchiveRecord",
            "ArchivedOutput",
            "OutputFailure",
            "archive_layout",
            "archive_outputs",
            "load_archive_record",
        ],
        ".archive",
    ),
    **dict.fromkeys(["Ledger", "job_key_for"], ".ledger"),
    **dict.fromkeys(["location_link", "location_uri", "thumbnail_data_uri"], ".thumbnails"),
    **dict.fromkeys(["read_manifest", "write_results_manifest"], ".manifest"),
    **dict.fromkeys(["RunTimeHistory"], ".run_times"),
    **dict.fromkeys(["IMAGE_EXTENSIONS", "ListedImage", "list_images"], ".listing"),
    **dict.fromkeys(
        [
            "DAILY_BUDGET_NAME",
            "BudgetRefusal",
            "BudgetTotal",
            "DailyBudget",
            "Reservation",
            "SharedBudget",
            "daily_totals",
        ],
        ".budget",
    ),
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
