"""The client's one transport: every call bounded in time and in size.

The API's answers are not ours to trust. Two bounds hold whatever the server does:

* **Size.** Every JSON answer is streamed and reading stops past a cap
  (:data:`MAX_ANSWER_BYTES`, 4 MiB; a status answer is under 1 KB, so the cap is
  generous and still keeps a hostile 300 MB answer out of memory). The result of
  a request this client submitted with ``sync_mode`` carries its outputs inline as
  data URIs, up to four images of up to ~40 MB encoded, so it gets
  :data:`MAX_INLINE_RESULT_BYTES` instead.
* **Time.** httpx's timeouts are per operation: a server that drips one byte a
  second never trips a 30 s read timeout. Each attempt runs under
  :func:`~prefect_nanobanana.deadline.call_deadline`, so it ends by its deadline
  however the server paces its bytes; an attempt inside a call (or a wait) with
  less left gets only what is left.
"""

from __future__ import annotations

import httpx

from ..deadline import call_deadline, install_deadlines, seconds_left

__all__ = [
    "MAX_ANSWER_BYTES",
    "MAX_INLINE_RESULT_BYTES",
    "AnswerTooLarge",
    "aread_answer",
    "call_deadline",
    "install_deadlines",
    "read_answer",
    "seconds_left",
]

MAX_ANSWER_BYTES = 4 * 1024 * 1024
MAX_INLINE_RESULT_BYTES = 256 * 1024 * 1024


class AnswerTooLarge(Exception):
    """The answer grew past its cap; reading stopped there."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the answer is larger than the {limit}-byte limit")
        self.limit = limit


def _declared_too_large(response: httpx.Response, limit: int) -> bool:
    declared = response.headers.get("Content-Length", "")
    return declared.isdigit() and int(declared) > limit


def read_answer(response: httpx.Response, limit: int) -> bytes:
    """The streamed answer's body, or `AnswerTooLarge` as soon as it passes ``limit`` bytes."""
    if _declared_too_large(response, limit):
        raise AnswerTooLarge(limit)
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > limit:
            raise AnswerTooLarge(limit)
    return bytes(body)


async def aread_answer(response: httpx.Response, limit: int) -> bytes:
    """The async twin of :func:`read_answer`."""
    if _declared_too_large(response, limit):
        raise AnswerTooLarge(limit)
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise AnswerTooLarge(limit)
    return bytes(body)
