"""Evaluations: bits per byte of an expert or a composition on named text sets."""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence

from registry.client.jobs import EvaluationHandle
from registry.client.models import Evaluation, JobAccepted
from registry.client.resources.jobs import Jobs
from registry.client.transport import Transport, items, seg


class Evaluations:
    def __init__(self, transport: Transport, jobs: Jobs) -> None:
        self._t = transport
        self._jobs = jobs

    def create(
        self,
        text_sets: Mapping[str, str | Sequence[str]],
        *,
        expert_id: str | None = None,
        version: int | None = None,
        composition_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> EvaluationHandle:
        """Request bits per byte of an expert (as base + expert) or of a composition on
        named text sets, e.g. ``{"held_out": ["...", ...]}``. ``handle.wait()`` returns the
        scores; they are also stored (``list``)."""
        if (expert_id is None) == (composition_id is None):
            raise ValueError("evaluate needs exactly one of expert_id and composition_id")
        body = {
            "expert_id": expert_id,
            "version": version,
            "composition_id": composition_id,
            "text_sets": {
                name: [texts] if isinstance(texts, str) else list(texts)
                for name, texts in text_sets.items()
            },
        }
        accepted = self._t.post(
            JobAccepted, "/v1/evaluations", body, idempotency_key=idempotency_key
        )
        return EvaluationHandle(self._jobs, accepted.job_id)

    def list(
        self, *, expert_id: str | None = None, composition_id: str | None = None
    ) -> builtins.list[Evaluation]:
        """The stored evaluations of an expert (all versions) or of a composition."""
        if (expert_id is None) == (composition_id is None):
            raise ValueError("list_evaluations needs exactly one of expert_id and composition_id")
        path = (
            f"/v1/experts/{seg(expert_id)}/evaluations"
            if expert_id is not None
            else f"/v1/compositions/{seg(composition_id or '')}/evaluations"
        )
        return [Evaluation.model_validate(item) for item in items(self._t.request("GET", path))]
