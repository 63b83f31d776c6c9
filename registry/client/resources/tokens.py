"""Tokens (admins): create one (its secret comes back once), list, revoke. Each creation
and revocation is an entry of the audit log (docs/governance.md)."""

from __future__ import annotations

import builtins

from registry.client.models import CreatedToken, TokenInfo
from registry.client.transport import Transport, items, parse, without_none


class Tokens:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def create(
        self, name: str, role: str, *, trusted: bool = False, reason: str | None = None
    ) -> CreatedToken:
        """A new token for ``name`` with ``role``; keep ``secret``: it is not shown again."""
        body = without_none({"name": name, "role": role, "trusted": trusted, "reason": reason})
        return self._t.post(CreatedToken, "/v1/tokens", body)

    def list(self) -> builtins.list[TokenInfo]:
        """Every token, revoked ones included; never a secret."""
        response = self._t.request("GET", "/v1/tokens")
        return [TokenInfo.model_validate(item) for item in items(response)]

    def revoke(self, token_id: int, *, reason: str | None = None) -> TokenInfo:
        """Revoke a token: its next request is refused (401 ``invalid_token``)."""
        params = without_none({"reason": reason})
        return parse(TokenInfo, self._t.request("DELETE", f"/v1/tokens/{token_id}", params=params))
