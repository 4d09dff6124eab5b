"""prefect-nanobanana: Nano Banana Pro image edits on the RunComfy Model API, as Prefect steps.

Every public name resolves on first use (see `_lazy`): `nanobanana --help` and
plain client users never pay for importing Prefect, while
`from prefect_nanobanana import RunComfyCredentials` and
`prefect block register -m prefect_nanobanana` work as usual.
"""

from ._lazy import lazy_exports
from .client import _EXPORTS as _CLIENT_EXPORTS

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    **{name: f".client{module}" for name, module in _CLIENT_EXPORTS.items()},
    "RunComfyCredentials": ".credentials",
    "NanoBananaEditJob": ".jobs",
    "NanoBananaEditJobRun": ".jobs",
    **dict.fromkeys(
        [
            "BatchEditResult",
            "BatchFailedError",
            "BatchJob",
            "EditAndArchiveResult",
            "EditImageResult",
            "batch_edit",
            "edit_and_archive",
            "edit_image",
        ],
        ".flows",
    ),
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
