"""Base models: list, read, upload (admin) and download a revision's three files."""

from __future__ import annotations

import builtins
import contextlib
import os
from pathlib import Path

from registry.client.cache import parse_digest, place
from registry.client.errors import BadRequest
from registry.client.models import BaseModelRevision
from registry.client.transport import (
    ProgressCallback,
    ProgressReader,
    Transport,
    items,
    parse,
    seg,
)


class Bases:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def list(self) -> builtins.list[BaseModelRevision]:
        response = self._t.request("GET", "/v1/base-models")
        return [BaseModelRevision.model_validate(item) for item in items(response)]

    def get(self, revision: str) -> BaseModelRevision:
        return self._t.get(BaseModelRevision, f"/v1/base-models/{seg(revision)}")

    def only_revision(self) -> str:
        """The registry's one base revision; ``BadRequest`` when it has none or several."""
        bases = self.list()
        if len(bases) != 1:
            raise BadRequest(
                f"the registry has {len(bases)} base models: name one with base_revision "
                f"({', '.join(b.revision[:12] for b in bases) or 'none yet'})",
                code="base_revision_required",
            )
        return bases[0].revision

    def upload(
        self,
        config: str | os.PathLike[str],
        tokenizer: str | os.PathLike[str],
        weights: str | os.PathLike[str],
        *,
        name: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> BaseModelRevision:
        """Store a base model revision (admin). Identical files give the same revision."""
        paths = {"config": Path(config), "tokenizer": Path(tokenizer), "weights": Path(weights)}
        with contextlib.ExitStack() as stack:
            raws = {field: stack.enter_context(p.open("rb")) for field, p in paths.items()}
            total = sum(os.fstat(raw.fileno()).st_size for raw in raws.values())
            # One running total across the three files, as one transfer.
            offsets: dict[str, int] = {}

            def report(field: str) -> ProgressCallback | None:
                if progress is None:
                    return None
                cb = progress

                def on_read(done: int, _total: int | None) -> None:
                    offsets[field] = done
                    cb(sum(offsets.values()), total)

                return on_read

            files = {
                field: (
                    paths[field].name,
                    ProgressReader(raw, os.fstat(raw.fileno()).st_size, report(field)),
                    "application/octet-stream",
                )
                for field, raw in raws.items()
            }
            data = {"name": name} if name is not None else None
            response = self._t.request(
                "POST", "/v1/base-models", data=data, files=files, rewind=list(raws.values())
            )
        return parse(BaseModelRevision, response)

    def download(
        self,
        revision: str,
        dest_dir: str | os.PathLike[str],
        *,
        progress: ProgressCallback | None = None,
    ) -> Path:
        """Fetch ``config.json``, ``tokenizer.json`` and ``model.safetensors`` into ``dest_dir``."""
        base = self.get(revision)
        target = Path(dest_dir)
        target.mkdir(parents=True, exist_ok=True)
        layout = {
            "config": ("config.json", base.files.config),
            "tokenizer": ("tokenizer.json", base.files.tokenizer),
            "weights": ("model.safetensors", base.files.weights),
        }
        for kind, (filename, info) in layout.items():
            path = self._t.cached_or_fetch(
                f"/v1/base-models/{seg(revision)}/files/{kind}",
                params=None,
                digest=info.digest,
                size=info.size,
                progress=progress,
            )
            place(path, target / filename, parse_digest(info.digest))
        return target
