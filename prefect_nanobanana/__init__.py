"""prefect-nanobanana: Nano Banana Pro image edits on the RunComfy Model API, as Prefect steps.

The rooms (see the README's table): `client/` and `storage/` (no Prefect),
`emulator/` (the offline stand-ins), and the Prefect layer: `blocks/`, `tasks/`
(with the one submit guard, `tasks/guard.py`), `observe.py`, `flows/`; `cli/` for people.

Every public name resolves on first use (see `_lazy`): `nanobanana --help` and
plain client users never pay for importing Prefect, while
`from prefect_nanobanana import RunComfyCredentials` and
`prefect block register -m prefect_nanobanana` work as usual.
"""

from ._lazy import lazy_exports
from .blocks import _EXPORTS as _BLOCK_EXPORTS
from .client import _EXPORTS as _CLIENT_EXPORTS

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    **{name: f".client{module}" for name, module in _CLIENT_EXPORTS.items()},
    **{name: f".blocks{module}" for name, module in _BLOCK_EXPORTS.items()},
    **dict.fromkeys(
        [
            "BatchDryRun",
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
    "NanoBananaError": ".errors",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
