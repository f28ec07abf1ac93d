"""TaskRecord: every status spelling, URL shape, time format and error shape PiAPI uses."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flux_mcp.record import TaskRecord, normalise_status, parse_time


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("pending", "pending"), ("Pending", "pending"), ("PENDING", "pending"), ("staged", "pending"),
        ("Staged", "pending"), ("starting", "processing"), ("processing", "processing"),
        ("Processing", "processing"), ("retry", "processing"), ("completed", "completed"),
        ("Completed", "completed"), ("success", "completed"), ("SUCCESS", "completed"),
        ("failed", "failed"), ("Failed", "failed"), ("cancelled", "cancelled"), ("canceled", "cancelled"),
        ("something-new", "processing"), ("", "processing"), (None, "processing"),
    ],
)  # fmt: skip
def test_status_spellings_normalise(raw, expected):
    assert normalise_status(raw) == expected


@given(st.text())
def test_any_unknown_status_counts_as_running(raw):
    assert normalise_status(raw) in ("pending", "processing", "completed", "failed", "cancelled")


def _data(**overrides):
    data = {
        "task_id": "t1",
        "model": "Qubico/flux1-dev",
        "task_type": "txt2img",
        "status": "completed",
        "output": {"image_url": "https://img.theapi.app/temp/a.png", "image_urls": None, "image_base64": ""},
        "meta": {
            "created_at": "2025-06-30T07:11:30.719851187Z",
            "started_at": "2025-06-30T07:11:31.891665902Z",
            "ended_at": "0001-01-01T00:00:00Z",
            "usage": {"type": "llm", "frozen": 0, "consume": 200000},
        },
        "error": {"code": 1100, "raw_message": "", "message": "", "detail": None},
    }
    data.update(overrides)
    return data


def test_documented_get_task_example_parses():
    record = TaskRecord.from_api(_data())
    assert record.status == "completed" and record.is_terminal
    assert record.image_urls == ["https://img.theapi.app/temp/a.png"]
    assert record.created_at == datetime(2025, 6, 30, 7, 11, 30, 719851, tzinfo=UTC)
    assert record.ended_at is None  # 0001-01-01 means unset
    assert record.usage == {"type": "llm", "frozen": 0, "consume": 200000}
    assert record.error is None  # the placeholder error on a successful task is dropped


def test_image_url_and_image_urls_are_merged_deduplicated_in_order():
    output = {"image_url": "u1", "image_urls": ["u0", "u1", "u2", "", None, "u2"]}
    assert TaskRecord.from_api(_data(output=output)).image_urls == ["u1", "u0", "u2"]
    assert TaskRecord.from_api(_data(output=None, status="processing")).image_urls == []


def test_failed_task_keeps_the_error_object():
    error = {"code": 10001, "raw_message": "nsfw detected", "message": "task failed", "detail": None}
    record = TaskRecord.from_api(_data(status="failed", output=None, error=error))
    assert record.error is not None
    assert (record.error.code, record.error.message, record.error.raw_message) == (
        10001,
        "task failed",
        "nsfw detected",
    )


def test_failed_task_without_detail_still_has_an_error():
    record = TaskRecord.from_api(_data(status="Failed", error=None))
    assert record.error is not None and "failed" in record.error.text


@pytest.mark.parametrize("raw", ["", "0001-01-01T00:00:00Z", None, 12, "not a time"])
def test_unset_or_bad_times_are_none(raw):
    assert parse_time(raw) is None


def test_nanosecond_times_parse():
    assert parse_time("2025-06-30T07:12:03.388312371Z") == datetime(2025, 6, 30, 7, 12, 3, 388312, tzinfo=UTC)
