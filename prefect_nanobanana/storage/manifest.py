"""Batch manifests in (JSONL or CSV, one edit per row) and results manifests out (JSONL).

Reading is strict about shape — a missing prompt, no images, an unknown column —
because a typo such as ``resoluton`` would otherwise be dropped silently and the
paid job run with defaults. Option *values* are the caller's to validate (the
storage room does not know the API's vocabulary).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .backends import open_object
from .errors import LocationError, ManifestError
from .locations import LocalLocation, parse_location, redact, strip_signature

OPTION_KEYS = ("aspect_ratio", "resolution", "output_format", "num_images", "id")
_IMAGE_KEYS = ("images", "image")
_ALLOWED_KEYS = frozenset({"prompt", *_IMAGE_KEYS, *OPTION_KEYS})
_IMAGE_SEPARATORS = re.compile(r"[|;]")


def write_results_manifest(
    location: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]], *, s3_client: Any = None
) -> str:
    """Write one JSON object per row (JSONL) to a local file or S3; returns the location.

    Rows are streamed to a temp file (then renamed, or uploaded), and every URL in
    them is signature-stripped: results manifests are shared, signatures must not be.
    """
    backend, key = open_object(location, s3_client)
    backend.check()
    temp = backend.temp_file(key)
    try:
        with temp.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(redact(dict(row)), ensure_ascii=False) + "\n")
        return backend.commit_file(temp, key, "application/x-ndjson")
    finally:
        temp.unlink(missing_ok=True)


def read_manifest(
    location: str | os.PathLike[str], *, s3_client: Any = None
) -> list[dict[str, Any]]:
    """The rows of a batch manifest (JSONL, or CSV with a header), as plain dicts.

    Each row has ``line`` (for messages), ``prompt``, ``images`` (a list; CSV cells
    split on ``|`` or ``;``; a single ``image`` column also works) and whichever of
    ``aspect_ratio, resolution, output_format, num_images, id`` it sets. Relative
    local image paths are resolved against the manifest's folder. Raises
    :class:`ManifestError` naming the line for anything malformed.
    """
    shown = strip_signature(str(location))
    try:
        backend, key = open_object(location, s3_client)
        raw = backend.read_bytes(key)
    except LocationError as exc:
        raise ManifestError(f"manifest {shown}: {exc}") from exc
    if raw is None:
        raise ManifestError(f"manifest {shown} not found")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"manifest {shown} is not UTF-8 text: {exc}") from exc

    parsed = parse_location(location)
    base = parsed.path.absolute().parent if isinstance(parsed, LocalLocation) else None
    records = _csv_records(text, shown) if _is_csv(key, text) else _jsonl_records(text, shown)
    rows: list[dict[str, Any]] = []
    seen_ids: dict[str, int] = {}
    for line, record in records:
        row = _normalise(record, f"{shown}:{line}", base)
        row["line"] = line
        if "id" in row:
            if row["id"] in seen_ids:
                raise ManifestError(
                    f"{shown}:{line}: id {row['id']!r} already used on line {seen_ids[row['id']]}"
                )
            seen_ids[row["id"]] = line
        rows.append(row)
    if not rows:
        raise ManifestError(f"manifest {shown} has no rows")
    return rows


def _is_csv(key: str, text: str) -> bool:
    suffix = Path(key).suffix.lower()
    if suffix == ".csv":
        return True
    if suffix in (".jsonl", ".ndjson", ".json"):
        return False
    return not text.lstrip().startswith("{")


def _jsonl_records(text: str, shown: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, content in enumerate(text.splitlines(), start=1):
        if not content.strip():
            continue
        try:
            record = json.loads(content)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{shown}:{line}: invalid JSON: {exc.msg}") from exc
        if not isinstance(record, dict):
            raise ManifestError(
                f"{shown}:{line}: expected a JSON object, got {type(record).__name__}"
            )
        yield line, record


def _csv_records(text: str, shown: str) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    if "prompt" not in header:
        raise ManifestError(f"{shown}:1: the CSV header has no 'prompt' column")
    try:
        for record in reader:
            if None in record:
                raise ManifestError(f"{shown}:{reader.line_num}: more fields than the header")
            if not any((value or "").strip() for value in record.values()):
                continue
            yield (
                reader.line_num,
                {column: value for column, value in record.items() if value not in (None, "")},
            )
    except csv.Error as exc:
        raise ManifestError(f"{shown}:{reader.line_num}: {exc}") from exc


def _normalise(record: Mapping[str, Any], where: str, base: Path | None) -> dict[str, Any]:
    unknown = sorted(set(record) - _ALLOWED_KEYS)
    if unknown:
        raise ManifestError(
            f"{where}: unknown field(s) {', '.join(unknown)}; allowed: "
            f"prompt, images (or image), {', '.join(OPTION_KEYS)}"
        )
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ManifestError(f"{where}: missing prompt")
    if record.get("images") and record.get("image"):
        raise ManifestError(f"{where}: set either 'images' or 'image', not both")
    images = _image_list(record.get("images") or record.get("image"), where)
    row: dict[str, Any] = {"prompt": prompt, "images": [_resolve(i, where, base) for i in images]}
    for key in OPTION_KEYS:
        if record.get(key) is not None:
            row[key] = str(record[key]) if key == "id" else record[key]
    return row


def _image_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        images = [part.strip() for part in _IMAGE_SEPARATORS.split(value)]
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        images = [item.strip() for item in value]
    elif value is None:
        images = []
    else:
        raise ManifestError(f"{where}: images must be a string or a list of strings")
    images = [image for image in images if image]
    if not images:
        raise ManifestError(f"{where}: missing images")
    return images


def _resolve(image: str, where: str, base: Path | None) -> str:
    """Check the image location's form; make relative paths relative to the manifest."""
    try:
        location = parse_location(image)
    except LocationError as exc:
        raise ManifestError(f"{where}: {exc}") from exc
    if isinstance(location, LocalLocation) and base is not None and not location.path.is_absolute():
        return str(base / location.path)
    return image
