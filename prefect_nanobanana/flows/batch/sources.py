"""A location as a batch's rows: `images_uri` listed into `BatchJob` rows, with their keys.

The storage room lists the location (`storage.list_images`); this module resolves
``s3-bucket://BLOCK/prefix`` the way every location of the flows is resolved
(`tasks.storage.resolve_location`), makes each listed image a row whose id is its
path relative to the location, and makes the row's job key from what the ledger
must tell apart: the prompt, the image, the options, the id, and the image's
content identity (an S3 ETag, a local sha256), so a replaced image is a new edit
and an unchanged one is found archived by the next run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple

from ...storage import Ledger, job_key_for, list_images
from ...tasks.storage import resolve_location

if TYPE_CHECKING:
    from .models import BatchJob


class ListedRow(NamedTuple):
    """A listed image as a batch row, and what its job key needs beyond the row.

    Attributes:
        job: The row: one image, the batch's prompt, the image's relative path as id.
        content: The image's content identity (`ListedImage.content`).
        size: The image's size in bytes, as listed.
    """

    job: BatchJob
    content: str
    size: int


def listed_rows(
    images_uri: str,
    prompt: str,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    aws_credentials: Any = None,
    page_size: int = 1000,
) -> Iterator[ListedRow]:
    """The rows of a batch given as a location, lazily, in the order the location lists.

    Options (resolution, aspect ratio...) are left unset on the rows: the batch's
    defaults fill them in when the rows are planned, as for manifest rows.

    Args:
        images_uri: A local folder, a glob, ``s3://bucket/prefix`` or
            ``s3-bucket://BLOCK/prefix``.
        prompt: The edit every image gets.
        include: Glob patterns an image must match (default: image extensions).
        exclude: Glob patterns that leave an image out.
        aws_credentials: An `AwsCredentials` block or its name, for ``s3://``.
        page_size: Keys per S3 list request.

    Returns:
        An iterator of `ListedRow`; S3 is listed a page at a time as it is consumed.

    Raises:
        LocationError: The location cannot be listed (raised on the first ``next``
            for a missing folder or bucket).
    """
    from .models import BatchJob  # the models import the client room: only when listing

    location, s3_client = resolve_location(images_uri, aws_credentials)
    if location is None:
        raise ValueError("images_uri is empty")
    images = list_images(
        location, include=include, exclude=exclude, s3_client=s3_client, page_size=page_size
    )
    for image in images:
        job = BatchJob(prompt=prompt, images=[image.location], id=image.id)
        yield ListedRow(job, image.content, image.size)


def listed_job_key(row: ListedRow, options: Mapping[str, Any]) -> str:
    """The job key of a listed row, with the batch's options filled in.

    The same scheme as a manifest row's key (`storage.job_key_for`), plus the image's
    content identity: the id alone would find a replaced image "archived" and skip it.

    Args:
        row: A row from `listed_rows`.
        options: The row's edit options, defaults filled in (as `_plan_rows` makes them).

    Returns:
        The job key.
    """
    return job_key_for(
        row.job.prompt, row.job.images, options, row_id=row.job.id, content=row.content
    )


class KeyedRow(NamedTuple):
    """A listed row with its job key, and whether the ledger's one scan knew that key.

    Attributes:
        row: The listed row.
        job_key: Its job key (`listed_job_key`).
        new: True when the ledger had no entry for the key at the scan: the row needs a
            paid submit, and no read of the ledger. False: read its entry (archived:
            skip; submitted: adopt; failed: pay again).
    """

    row: ListedRow
    job_key: str
    new: bool


def key_listed_rows(
    rows: Iterable[ListedRow], options: Mapping[str, Any], ledger: Ledger
) -> Iterator[KeyedRow]:
    """Key each listed row as it streams in, against one scan of the ledger.

    The ledger's listing (`Ledger.known_keys`, a request per 1,000 entries) goes out
    alongside the first page of the location's, so the first new row is ready after
    about one round trip of each; rows are never all held in memory here.

    Args:
        rows: From `listed_rows`.
        options: The rows' edit options, batch defaults filled in.
        ledger: The archive's ledger.

    Returns:
        An iterator of `KeyedRow`, in the listing's order.

    Raises:
        LocationError: The location cannot be listed.
        StorageError: The ledger cannot be listed.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        scan = pool.submit(ledger.known_keys)
        known: set[str] | None = None
        for row in rows:
            job_key = listed_job_key(row, options)
            if known is None:
                known = scan.result()
            yield KeyedRow(row, job_key, job_key not in known)
