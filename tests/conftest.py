"""Shared fixtures: each real component (emulator, S3 server, Prefect) lives in its own plugin."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

pytest_plugins = [
    "tests.fixtures.emulator",
    "tests.fixtures.s3",
    "tests.fixtures.prefect",
]
