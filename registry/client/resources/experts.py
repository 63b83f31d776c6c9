"""Experts: submit a version, list and read them, download their weights (verified),
withdraw and restore one's own."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from registry.client.cache import parse_digest, place
from registry.client.errors import NotFound
from registry.client.models import Expert, ExpertPage, ModerationAction, SubmittedExpert
from registry.client.transport import (
    ProgressCallback,
    Transport,
    parse,
    reader_of,
    seg,
    without_none,
)


class Experts:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def submit(
        self,
        weights_path: str | os.PathLike[str],
        datasheet: str | os.PathLike[str],
        base_revision: str,
        *,
        expert_id: str | None = None,
        idempotency_key: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> SubmittedExpert:
        """Submit expert weights (a safetensors file) with their datasheet.

        ``datasheet`` is a path (``Path``, or a one-line ``str`` naming an existing file) or
        the markdown text itself. Pass ``expert_id`` to add a new version of your own expert.
        The weights stream from disk; they are never read whole into memory.
        """
        weights = Path(weights_path)
        sheet = datasheet_bytes(datasheet)
        data = {"base_revision": base_revision}
        if expert_id is not None:
            data["expert_id"] = expert_id
        with weights.open("rb") as raw:
            files = {
                "weights": (weights.name, reader_of(raw, progress), "application/octet-stream"),
                "datasheet": ("datasheet.md", sheet, "text/markdown"),
            }
            response = self._t.request(
                "POST",
                "/v1/experts",
                data=data,
                files=files,
                rewind=[raw],
                idempotency_key=idempotency_key,
            )
        return parse(SubmittedExpert, response)

    def page(
        self,
        *,
        base_revision: str | None = None,
        status: str | None = None,
        q: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> ExpertPage:
        """One page of experts; pass its ``next_cursor`` back as ``cursor`` for the next."""
        params = {
            "base_revision": base_revision,
            "status": status,
            "q": q,
            "limit": limit,
            "cursor": cursor,
        }
        return self._t.get(ExpertPage, "/v1/experts", without_none(params))

    def list(
        self,
        *,
        base_revision: str | None = None,
        status: str | None = None,
        q: str | None = None,
        limit: int | None = None,
        page_size: int | None = None,
    ) -> Iterator[Expert]:
        """Iterate over the matching experts, following cursors page by page (lazily).

        ``limit`` caps the number of experts yielded (None: all); ``page_size`` is how many
        each request asks for (the server caps it at 100).
        """
        if limit is not None and limit <= 0:
            return
        if page_size is None and limit is not None:
            page_size = min(limit, 100)
        yielded = 0
        cursor: str | None = None
        while True:
            page = self.page(
                base_revision=base_revision, status=status, q=q, limit=page_size, cursor=cursor
            )
            for expert in page.items:
                yield expert
                yielded += 1
                if limit is not None and yielded >= limit:
                    return
            if not page.next_cursor or not page.items:
                return
            cursor = page.next_cursor

    def get(self, expert_id: str) -> Expert:
        """The expert's metadata, with all its versions."""
        return self._t.get(Expert, f"/v1/experts/{seg(expert_id)}")

    def wait_for_arrival(
        self,
        expert_id: str,
        *,
        timeout: float = 600.0,
        interval: float = 1.0,
        on_poll: Callable[[Expert], None] | None = None,
    ) -> Expert:
        """Poll the expert until its latest version's check on arrival is no longer
        pending (``expert.arrival.state``: passed, flagged, ...; ``expert.status`` says
        whether it is active); at once when no check ran. ``TimeoutError`` after
        ``timeout`` seconds; ``on_poll`` sees each answer."""
        deadline = self._t.clock() + timeout
        while True:
            expert = self.get(expert_id)
            if on_poll is not None:
                on_poll(expert)
            if expert.arrival is None or not expert.arrival.pending:
                return expert
            if self._t.clock() >= deadline:
                raise TimeoutError(
                    f"expert {expert_id}'s check on arrival (job {expert.arrival.job_id}) is "
                    f"still pending after {timeout:g} s: is a worker running?"
                )
            self._t.sleep(interval)

    def datasheet(self, expert_id: str, version: int | None = None) -> str:
        """The datasheet markdown of the given (default: latest) version."""
        params = {"version": version} if version is not None else None
        path = f"/v1/experts/{seg(expert_id)}/datasheet"
        return self._t.request("GET", path, params=params).text

    def withdraw(self, expert_id: str, reason: str | None = None) -> ModerationAction:
        """Withdraw one's own expert (its owner, or an admin): it and everything derived
        from it leave search, compositions and downloads until ``restore``."""
        return self._owner(expert_id, "withdraw", reason)

    def restore(self, expert_id: str, reason: str | None = None) -> ModerationAction:
        """Bring back one's own withdrawn expert, and what it withdrew."""
        return self._owner(expert_id, "restore", reason)

    def _owner(self, expert_id: str, action: str, reason: str | None) -> ModerationAction:
        path = f"/v1/experts/{seg(expert_id)}/{action}"
        return self._t.post(ModerationAction, path, {"reason": reason})

    def download(
        self,
        expert_id: str,
        *,
        version: int | None = None,
        dest: str | os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> Path:
        """Download an expert's weights, verified against the registry's sha256.

        Returns the cached file, or ``dest`` (a file path, or a directory that receives
        ``<id>-v<version>.safetensors``) when given. A blob already in the cache is
        re-hashed and returned without transferring it again; an interrupted download
        resumes from its ``.part`` file. Raises ``DigestMismatch`` when the bytes do not
        hash to the version's digest (twice; nothing is kept, ``dest`` is not touched) and
        ``DownloadInterrupted`` when the transfer keeps breaking off (docs/sdk.md,
        "Downloads").
        """
        expert = self.get(expert_id)
        number = version if version is not None else expert.latest_version
        entry = next((v for v in expert.versions if v.version == number), None)
        if entry is None:
            raise NotFound(f"expert {expert_id} has no version {number}", code="version_not_found")
        hexdigest = parse_digest(entry.digest)
        cached = self._t.cache.lookup(hexdigest)
        if cached is not None:
            # A cached blob is handed out only once the registry said yes, every time,
            # failing closed: a one-byte ranged GET of the weights answers 451 when the
            # expert, an ancestor, or a disabled expert with the same weights withdrew
            # them (docs/governance.md, "Downloads and the local cache").
            self._t.request(
                "GET",
                f"/v1/experts/{seg(expert_id)}/weights",
                params={"version": number},
                headers={"Range": "bytes=0-0"},
            )
        path = cached or self._t.fetch_blob(
            f"/v1/experts/{seg(expert_id)}/weights",
            params={"version": number},
            hexdigest=hexdigest,
            size=entry.size,
            progress=progress,
        )
        if dest is None:
            return path
        target = Path(dest)
        if target.is_dir():
            target = target / f"{expert_id}-v{number}.safetensors"
        return place(path, target, hexdigest)


def datasheet_bytes(datasheet: str | os.PathLike[str]) -> bytes:
    if isinstance(datasheet, os.PathLike):
        return Path(datasheet).read_bytes()
    # A one-line string naming an existing file is a path; anything else is the markdown.
    if "\n" not in datasheet and datasheet.strip() and Path(datasheet).is_file():
        return Path(datasheet).read_bytes()
    return datasheet.encode("utf-8")
