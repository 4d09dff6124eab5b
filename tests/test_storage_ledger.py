"""The ledger (local and S3), job keys, and batch/results manifests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from prefect_nanobanana.storage import (
    Ledger,
    LedgerError,
    ManifestError,
    job_key_for,
    read_manifest,
    write_results_manifest,
)

SIGNED = "https://cdn.example.com/a.png?X-Amz-Signature=secret"


def _round_trip(ledger: Ledger) -> None:
    key = job_key_for("make it blue", ["photo.png"], {"resolution": "2K"})
    assert ledger.lookup(key) is None

    submitted = ledger.record_submit(key, "req-1", model="m", sources=[SIGNED])
    assert submitted.status == "submitted" and submitted.facts["sources"] == [SIGNED.split("?")[0]]
    assert ledger.lookup(key) == submitted

    archived = ledger.mark_archived(key, "archive/metadata.json", ["archive/0.png"])
    assert (archived.status, archived.output_locations) == ("archived", ["archive/0.png"])
    assert ledger.lookup(key) == archived

    other = job_key_for("another", ["photo.png"])
    ledger.record_submit(other, "req-2")
    failed = ledger.mark_failed(other, RuntimeError(f"cannot fetch {SIGNED}"))
    assert failed.status == "failed"
    assert failed.error == "RuntimeError: cannot fetch https://cdn.example.com/a.png"

    resubmitted = ledger.record_submit(other, "req-3")
    assert resubmitted.previous_request_ids == ["req-2"] and resubmitted.error is None

    assert [entry.job_key for entry in ledger.entries()] == [key, other]
    with pytest.raises(LedgerError, match="no ledger entry"):
        ledger.mark_failed(job_key_for("never", []), "boom")


def test_ledger_round_trip_in_a_folder(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path))
    _round_trip(ledger)
    files = sorted(path.name for path in (tmp_path / "_ledger").iterdir())
    assert len(files) == 2 and all(name.endswith(".json") for name in files)
    assert "secret" not in "".join(path.read_text() for path in tmp_path.rglob("*.json"))


@pytest.mark.s3
def test_ledger_round_trip_on_s3(s3_client: Any, s3_bucket: str) -> None:
    ledger = Ledger(f"s3://{s3_bucket}/archive", s3_client=s3_client)
    ledger.check()
    _round_trip(ledger)
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert all(key.startswith("archive/_ledger/") for key in keys) and len(keys) == 2


def _many(ledger: Ledger) -> None:
    keys = [job_key_for(f"row {i}", ["photo.png"], row_id=str(i)) for i in range(5)]
    ledger.record_submit(keys[1], "req-1")
    ledger.mark_archived(ledger.record_submit(keys[3], "req-3").job_key, "m.json", ["0.png"])
    found = ledger.lookup_many(keys)
    assert list(found) == keys
    assert found == {key: ledger.lookup(key) for key in keys}
    assert [entry and entry.status for entry in found.values()] == [
        None,
        "submitted",
        None,
        "archived",
        None,
    ]


def test_many_lookups_in_a_folder(tmp_path: Path) -> None:
    _many(Ledger(str(tmp_path)))


@pytest.mark.s3
def test_many_lookups_on_s3_list_once_and_read_only_what_exists(
    s3_client: Any, s3_bucket: str
) -> None:
    ledger = Ledger(f"s3://{s3_bucket}/archive", s3_client=s3_client)
    calls: list[str] = []
    s3_client.meta.events.register(
        "before-call.s3.*", lambda model, **_: calls.append(model.name), unique_id="count"
    )
    try:
        _many(ledger)
        calls.clear()
        keys = [job_key_for(f"row {i}", ["photo.png"], row_id=str(i)) for i in range(5)]
        ledger.lookup_many(keys)
    finally:
        s3_client.meta.events.unregister("before-call.s3.*", unique_id="count")
    assert sorted(calls) == ["GetObject", "GetObject", "ListObjectsV2"]


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


def test_submitting_marker_keeps_history_and_is_replaced_by_the_request(tmp_path):
    ledger = Ledger(tmp_path / "archive")
    key = job_key_for("p", ["https://example.com/a.png"], row_id="7")
    ledger.record_submit(key, "req-old")
    ledger.mark_failed(key, "job failed")
    marker = ledger.record_submitting(key)
    assert (marker.status, marker.request_id) == ("submitting", None)
    assert ledger.lookup(key).previous_request_ids == ["req-old"]
    entry = ledger.record_submit(key, "req-new")
    assert (entry.status, entry.request_id) == ("submitted", "req-new")
    assert entry.previous_request_ids == ["req-old"]
