"""Run times kept with the archive: what one run saves, the next one reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from prefect_nanobanana.storage import RunTimeHistory
from prefect_nanobanana.storage.run_times import RUN_TIMES_KEY, RUN_TIMES_SCHEMA

MODEL = "google/nano-banana/pro/edit"


def test_a_run_saves_and_the_next_reads_per_model_and_resolution(tmp_path: Path) -> None:
    assert RunTimeHistory(tmp_path).load(MODEL) == {}
    RunTimeHistory(tmp_path).save(MODEL, {"1K": [10.0, 11.5], "2K": [30.0]})
    RunTimeHistory(tmp_path).save("other/model", {"1K": [99.0]})
    RunTimeHistory(tmp_path).save(MODEL, {"1K": [12.0], "4K": []})

    assert RunTimeHistory(tmp_path).load(MODEL) == {"1K": [10.0, 11.5, 12.0], "2K": [30.0]}
    assert RunTimeHistory(tmp_path).load("other/model") == {"1K": [99.0]}
    document = json.loads((tmp_path / RUN_TIMES_KEY).read_text())
    assert document["schema"] == RUN_TIMES_SCHEMA


def test_only_the_newest_runs_are_kept(tmp_path: Path) -> None:
    history = RunTimeHistory(tmp_path, keep=3)
    history.save(MODEL, {"1K": [1.0, 2.0]})
    history.save(MODEL, {"1K": [3.0, 4.0]})
    assert history.load(MODEL) == {"1K": [2.0, 3.0, 4.0]}


def test_runs_known_within_bounds_are_kept_as_pairs(tmp_path: Path) -> None:
    RunTimeHistory(tmp_path).save(MODEL, {"4K": [31.0, [20.0, 55.5]]})
    assert RunTimeHistory(tmp_path).load(MODEL) == {"4K": [31.0, [20.0, 55.5]]}
    document = json.loads((tmp_path / RUN_TIMES_KEY).read_text())
    document["models"][MODEL]["4K"] += ["fast", [1.0], True, [2.0, "x"]]  # damaged entries
    (tmp_path / RUN_TIMES_KEY).write_text(json.dumps(document))
    assert RunTimeHistory(tmp_path).load(MODEL) == {"4K": [31.0, [20.0, 55.5]]}


def test_a_damaged_file_is_a_lost_prior_not_an_error(tmp_path: Path) -> None:
    (tmp_path / RUN_TIMES_KEY).write_text("{not json")
    assert RunTimeHistory(tmp_path).load(MODEL) == {}
    RunTimeHistory(tmp_path).save(MODEL, {"1K": [5.0]})
    assert RunTimeHistory(tmp_path).load(MODEL) == {"1K": [5.0]}


@pytest.mark.s3
def test_kept_on_s3(s3_bucket: str, s3_client: Any) -> None:
    archive = f"s3://{s3_bucket}/archive"
    RunTimeHistory(archive, s3_client=s3_client).save(MODEL, {"2K": [33.0]})
    assert RunTimeHistory(archive, s3_client=s3_client).load(MODEL) == {"2K": [33.0]}
    assert s3_client.get_object(Bucket=s3_bucket, Key="archive/_run_times.json")["Body"].read()
