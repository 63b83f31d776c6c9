"""Monitoring (docs/governance.md, "Monitoring"): named, dated text sets (moderators and
admins upload and delete them, any token lists them), schedules that measure every active
expert on them, and the runs' numbers (moderators and admins)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date as Date
from datetime import datetime

from registry.client.models import (
    CancelledSchedule,
    CreatedSchedule,
    MonitorRun,
    MonitorSchedule,
    TextSet,
)
from registry.client.transport import Transport, items, parse, seg, without_none


class Monitoring:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    # -- text sets -------------------------------------------------------------------------

    def upload_text_set(self, name: str, date: str | Date, texts: Sequence[str]) -> TextSet:
        """Upload a text set: its name (letters, digits, ``.``, ``_``, ``-``), its own date
        (``YYYY-MM-DD``) and its texts (blank ones are dropped by the server)."""
        day = date.isoformat() if isinstance(date, Date) else date
        body = {"name": name, "date": day, "texts": list(texts)}
        return self._t.post(TextSet, "/v1/text-sets", body)

    def text_sets(self, name: str | None = None, *, limit: int = 50) -> list[TextSet]:
        """Text sets, newest first (by their dates), without their texts; ``name``: only
        the sets of that name."""
        params = without_none({"name": name, "limit": limit})
        response = self._t.request("GET", "/v1/text-sets", params=params)
        return [TextSet.model_validate(item) for item in items(response)]

    def text_set(self, text_set_id: int) -> TextSet:
        """A text set with its ``texts`` (moderators and admins)."""
        return self._t.get(TextSet, f"/v1/text-sets/{seg(str(text_set_id))}")

    def delete_text_set(self, text_set_id: int) -> TextSet:
        """Delete a text set from future runs (jobs already queued keep their texts)."""
        path = f"/v1/text-sets/{seg(str(text_set_id))}"
        return parse(TextSet, self._t.request("DELETE", path))

    # -- schedules and runs ----------------------------------------------------------------

    def schedule(
        self,
        not_before: datetime | None = None,
        *,
        every_hours: float | None = None,
        text_sets: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> CreatedSchedule:
        """Queue one monitoring run per active expert, none before ``not_before`` (a
        datetime with a timezone; default now), on the newest set of each name in
        ``text_sets`` (default every name), at most ``limit`` sets; ``every_hours``
        repeats each expert's run that long after its last."""
        body = without_none(
            {
                "not_before": not_before.isoformat() if not_before is not None else None,
                "every_hours": every_hours,
                "text_sets": list(text_sets) if text_sets is not None else None,
                "limit": limit,
            }
        )
        return self._t.post(CreatedSchedule, "/v1/monitoring/schedules", body)

    def schedules(self, *, limit: int = 50) -> list[MonitorSchedule]:
        """Monitoring schedules, newest first, cancelled ones included."""
        response = self._t.request("GET", "/v1/monitoring/schedules", params={"limit": limit})
        return [MonitorSchedule.model_validate(item) for item in items(response)]

    def cancel_schedule(self, schedule_id: int) -> CancelledSchedule:
        """Cancel a schedule: no more runs, and its queued jobs are cancelled."""
        path = f"/v1/monitoring/schedules/{seg(str(schedule_id))}"
        return parse(CancelledSchedule, self._t.request("DELETE", path))

    def runs(self, expert_id: str | None = None, *, limit: int = 50) -> list[MonitorRun]:
        """Monitoring runs and their numbers, newest first; ``expert_id``: only its runs."""
        params = without_none({"expert_id": expert_id, "limit": limit})
        response = self._t.request("GET", "/v1/monitoring/runs", params=params)
        return [MonitorRun.model_validate(item) for item in items(response)]
