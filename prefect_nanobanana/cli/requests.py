"""The raw request verbs: `submit`, `status`, `cancel`, `result`, one API call each.

They talk to the client directly (no Prefect), print text or `--json` for scripts.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .exit_codes import EXIT_OK


def _client(args: argparse.Namespace):
    from ..client import RunComfyClient

    return RunComfyClient(base_url=args.base_url)


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    print(json.dumps(payload, default=str) if args.json else text)


def submit(args: argparse.Namespace) -> int:
    """One paid submit, through the submit guard (its record lives in this process only)."""
    from uuid import uuid4

    from ..client import NanoBananaEditInput
    from ..tasks.guard import submit_once_blocking
    from ..tasks.records import MemoryRecordStore

    edit = NanoBananaEditInput(
        prompt=args.prompt,
        image_urls=args.images,
        aspect_ratio=args.aspect_ratio,
        resolution=args.resolution,
        output_format=args.output_format,
        num_images=args.num_images,
        sync_mode=args.sync_mode,
    )
    with _client(args) as client:
        handle = submit_once_blocking(uuid4().hex, MemoryRecordStore(), client, edit)
    payload = handle.model_dump(include={"request_id", "status_url", "result_url", "cancel_url"})
    _emit(args, payload, handle.request_id)
    return EXIT_OK


def status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status(args.request_id)
    position = f" (queue position {status.queue_position})" if status.queue_position else ""
    _emit(args, status.model_dump(), f"{status.request_id}: {status.status}{position}")
    return EXIT_OK


def cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        outcome = client.cancel(args.request_id)
    _emit(args, outcome.model_dump(), f"{outcome.request_id}: {outcome.outcome}")
    return EXIT_OK


def result(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.result(args.request_id)
        output_hosts = client.output_hosts
    payload = result.model_dump(mode="json")
    lines = [f"{result.request_id}: {result.status}"]
    if args.download and result.status == "completed":
        from ..storage import ArchiveMetadata, archive_outputs

        record = archive_outputs(
            result.request_id,
            result.output_urls,
            date=result.created_at.date() if result.created_at else None,
            archive_uri=args.download,
            metadata=ArchiveMetadata(
                cost=result.cost, created_at=result.created_at, finished_at=result.finished_at
            ),
            allowed_hosts=output_hosts,
        )
        payload["saved"] = record.output_locations
        lines.extend(f"saved {location}" for location in record.output_locations)
    else:
        lines.extend(result.output_urls)
    _emit(args, payload, "\n".join(lines))
    return EXIT_OK
