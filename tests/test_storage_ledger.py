"""The ledger (local and S3), job keys, and batch/results manifests."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from prefect_nanobanana.storage import (
    Ledger,
    LedgerEntry,
    LedgerError,
    ManifestError,
    job_key_for,
    read_manifest,
    write_results_manifest,
)

SIGNED = "https://cdn.example.com/a.png?X-Amz-Signature=secret"


def _entry(job_key: str, status: str = "submitting", **fields: Any) -> LedgerEntry:
    now = dt.datetime.now(dt.timezone.utc)
    return LedgerEntry(job_key=job_key, status=status, submitted_at=now, updated_at=now, **fields)


def _round_trip(ledger: Ledger) -> None:
    key = job_key_for("make it blue", ["photo.png"], {"resolution": "2K"})
    assert ledger.read(key) is None and ledger.lookup(key) is None

    # A claim is created once: the second create loses, whatever it carries.
    claim = _entry(key)
    first = ledger.create(claim)
    assert first is not None
    assert ledger.create(_entry(key, "submitted", request_id="req-other")) is None
    assert ledger.read(key) == (claim, first)

    # Later writes name the version they read; a stale version loses.
    submitted = claim.model_copy(
        update={"status": "submitted", "request_id": "req-1", "facts": {"sources": [SIGNED]}}
    )
    second = ledger.replace(submitted, first)
    assert second is not None and second != first
    assert ledger.replace(claim.model_copy(update={"status": "failed"}), first) is None
    entry, version = ledger.read(key)
    assert (entry.status, entry.request_id, version) == ("submitted", "req-1", second)
    assert entry.facts["sources"] == [SIGNED.split("?")[0]]  # no signature on disk
    archived = entry.model_copy(update={"status": "archived", "cost": 0.15})
    assert ledger.replace(archived, version) is not None
    assert ledger.lookup(key).cost == 0.15

    # A replace of a record that does not exist loses too.
    other = job_key_for("another", ["photo.png"])
    assert ledger.replace(_entry(other), second) is None
    assert ledger.create(_entry(other, "failed", error="boom")) is not None

    assert [entry.job_key for entry in ledger.entries()] == [key, other]
    assert sorted(versioned.entry.job_key for versioned in ledger.scan()) == sorted([key, other])


def test_ledger_round_trip_in_a_folder(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path))
    _round_trip(ledger)
    # Hidden: the lock files of conditional replaces (never read as entries).
    files = sorted(p.name for p in (tmp_path / "_ledger").iterdir() if not p.name.startswith("."))
    assert len(files) == 2 and all(name.endswith(".json") for name in files)
    assert "secret" not in "".join(path.read_text() for path in tmp_path.rglob("*.json"))


@pytest.mark.s3
def test_ledger_round_trip_on_s3(s3_client: Any, s3_bucket: str) -> None:
    ledger = Ledger(f"s3://{s3_bucket}/archive", s3_client=s3_client)
    ledger.check()
    _round_trip(ledger)
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert all(key.startswith("archive/_ledger/") for key in keys) and len(keys) == 2


@pytest.mark.s3
def test_ledger_check_names_a_missing_bucket(s3_client: Any) -> None:
    with pytest.raises(ValueError, match="bucket missing-ledger does not exist"):
        Ledger("s3://missing-ledger/x", s3_client=s3_client).check()


def test_job_keys_are_stable_and_distinguish_what_matters(tmp_path: Path) -> None:
    base = job_key_for("p", ["a.png", SIGNED], {"resolution": "2K", "aspect_ratio": None})
    assert len(base) == 64
    same = job_key_for(
        "p",
        [str(Path("a.png").absolute()), SIGNED.replace("secret", "other")],
        {"resolution": "2K"},
    )
    assert same == base
    assert job_key_for("p", ["a.png", SIGNED], {"resolution": "4K"}) != base
    assert job_key_for("p", [SIGNED, "a.png"], {"resolution": "2K"}) != base
    assert job_key_for("q", ["a.png", SIGNED], {"resolution": "2K"}) != base
    assert job_key_for("p", ["a.png", SIGNED], {"resolution": "2K"}, row_id="2") != base


def test_results_manifest_local_and_signature_free(tmp_path: Path) -> None:
    rows = [{"id": "1", "request_id": "r1", "outputs": [SIGNED]}, {"id": "2", "error": "x"}]
    location = write_results_manifest(str(tmp_path / "out" / "results.jsonl"), rows)
    lines = Path(location).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"id": "1", "request_id": "r1", "outputs": [SIGNED.split("?")[0]]},
        {"id": "2", "error": "x"},
    ]


@pytest.mark.s3
def test_manifests_on_s3(s3_client: Any, s3_bucket: str) -> None:
    location = write_results_manifest(
        f"s3://{s3_bucket}/runs/results.jsonl", [{"a": 1}], s3_client=s3_client
    )
    assert location == f"s3://{s3_bucket}/runs/results.jsonl"
    s3_client.put_object(
        Bucket=s3_bucket, Key="batch.csv", Body=b"prompt,image\nblue,s3://b-x/in/a.png\n"
    )
    rows = read_manifest(f"s3://{s3_bucket}/batch.csv", s3_client=s3_client)
    assert rows == [{"prompt": "blue", "images": ["s3://b-x/in/a.png"], "line": 2}]


def test_read_jsonl_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "batch.jsonl"
    manifest.write_text(
        '{"prompt": "blue", "images": ["photos/a.png", "https://x.test/b.png"], "num_images": 2}\n'
        "\n"
        '{"prompt": "red", "image": "/abs/c.png", "id": 7, "resolution": "4K"}\n'
    )
    assert read_manifest(str(manifest)) == [
        {
            "prompt": "blue",
            "images": [str(tmp_path / "photos/a.png"), "https://x.test/b.png"],
            "num_images": 2,
            "line": 1,
        },
        {"prompt": "red", "images": ["/abs/c.png"], "id": "7", "resolution": "4K", "line": 3},
    ]


def test_read_csv_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "batch.csv"
    manifest.write_text(
        "id,prompt,images,aspect_ratio\n"
        'r1,"blue, please",/a.png|/b.png,16:9\n'
        "r2,red,/c.png; /d.png,\n"
    )
    assert read_manifest(str(manifest)) == [
        {
            "prompt": "blue, please",
            "images": ["/a.png", "/b.png"],
            "aspect_ratio": "16:9",
            "id": "r1",
            "line": 2,
        },
        {"prompt": "red", "images": ["/c.png", "/d.png"], "id": "r2", "line": 3},
    ]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("m.jsonl", '{"prompt": "a", "images": ["/a.png"]}\n{oops\n', "m.jsonl:2: invalid JSON"),
        ("m.jsonl", '{"images": ["/a.png"]}\n', "m.jsonl:1: missing prompt"),
        ("m.jsonl", '{"prompt": "a"}\n', "m.jsonl:1: missing images"),
        ("m.jsonl", '["a"]\n', "m.jsonl:1: expected a JSON object"),
        (
            "m.jsonl",
            '{"prompt": "a", "image": "/a", "resoluton": "4K"}\n',
            "unknown field(s) resoluton",
        ),
        ("m.csv", "prompt,images\na,/a.png\nb,\n", "m.csv:3: missing images"),
        ("m.csv", "prompt,images\na,/a.png,extra\n", "m.csv:2: more fields than the header"),
        ("m.csv", "images\n/a.png\n", "m.csv:1: the CSV header has no 'prompt' column"),
        ("m.csv", "id,prompt,image\n1,a,/a\n1,b,/b\n", "m.csv:3: id '1' already used on line 2"),
        ("m.csv", "prompt,image\na,http://example.com/a.png?s=1\n", "m.csv:2: refusing non-HTTPS"),
        ("m.csv", "prompt,image\n", "has no rows"),
    ],
)
def test_malformed_manifests_name_the_line(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(ManifestError) as caught:
        read_manifest(str(tmp_path / name))
    assert message in str(caught.value)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(str(tmp_path / "nope.csv"))


def test_an_unreadable_entry_is_an_error_not_an_absent_job(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "archive")
    key = job_key_for("p", ["https://example.com/a.png"], row_id="7")
    assert ledger.create(_entry(key)) is not None
    Path(ledger.location(key)).write_text("{not json")
    # Absent would mean "never submitted": a second payment. Unreadable must stop.
    with pytest.raises(LedgerError, match="unreadable"):
        ledger.read(key)


def test_local_creates_race_safely_across_threads(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    ledger = Ledger(tmp_path / "archive")
    key = job_key_for("p", ["a.png"])
    ledger.check()
    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(lambda i: ledger.create(_entry(key, error=str(i))), range(32)))
    assert sum(version is not None for version in versions) == 1
    winner = versions.index(next(v for v in versions if v is not None))
    assert ledger.lookup(key).error == str(winner)
