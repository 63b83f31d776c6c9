"""Reports of experts (docs/governance.md, "Reports"): anyone with a token files one;
moderators list the queue and resolve each; the reporter reads the outcome."""

from __future__ import annotations

import builtins

from registry.client.models import Report
from registry.client.transport import Transport, items, parse, seg, without_none


class Reports:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def create(self, expert_id: str, reason: str, *, evidence: str | None = None) -> Report:
        """Report an expert: why, and optional supporting text."""
        body = without_none({"reason": reason, "evidence": evidence})
        return self._t.post(Report, f"/v1/experts/{seg(expert_id)}/reports", body)

    def list(self, *, status: str | None = None, limit: int = 50) -> builtins.list[Report]:
        """Moderators: the queue (default open, oldest first); others: their own reports."""
        params = without_none({"status": status, "limit": limit})
        response = self._t.request("GET", "/v1/reports", params=params)
        return [Report.model_validate(item) for item in items(response)]

    def get(self, report_id: int) -> Report:
        """A report and its outcome (its reporter, moderators, admins)."""
        return parse(Report, self._t.request("GET", f"/v1/reports/{report_id}"))

    def resolve(self, report_id: int, resolution: str, *, note: str | None = None) -> Report:
        """Moderators: ``dismiss`` the report, or ``disable`` its expert."""
        body = without_none({"resolution": resolution, "note": note})
        return self._t.post(Report, f"/v1/reports/{report_id}/resolve", body)
