"""The CLI's `edit` verb: one edit with a live status line.

`edit` works without a Prefect server (stage → submit → wait → save, straight
through the client and storage rooms), so one image does not wait for one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..client import NanoBananaEditInput, RequestStatus, RunComfyClient
from ..client.vocabulary import NANO_BANANA_EDIT_MODEL_ID
from .exit_codes import EXIT_OK


class _StatusDisplay:
    """One live line on a terminal; one plain line per change otherwise (logs, CI)."""

    def __init__(self, stream: Any = None) -> None:
        self._stream = stream or sys.stderr
        self._live = self._stream.isatty()
        self._started = time.monotonic()
        self.request_id: str | None = None

    def __call__(self, status: RequestStatus) -> None:
        position = f", queue position {status.queue_position}" if status.queue_position else ""
        text = (
            f"{status.request_id}: {status.status}{position} "
            f"({time.monotonic() - self._started:.1f} s)"
        )
        if self._live:
            self._stream.write("\r\033[K" + text)
            if status.is_terminal:
                self._stream.write("\n")
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def say(self, text: str) -> None:
        if self._live:
            self._stream.write("\r\033[K")
        self._stream.write(text + "\n")
        self._stream.flush()


def _cancel_if_queued(client: RunComfyClient, request_id: str, display: _StatusDisplay) -> None:
    status = client.status(request_id)
    if status.status == "in_queue":
        outcome = client.cancel(request_id).outcome
        display.say(f"Interrupted: request {request_id} was still queued; cancel: {outcome}.")
    elif not status.is_terminal:
        display.say(
            f"Interrupted: request {request_id} is already running and cannot be cancelled; "
            f"collect it later with `nanobanana result {request_id} --download DIR`."
        )


def run_edit_command(args: argparse.Namespace) -> int:
    from ..storage import ArchiveMetadata, archive_outputs, stage_assets

    options = {
        "aspect_ratio": args.aspect_ratio,
        "resolution": args.resolution,
        "output_format": args.output_format,
        "num_images": args.num_images,
    }
    NanoBananaEditInput(prompt=args.prompt, image_urls=args.images, **options)
    display = _StatusDisplay()
    staged = stage_assets(args.images, args.staging)
    edit = NanoBananaEditInput(
        prompt=args.prompt, image_urls=[asset.url for asset in staged], **options
    )
    with RunComfyClient(base_url=args.base_url) as client:
        handle = client.submit_edit(edit)
        display.say(f"Submitted request {handle.request_id}")
        try:
            result = client.wait(
                handle.request_id, args.timeout, resolution=args.resolution, on_status=display
            )
        except KeyboardInterrupt:
            _cancel_if_queued(client, handle.request_id, display)
            raise
    record = archive_outputs(
        handle.request_id,
        result.output_urls,
        date=result.created_at.date() if result.created_at else None,
        archive_uri=args.archive or args.out or "nanobanana-output",
        metadata=ArchiveMetadata(
            prompt=args.prompt,
            parameters=options,
            model_id=NANO_BANANA_EDIT_MODEL_ID,
            sources=[asset.source for asset in staged],
            created_at=result.created_at,
            finished_at=result.finished_at,
            cost=result.cost,
        ),
        allowed_hosts=client.output_hosts,
    )
    payload = {
        "request_id": handle.request_id,
        "outputs": record.output_locations,
        "metadata": record.metadata_location,
        "cost": result.cost,
    }
    if args.json:
        print(json.dumps(payload))
    else:
        for location in record.output_locations:
            print(f"saved {location}")
        print(f"metadata {record.metadata_location}")
    return EXIT_OK
