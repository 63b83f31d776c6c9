"""The audit log (moderators and admins): its entries page by page, and the server's
check of its hash chain (docs/governance.md, "Audit log")."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from registry.client.models import AuditEntry, AuditPage, AuditVerification
from registry.client.transport import Transport, without_none

MAX_PAGE = 100


class Audit:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def page(
        self,
        *,
        target: str | None = None,
        actor: str | None = None,
        action: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> AuditPage:
        """One page of entries, newest first; pass ``next_cursor`` back for the next.
        ``since`` (inclusive) and ``until`` (exclusive) need a timezone."""
        params = {
            "target": target,
            "actor": actor,
            "action": action,
            "since": since.isoformat() if since is not None else None,
            "until": until.isoformat() if until is not None else None,
            "limit": limit,
            "cursor": cursor,
        }
        return self._t.get(AuditPage, "/v1/audit", without_none(params))

    def list(
        self,
        *,
        target: str | None = None,
        actor: str | None = None,
        action: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> Iterator[AuditEntry]:
        """Iterate over the matching entries, newest first, following cursors lazily;
        ``limit`` caps how many are yielded (None: all)."""
        yielded, cursor = 0, None
        size = MAX_PAGE if limit is None else min(max(limit, 1), MAX_PAGE)
        while limit is None or yielded < limit:
            page = self.page(
                target=target,
                actor=actor,
                action=action,
                since=since,
                until=until,
                limit=size,
                cursor=cursor,
            )
            for entry in page.items:
                if limit is not None and yielded >= limit:
                    return
                yield entry
                yielded += 1
            if not page.next_cursor or not page.items:
                return
            cursor = page.next_cursor

    def verify(self) -> AuditVerification:
        """The server recomputes the whole chain: ``ok``, or the first break."""
        return self._t.get(AuditVerification, "/v1/audit/verify")
