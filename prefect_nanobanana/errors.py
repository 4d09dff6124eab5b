"""The one exception root: every error the package raises on purpose derives from it.

`except NanoBananaError` catches whatever prefect-nanobanana itself refused or
could not do, in any room; each class keeps its own older base too
(`RunComfyError`, `StorageError`, `ValueError` for bad input), so narrower
handlers keep working.
"""

from __future__ import annotations

__all__ = ["NanoBananaError"]


class NanoBananaError(Exception):
    """Base class of every error prefect-nanobanana raises on purpose.

    Example:
        ```python
        from prefect_nanobanana import NanoBananaError, RunComfyClient

        try:
            RunComfyClient(api_token="...").status("request-id")
        except NanoBananaError as error:
            print(f"nano banana: {error}")
        ```
    """
