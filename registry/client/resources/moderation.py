"""Moderation (moderators and admins): withdraw an expert and bring it back; anyone reads
the forgetting reports a disable leads to."""

from __future__ import annotations

from registry.client.models import ForgettingReport, ForgettingReports, ModerationAction
from registry.client.transport import Transport, seg


class Moderation:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def disable(self, expert_id: str, reason: str) -> ModerationAction:
        """Withdraw an expert: gone from search and downloads at once."""
        return self._act(expert_id, "disable", reason)

    def enable(self, expert_id: str, reason: str) -> ModerationAction:
        """Re-enable a disabled expert."""
        return self._act(expert_id, "enable", reason)

    def _act(self, expert_id: str, action: str, reason: str) -> ModerationAction:
        path = f"/v1/experts/{seg(expert_id)}/{action}"
        return self._t.post(ModerationAction, path, {"reason": reason})

    def forgetting(self, expert_id: str) -> list[ForgettingReport]:
        """The forgetting reports of an expert's disables, newest first (anyone)."""
        path = f"/v1/experts/{seg(expert_id)}/forgetting"
        return self._t.get(ForgettingReports, path).items
