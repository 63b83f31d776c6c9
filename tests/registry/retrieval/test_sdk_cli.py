"""``Agora.search`` / ``nearest_expert`` / moderation through the SDK, and the CLI commands
``agora search`` and ``agora expert init --from-nearest`` against a real uvicorn."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers.retrieval import DOMAINS
from typer.testing import CliRunner

from agora.cli import build_app
from registry.client import Agora, BadRequest, NotFound, SearchResults
from registry.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # The SDK does not depend on the backend; the service tests cover both.
    return Settings(data_dir=tmp_path / "agora", database_url=f"sqlite:///{tmp_path / 'a.db'}")


class _InProcess(httpx.BaseTransport):
    """The TestClient's transport, its responses re-wrapped as the sync streams httpx's
    Client expects."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        response.read()
        return httpx.Response(
            response.status_code, headers=response.headers, content=response.content
        )


@pytest.fixture
def sdk(api, tmp_path: Path) -> Iterator[Agora]:
    with Agora(
        "http://testserver",
        token=api.tokens.moderator,
        transport=_InProcess(api.client._transport),
        cache_dir=tmp_path / "cache",
    ) as agora:
        yield agora


def test_search_and_moderation_through_the_sdk(api, experts, sdk: Agora) -> None:
    found = sdk.search(DOMAINS["law"]["queries"], api.base.revision, k=2, temperature=0.05)
    assert isinstance(found, SearchResults)
    assert found.expert_ids[0] == experts["law"].id
    assert len(found.results) == 2
    assert sum(found.weights.values()) == pytest.approx(1.0)
    assert found.embedder.startswith("hashing-")
    one = sdk.search(DOMAINS["cooking"]["queries"][0], api.base.revision, k=1)
    assert one.expert_ids == [experts["cooking"].id]

    with pytest.raises(BadRequest) as bad:
        sdk.search("bread", api.base.revision, k=0)
    assert bad.value.code == "invalid_k"
    with pytest.raises(NotFound) as missing:
        sdk.search("bread", "f" * 64)
    assert missing.value.code == "base_model_not_found"

    done = sdk.disable_expert(experts["law"].id, "copyright claim")
    assert (done.status, done.action, done.actor) == ("disabled", "disable", "moderator")
    assert experts["law"].id not in sdk.search("court", api.base.revision, k=5).expert_ids
    sdk.enable_expert(experts["law"].id, "claim withdrawn")
    assert experts["law"].id in sdk.search("court", api.base.revision, k=5).expert_ids


def test_nearest_expert_from_a_file_a_directory_or_texts(
    api, experts, sdk: Agora, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "more").mkdir(parents=True)
    (corpus / "a.txt").write_text("\n\n".join(DOMAINS["astronomy"]["queries"]))
    (corpus / "more" / "b.txt").write_text("The galaxy's redshift and the star's planet.")
    (corpus / "ignored.md").write_text("bake bread " * 100)
    assert sdk.nearest_expert(corpus, api.base.revision).expert_id == experts["astronomy"].id
    assert sdk.nearest_expert(corpus / "a.txt", api.base.revision).expert_id == (
        experts["astronomy"].id
    )
    assert sdk.nearest_expert(DOMAINS["law"]["queries"], api.base.revision).expert_id == (
        experts["law"].id
    )
    # A corpus far larger than one search is sampled across, not cut at its start.
    big = tmp_path / "big.txt"
    big.write_text("\n\n".join(["Whisk eggs and sugar."] * 5000 + DOMAINS["law"]["queries"] * 9000))
    assert sdk.nearest_expert(big, api.base.revision).expert_id == experts["law"].id


def test_nearest_expert_without_experts(api, sdk: Agora) -> None:
    with pytest.raises(NotFound) as missing:
        sdk.nearest_expert(["anything at all"], api.base.revision)
    assert missing.value.code == "no_expert"


@pytest.fixture
def live_url(app) -> Iterator[str]:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_cli_search_and_expert_init_from_nearest(api, experts, live_url, tmp_path: Path) -> None:
    # The app's lifespan already runs under the TestClient (`api`); uvicorn only serves it.
    env = {
        "AGORA_REGISTRY_URL": live_url,
        "AGORA_TOKEN": api.tokens.alice,
        "AGORA_CACHE_DIR": str(tmp_path / "cli-cache"),
    }
    runner = CliRunner()
    result = runner.invoke(
        build_app(),
        [
            "search",
            *DOMAINS["cooking"]["queries"],
            "--base",
            api.base.revision,
            "-k",
            "2",
            "--json",
        ],
        env=env,
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["results"][0]["expert_id"] == experts["cooking"].id
    assert len(body["results"]) == 2

    table = runner.invoke(
        build_app(), ["search", "court appeal", "--base", api.base.revision], env=env
    )
    assert table.exit_code == 0
    assert experts["law"].id in table.output

    bad = runner.invoke(build_app(), ["search", "x", "--base", "0" * 64], env=env)
    assert bad.exit_code == 1
    assert "base_model_not_found" in bad.output

    data = tmp_path / "mine.txt"
    data.write_text("\n\n".join(DOMAINS["law"]["queries"]))
    out = tmp_path / "start.safetensors"
    init = runner.invoke(
        build_app(),
        [
            "expert",
            "init",
            "--from-nearest",
            str(data),
            "--base",
            api.base.revision,
            "--out",
            str(out),
        ],
        env=env,
        catch_exceptions=False,
    )
    assert init.exit_code == 0, init.output
    assert f"nearest expert {experts['law'].id} v1" in init.output
    weights = api.client.get(f"/v1/experts/{experts['law'].id}/weights").content
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(weights).digest()
