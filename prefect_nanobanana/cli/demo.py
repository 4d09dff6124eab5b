"""`nanobanana demo`: the whole pipeline offline, on a fresh machine, with nothing configured.

It starts the emulator and a loopback object store (the stand-in for S3 staging)
on free loopback ports, draws a few input images, writes a manifest and runs the
`batch_edit` flow on Prefect's temporary server, archiving to a local folder.

Hermetic, because a demo must never spend a real account's money: it hands the
flow its own emulator's credentials as a block object (never a saved block's
name), removes `RUNCOMFY_*` variables from its own process so nothing can fall
back to them, and clears `PREFECT_API_URL` for itself, so the run goes to
Prefect's temporary local server even when the shell points at a remote one
(whose blocks and work pools are not the demo's business).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageDraw

from ..client.client import POLL_TIME_SCALE_ENV_VAR
from ..emulator import EmulatorConfig, EmulatorServer, LoopbackObjectStore
from ..storage.staging import STAGING_TOKEN_ENV

DEMO_TIME_SCALE = 0.1
# Prefect gives its temporary server 20 s to start; a busy laptop can need more.
TEMPORARY_SERVER_STARTUP_SECONDS = 90

_INPUTS = {
    "harbour.png": ((960, 540), (40, 110, 170)),
    "portrait.jpg": ((600, 800), (170, 120, 80)),
    "square.webp": ((700, 700), (90, 160, 90)),
}

_ROWS = [
    {
        "id": "harbour-sunset",
        "prompt": "Turn the harbour into a golden sunset scene",
        "images": ["inputs/harbour.png"],
        "aspect_ratio": "16:9",
        "output_format": "png",
    },
    {
        "id": "harbour-night",
        "prompt": "Make it a rainy night with neon reflections",
        "images": ["inputs/harbour.png"],
        "aspect_ratio": "21:9",
        "output_format": "jpeg",
    },
    {
        "id": "portrait-oil",
        "prompt": "Repaint the portrait as an oil painting",
        "images": ["inputs/portrait.jpg"],
        "aspect_ratio": "3:4",
        "output_format": "webp",
    },
    {
        "id": "portrait-auto",
        "prompt": "Add soft studio lighting",
        "images": ["inputs/portrait.jpg"],
        "output_format": "png",
    },
    {
        "id": "square-pair",
        "prompt": "Combine both images into one poster",
        "images": ["inputs/square.webp", "inputs/harbour.png"],
        "aspect_ratio": "1:1",
        "num_images": 2,
        "output_format": "jpeg",
    },
    {
        "id": "square-2k",
        "prompt": "Make it look like a children's book illustration",
        "images": ["inputs/square.webp"],
        "aspect_ratio": "4:5",
        "resolution": "2K",
    },
]


def _draw_inputs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (size, colour) in _INPUTS.items():
        image = Image.new("RGB", size, colour)
        draw = ImageDraw.Draw(image)
        width, height = size
        draw.ellipse(
            (width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(240, 220, 90)
        )
        draw.text((12, 12), name, fill=(255, 255, 255))
        image.save(folder / name)


def _print_table(rows: list[dict[str, object]]) -> None:
    headers = ["row", "id", "status", "request_id", "seconds", "cost", "outputs"]
    cells = [
        [str(row.get(name) if row.get(name) is not None else "-") for name in headers]
        for row in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for line in cells:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))


def run_demo(out: str | os.PathLike[str] = "nanobanana-demo") -> int:
    """Run the demo batch; 0 when every row was archived."""
    root = Path(out).absolute()
    _draw_inputs(root / "inputs")
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in _ROWS))
    token = f"demo-{secrets.token_hex(8)}"
    config = EmulatorConfig(api_tokens=(token,), workers=4, time_scale=DEMO_TIME_SCALE, seed=7)
    _isolate_environment()
    with EmulatorServer(config) as emulator, LoopbackObjectStore(root / "staging") as store:
        os.environ[STAGING_TOKEN_ENV] = store.upload_token
        print(f"Emulator of the RunComfy Model API on {emulator.base_url}")
        print(f"Loopback staging store on {store.base_url}")
        print(f"Running the batch_edit flow over {len(_ROWS)} rows of {manifest} ...")
        from ..blocks import RunComfyCredentials
        from ..flows import batch_edit

        with _temporary_server():
            result = asyncio.run(
                batch_edit(
                    manifest_uri=str(manifest),
                    archive_uri=str(root / "archive"),
                    staging_uri=store.base_url,
                    max_concurrency=4,
                    concurrency_limit_name="nanobanana-demo",
                    allow_partial=True,
                    # The block itself, not a name: nothing saved anywhere is ever looked up.
                    credentials=RunComfyCredentials(api_token=token, base_url=emulator.base_url),
                )
            )
    print()
    _print_table(
        [
            {**row.model_dump(), "outputs": len(row.output_locations), "cost": row.cost}
            for row in result.rows
        ]
    )
    print()
    print(
        f"{result.archived} archived, {result.skipped} already archived, {result.failed} failed;"
        f" total cost ${result.total_cost:.2f} (emulated)"
    )
    print(f"Images and metadata.json files: {root / 'archive'}")
    print(f"Results manifest:               {result.results_manifest}")
    return 0 if result.failed == 0 else 1


def _isolate_environment() -> None:
    """Nothing of the user's API setup may reach the demo's run (see the module doc)."""
    for name in [name for name in os.environ if name.startswith("RUNCOMFY_")]:
        del os.environ[name]
    # The demo's own: the emulator runs jobs at a tenth of the real time.
    os.environ[POLL_TIME_SCALE_ENV_VAR] = str(DEMO_TIME_SCALE)
    # Profiles and prefect.toml may set them too: `_temporary_server` restores the defaults.
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.pop("PREFECT_API_KEY", None)


@contextlib.contextmanager
def _temporary_server() -> Iterator[None]:
    """Prefect's settings with the API URL at its default (none), whatever any profile,
    `prefect.toml` or variable says: flows then run on Prefect's temporary server. The
    demo is offline, so that server sends Prefect no telemetry either (its heartbeat
    also printed a traceback when it raced the new database).

    (An empty PREFECT_API_URL would do it too, but then Prefect's event worker stops
    early and every run logs "Cannot put items in a stopped service instance".)
    """
    from prefect.settings import (
        PREFECT_API_KEY,
        PREFECT_API_URL,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    with temporary_settings(
        updates={
            PREFECT_SERVER_ANALYTICS_ENABLED: False,
            PREFECT_SERVER_EPHEMERAL_ENABLED: True,
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: max(
                TEMPORARY_SERVER_STARTUP_SECONDS,
                PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(),
            ),
        },
        restore_defaults={PREFECT_API_URL, PREFECT_API_KEY},
    ):
        yield


def run_demo_command(args: argparse.Namespace) -> int:
    """`nanobanana demo [--out DIR]`."""
    return run_demo(args.out)
