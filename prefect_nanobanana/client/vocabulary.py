"""The API's fixed vocabulary: model id, enums and the output pixel table.

Kept free of heavy imports: the CLI builds its choices from it at start-up.
"""

from __future__ import annotations

from typing import Literal

NANO_BANANA_EDIT_MODEL_ID = "google/nano-banana/pro/edit"
DEFAULT_BASE_URL = "https://model-api.runcomfy.net"
# The provider serves outputs from its own subdomains (observed in its nodes, which
# refuse any other host); the API's base URL host is added by the client.
DEFAULT_OUTPUT_HOSTS: tuple[str, ...] = ("*.runcomfy.net",)

AspectRatio = Literal[
    "auto", "21:9", "16:9", "3:2", "4:3", "5:4", "1:1", "4:5", "3:4", "2:3", "9:16"
]
Resolution = Literal["1K", "2K", "4K"]
OutputFormat = Literal["jpeg", "png", "webp"]

# Google's published pixel sizes for Nano Banana Pro; "auto" follows the input.
OUTPUT_PIXEL_SIZES: dict[str, dict[str, tuple[int, int]]] = {
    "1:1": {"1K": (1024, 1024), "2K": (2048, 2048), "4K": (4096, 4096)},
    "2:3": {"1K": (848, 1264), "2K": (1696, 2528), "4K": (3392, 5056)},
    "3:2": {"1K": (1264, 848), "2K": (2528, 1696), "4K": (5056, 3392)},
    "3:4": {"1K": (896, 1200), "2K": (1792, 2400), "4K": (3584, 4800)},
    "4:3": {"1K": (1200, 896), "2K": (2400, 1792), "4K": (4800, 3584)},
    "4:5": {"1K": (928, 1152), "2K": (1856, 2304), "4K": (3712, 4608)},
    "5:4": {"1K": (1152, 928), "2K": (2304, 1856), "4K": (4608, 3712)},
    "9:16": {"1K": (768, 1376), "2K": (1536, 2752), "4K": (3072, 5504)},
    "16:9": {"1K": (1376, 768), "2K": (2752, 1536), "4K": (5504, 3072)},
    "21:9": {"1K": (1584, 672), "2K": (3168, 1344), "4K": (6336, 2688)},
}

MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
