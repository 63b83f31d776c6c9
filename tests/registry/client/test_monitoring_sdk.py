"""``agora.monitoring``: the typed round trip of text sets, schedules and runs against the
real app in-process, on each database backend (docs/governance.md, "Monitoring")."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from helpers.artifacts import make_datasheet, write_expert

from registry.client import Conflict, Forbidden, NotFound
from registry.client.models import CancelledSchedule, CreatedSchedule, MonitorRun, TextSet
from registry.settings import Settings


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "agora", database_url=database_url, arrival_checks=False)


def test_text_sets_schedules_and_runs_round_trip(make_agora, tokens, base, tmp_path) -> None:
    alice = make_agora(tokens.alice)
    weights = write_expert(tmp_path / "e.safetensors", base.schema, base_revision=base.revision)
    expert = alice.experts.submit(weights, make_datasheet(name="x").decode(), base.revision)
    mod = make_agora(tokens.moderator).monitoring

    made = mod.upload_text_set("news", dt.date(2026, 12, 1), ["First story.", " ", "Second."])
    assert isinstance(made, TextSet)
    assert (made.key, made.n_texts, made.uploader, made.texts) == (
        "news@2026-12-01",
        2,
        "moderator",
        None,
    )
    assert made.bytes == len(b"First story.") + len(b"Second.")
    older = mod.upload_text_set("news", "2026-11-01", ["Old story."])
    mod.upload_text_set("wiki", "2026-12-02", ["An article."])
    with pytest.raises(Conflict) as exc:
        mod.upload_text_set("news", "2026-12-01", ["Again."])
    assert exc.value.code == "text_set_exists"

    # Any token lists the sets (newest first, without texts); only moderators read texts.
    listed = alice.monitoring.text_sets("news")
    assert [s.key for s in listed] == ["news@2026-12-01", "news@2026-11-01"]
    assert all(s.texts is None for s in listed)
    assert mod.text_set(made.id).texts == ["First story.", "Second."]
    with pytest.raises(Forbidden):
        alice.monitoring.text_set(made.id)
    assert mod.delete_text_set(older.id).key == "news@2026-11-01"
    assert [s.key for s in mod.text_sets(limit=1)] == ["wiki@2026-12-02"]
    with pytest.raises(NotFound) as missing:
        mod.text_set(older.id)
    assert missing.value.code == "text_set_not_found"

    later = dt.datetime(2999, 1, 1, 12, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    schedule = mod.schedule(later, every_hours=12.5, text_sets=["news"], limit=1)
    assert isinstance(schedule, CreatedSchedule)
    assert schedule.not_before == later
    assert schedule.every_hours == 12.5
    assert len(schedule.jobs) == 1
    assert schedule.text_sets == {"names": ["news"], "limit": 1}
    (listed_schedule,) = mod.schedules()
    assert (listed_schedule.id, listed_schedule.runs, listed_schedule.completed) == (
        schedule.id,
        1,
        0,
    )
    (queued,) = mod.runs(expert.id)
    assert isinstance(queued, MonitorRun)
    assert (queued.job_id, queued.schedule_id, queued.version) == (schedule.jobs[0], schedule.id, 1)
    assert queued.run_at == later
    assert queued.completed_at is None
    assert mod.runs("ex_none") == []

    cancelled = mod.cancel_schedule(schedule.id)
    assert isinstance(cancelled, CancelledSchedule)
    assert cancelled.cancelled_jobs == schedule.jobs
    assert cancelled.cancelled_by == "moderator"
    assert cancelled.cancelled_at is not None
    with pytest.raises(Conflict) as again:
        mod.cancel_schedule(schedule.id)
    assert again.value.code == "schedule_cancelled"
