"""Shared fixtures: each real component (emulator, S3 server, Prefect) lives in its own plugin."""

import os
import signal

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

# Started in the background (`make test &`), the tests inherit an ignored SIGINT, and
# so would the programs they start and then interrupt as a user's Ctrl-C would. A
# handler here is not inherited (exec resets it), an ignored signal is.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

pytest_plugins = [
    "tests.fixtures.emulator",
    "tests.fixtures.s3",
    "tests.fixtures.prefect",
    "tests.fixtures.deployments",
    "tests.fixtures.hostile",
    "tests.fixtures.redis_server",
]
