"""Prefect tasks over the storage room: stage inputs, archive outputs.

Thin on purpose: the storage functions do the work; these tasks give them a
name in the Prefect UI, run their blocking I/O off the event loop in the async
twins, and resolve prefect-aws blocks into a boto3 client, because data teams
already keep their AWS access in `AwsCredentials` / `S3Bucket` blocks.

An `S3Bucket` block is named in a location as `s3-bucket://BLOCK_NAME/prefix`:
it becomes `s3://{bucket_name}/{bucket_folder}/prefix` with the block's credentials.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from anyio import to_thread
from prefect.cache_policies import NO_CACHE
from prefect_aws import AwsCredentials, S3Bucket

from ..storage import (
    DEFAULT_EXPIRES_IN,
    ArchiveMetadata,
    ArchiveRecord,
    StagedAsset,
    archive_outputs,
    stage_assets,
)
from .options import sync_and_async_tasks

S3_BUCKET_BLOCK_SCHEME = "s3-bucket://"
# Staged URLs carry pre-signed signatures: never write them to result storage,
# whatever the user's PREFECT_RESULTS_PERSIST_BY_DEFAULT says.
SIGNED_RESULT_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}

AwsCredentialsLike = AwsCredentials | str | None  # a block, or the name of a saved one


def _aws_credentials(aws_credentials: AwsCredentialsLike) -> AwsCredentials | None:
    if isinstance(aws_credentials, str):
        return AwsCredentials.load(aws_credentials, _sync=True)
    return aws_credentials


class ResolvedLocation(NamedTuple):
    """A storage location as the storage room takes it, and the boto3 client to reach it."""

    location: str | None
    s3_client: Any  # None: boto3's default chain, when the location is on S3


def resolve_location(
    uri: str | None, aws_credentials: AwsCredentialsLike = None
) -> ResolvedLocation:
    """A storage location and the boto3 S3 client to reach it (None: the default chain)."""
    if uri is not None and uri.startswith(S3_BUCKET_BLOCK_SCHEME):
        block_name, _, prefix = uri.removeprefix(S3_BUCKET_BLOCK_SCHEME).partition("/")
        bucket = S3Bucket.load(block_name, _sync=True)
        folder = "/".join(part.strip("/") for part in (bucket.bucket_folder, prefix) if part)
        resolved = f"s3://{bucket.bucket_name}/{folder}".rstrip("/")
        return ResolvedLocation(resolved, bucket.credentials.get_s3_client())
    credentials = _aws_credentials(aws_credentials)
    if credentials is None or uri is None or not uri.startswith("s3://"):
        return ResolvedLocation(uri, None)
    return ResolvedLocation(uri, credentials.get_s3_client())


def _stage(
    sources: Sequence[str],
    staging_uri: str | None,
    aws_credentials: AwsCredentialsLike,
    expires_in: int,
) -> list[StagedAsset]:
    location, s3_client = resolve_location(staging_uri, aws_credentials)
    return stage_assets(list(sources), location, s3_client=s3_client, expires_in=expires_in)


async def _stage_images(
    sources: list[str],
    staging_uri: str | None = None,
    aws_credentials: AwsCredentialsLike = None,
    expires_in: int = DEFAULT_EXPIRES_IN,
) -> list[StagedAsset]:
    """Check every source, upload local files once (content-addressed), return fetchable URLs.

    Args:
        sources: Local files, folders, globs, `s3://` objects or `https://` URLs.
        staging_uri: `s3://bucket/prefix`, `s3-bucket://BLOCK/prefix`, or a loopback
            object store's URL; needed only for local files.
        aws_credentials: A prefect-aws `AwsCredentials` block or its name; None uses
            boto3's standard chain (and `AWS_ENDPOINT_URL`).
        expires_in: Lifetime of the pre-signed URLs, in seconds: queue plus run time.

    Returns:
        A `StagedAsset` per image, in order: its fetchable `url` (pre-signed, a
        `data:` URI without a staging location, or the URL given) and its source.

    Raises:
        StagingError: A source is missing, is not an image, or is over a cap
            (checked before anything is uploaded or paid).
        LocationError: The staging location cannot be used.
    """
    return await to_thread.run_sync(_stage, sources, staging_uri, aws_credentials, expires_in)


stage_images, astage_images = sync_and_async_tasks(
    _stage_images, name="stage-images", **SIGNED_RESULT_OPTIONS
)


def _archive(
    request_id: str,
    output_urls: Sequence[str],
    archive_uri: str,
    metadata: ArchiveMetadata | Mapping[str, Any],
    created_at: dt.datetime | None,
    aws_credentials: AwsCredentialsLike,
    allowed_hosts: Sequence[str] | None,
) -> ArchiveRecord:
    location, s3_client = resolve_location(archive_uri, aws_credentials)
    return archive_outputs(
        request_id,
        output_urls,
        date=created_at.date() if created_at else None,
        archive_uri=location,
        metadata=metadata,
        s3_client=s3_client,
        allowed_hosts=allowed_hosts,
    )


async def _archive_request(
    request_id: str,
    output_urls: list[str],
    archive_uri: str,
    metadata: ArchiveMetadata | dict[str, Any],
    created_at: dt.datetime | None = None,
    aws_credentials: AwsCredentialsLike = None,
    allowed_hosts: list[str] | None = None,
) -> ArchiveRecord:
    """Stream a request's outputs into the archive with its metadata.json (idempotent).

    The folder is `{archive}/{created_at date}/{request_id}/`, so archiving the
    same request again finds it complete and writes nothing.

    Args:
        request_id: The request whose outputs these are.
        output_urls: The outputs' URLs, from its result.
        archive_uri: A local folder, `s3://bucket/prefix` or `s3-bucket://BLOCK/prefix`.
        metadata: What goes into `metadata.json` (prompt, parameters, sources, cost, …).
        created_at: When the request was made; its date names the folder (today if None).
        aws_credentials: A prefect-aws `AwsCredentials` block or its name; None uses
            boto3's standard chain.
        allowed_hosts: The only hosts outputs are fetched from (the credentials'
            `allowed_output_hosts()`); an output elsewhere is refused.

    Returns:
        The `ArchiveRecord`: where each output and `metadata.json` went.

    Raises:
        ArchiveError: An output could not be fetched or written; it names the request
            and carries what was archived (`partial_record`).
    """
    return await to_thread.run_sync(
        _archive,
        request_id,
        output_urls,
        archive_uri,
        metadata,
        created_at,
        aws_credentials,
        allowed_hosts,
    )


archive_request, aarchive_request = sync_and_async_tasks(
    _archive_request,
    name="archive-outputs",
    task_run_name="archive-{request_id}",
    cache_policy=NO_CACHE,
)
