"""`agora expert datasheet` and `agora expert check` on real text, against the real
registry app (SQLite and PostgreSQL): the generated datasheet is accepted unchanged, each
human field left unfilled is refused by name, and `check` answers what the server answers.

The text is the machine's Debian copyright files (/usr/share/doc/*/copyright: legal prose
with names and e-mail addresses, in no corpus domain and not in the repository); Python's
pydoc topics where a machine has none. A random tiny base is enough: tokenization and the
expert schema are what is checked here, not what the expert learned.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers.artifacts import make_expert_bytes
from helpers.tiny_models import make_tiny_base
from typer.testing import CliRunner

from agora.cli import build_app
from agora.commands.datasheet import HUMAN_FIELDS

FILLED = {
    "--domain": "Copyright and license statements of Debian packages",
    "--intended-use": "Language modelling of license and copyright text",
    "--out-of-scope-use": "Legal advice about any license",
    "--pii-handling": "Maintainer names and e-mail addresses are kept: they are published "
    "with every package",
    "--collection": "Copied from /usr/share/doc of a Debian installation",
    "--contact": "mailto:maintainer@example.org",
}
# Each human field's JSON path when its flag is left out.
UNFILLED_PATH = {
    flag: f"$.{key}[0]" if is_list else f"$.{key}" for key, flag, is_list, _ in HUMAN_FIELDS
}


def _real_text(root: Path) -> Path:
    out = root / "notes"
    out.mkdir()
    found = sorted(
        p
        for p in Path("/usr/share/doc").glob("*/copyright")
        if p.is_file() and 1_000 <= p.stat().st_size <= 20_000
    )[:24]
    if len(found) >= 12:
        for p in found:
            (out / f"{p.parent.name}.txt").write_bytes(p.read_bytes())
    else:
        from pydoc_data.topics import topics

        for name in sorted(topics)[:40]:
            (out / f"{name}.txt").write_text(topics[name], encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("datasheet")
    tiny = make_tiny_base(root, n_experts=1)
    return {**tiny, "data": _real_text(root), "expert": tiny["experts"]["a"]}


def agora(*args: str | Path) -> Any:
    return CliRunner().invoke(build_app(), [str(a) for a in args], env={"COLUMNS": "200"})


def generate(work: dict[str, Any], out: Path, *extra: str | Path, **flags: str) -> Any:
    human = [part for flag, value in flags.items() for part in (flag, value)]
    result = agora(
        "expert", "datasheet", "--base-dir", work["base"], "--data", work["data"],
        "--name", "Debian copyright files", "--license", "CC0-1.0", "--out", out,
        *human, *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


def check(work: dict[str, Any], weights: Path, datasheet: Path) -> tuple[int, dict[str, Any], str]:
    """`agora expert check`: exit code, its --json verdicts, and its text output."""
    args = ("expert", "check", "--base-dir", work["base"], weights, datasheet)
    as_json = agora(*args, "--json")
    text = agora(*args)
    assert as_json.exit_code == text.exit_code
    return as_json.exit_code, json.loads(as_json.stdout), text.stdout


@pytest.fixture(scope="module")
def sheets(work: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The datasheet with every human field given, one per field left out, and one with
    none given."""
    root = tmp_path_factory.mktemp("sheets")
    out: dict[str, Any] = {"filled": root / "filled.md"}
    out["filled_summary"] = generate(work, out["filled"], **FILLED)
    for flag in FILLED:
        path = root / f"without{flag}.md"
        generate(work, path, **{f: v for f, v in FILLED.items() if f != flag})
        out[flag] = path
    out["bare"] = root / "bare.md"
    out["bare_summary"] = generate(work, out["bare"])
    return out


# -- the registry app, on each database backend ----------------------------------------------


@pytest.fixture
def registry(database_url: str, tmp_path: Path, work: dict[str, Any]) -> Iterator[Any]:
    """A client of the real app holding the tiny base (uploaded as its three files), and
    ``submit(weights_bytes, datasheet_bytes)``."""
    from registry.app import create_app
    from registry.services.tokens import create_token
    from registry.settings import Settings

    app = create_app(Settings(data_dir=tmp_path / "agora", database_url=database_url))
    with TestClient(app) as client:
        with app.state.runtime.sessions() as session, session.begin():
            _, admin = create_token(session=session, name="admin", role="admin")
            _, alice = create_token(session=session, name="alice", role="contributor")
        base = work["base"]
        posted = client.post(
            "/v1/base-models",
            files={
                field: (name, (base / name).read_bytes())
                for field, name in [
                    ("config", "config.json"),
                    ("tokenizer", "tokenizer.json"),
                    ("weights", "model.safetensors"),
                ]
            },
            headers={"Authorization": f"Bearer {admin}"},
        )
        assert posted.status_code == 201, posted.text
        # The revision the bundle computes is the registry's.
        assert posted.json()["revision"] == work["revision"]

        def submit(weights: bytes, datasheet: bytes) -> Any:
            return client.post(
                "/v1/experts",
                files={
                    "weights": ("expert.safetensors", weights),
                    "datasheet": ("DATASHEET.md", datasheet),
                },
                data={"base_revision": work["revision"]},
                headers={"Authorization": f"Bearer {alice}"},
            )

        client.submit = submit  # type: ignore[attr-defined]
        yield client


def _one_line(stderr: str) -> str:
    """A usage error's text without the box rich draws around it."""
    return " ".join(stderr.replace("│", " ").split())


def _same_problem(verdict: dict[str, Any], response: Any) -> None:
    """`check`'s verdict on one file is the server's problem+json, field for field."""
    body = response.json()
    assert response.status_code == verdict["status"] == body["status"]
    for key in ("code", "detail", "errors"):
        assert verdict.get(key) == body.get(key), key


# -- tests ------------------------------------------------------------------------------------


def test_generated_datasheet_passes_check_and_the_registry(
    work: dict[str, Any], sheets: dict[str, Any], registry: Any
) -> None:
    code, verdicts, text = check(work, work["expert"], sheets["filled"])
    assert code == 0, text
    assert verdicts["ok"]
    assert verdicts["base_revision"] == work["revision"]
    assert text.startswith("ok weights ")
    assert "layers [0, 1], float32" in text
    assert "ok datasheet " in text
    assert "'Debian copyright files'" in text
    summary = sheets["filled_summary"]
    assert summary["unfilled"] == []
    assert verdicts["datasheet"]["token_count"] == summary["token_count"] > 1000

    datasheet = sheets["filled"].read_bytes()
    response = registry.submit(work["expert"].read_bytes(), datasheet)
    assert response.status_code == 201, response.text
    expert = registry.get(f"/v1/experts/{response.json()['id']}").json()
    assert expert["name"] == "Debian copyright files"
    assert expert["license"] == "CC0-1.0"
    assert expert["language"] == ", ".join(summary["language"])
    assert expert["domain"] == FILLED["--domain"]
    stored = registry.get(f"/v1/experts/{response.json()['id']}/datasheet")
    assert stored.content == datasheet  # accepted unchanged


def test_computed_fields_come_from_the_split_that_training_uses(
    work: dict[str, Any], sheets: dict[str, Any], tmp_path: Path
) -> None:
    from tokenizers import Tokenizer

    from modelcore.data.batches import token_stream
    from modelcore.data.userdata import passages, read_documents, split_documents
    from registry.validation import parse_datasheet

    docs, _ = read_documents([work["data"]])
    split = split_documents(docs, 0.1)
    tok = Tokenizer.from_file(str(work["base"] / "tokenizer.json"))
    train = [d.text for d in split.train]
    # What `agora expert train --data` reports as train tokens: the stream, less the
    # <|endoftext|> after each document.
    assert sheets["filled_summary"]["token_count"] == token_stream(tok, train).numel() - len(train)
    sheet = parse_datasheet(sheets["filled"].read_bytes())
    assert sheet.token_count == sheets["filled_summary"]["token_count"]
    assert sheet.language[0] == "en"
    held = passages(split.heldout)
    assert len(sheet.samples) >= 2
    assert all(s in held for s in sheet.samples)  # whole held-out passages, exact
    assert not any(s in t for s in sheet.samples for t in train)
    assert [s.name for s in sheet.sources] == [str(work["data"])]
    # The path as given, never resolved to an absolute path (it would publish the
    # contributor's home directory).
    assert sheet.sources[0].url is None

    # A smaller cap than the samples took: fewer whole passages, within it, the same bytes
    # on every run. (How many held-out bytes there are depends on this machine's
    # /usr/share/doc: a cap below the total, whatever it is.)
    cap = min(3000, sheet.samples_bytes - 1)
    small = [tmp_path / "a.md", tmp_path / "b.md"]
    for path in small:
        generate(work, path, "--max-samples-bytes", str(cap), **FILLED)
    assert small[0].read_bytes() == small[1].read_bytes()
    capped = parse_datasheet(small[0].read_bytes())
    assert 0 < capped.samples_bytes <= cap
    assert len(capped.samples) < len(sheet.samples)
    assert all(s in held for s in capped.samples)


def test_each_unfilled_field_is_refused_by_check_and_the_server(
    work: dict[str, Any], sheets: dict[str, Any], registry: Any
) -> None:
    weights = work["expert"].read_bytes()
    code, verdicts, text = check(work, work["expert"], sheets["bare"])
    assert code == 1
    assert sheets["bare_summary"]["unfilled"] == list(UNFILLED_PATH.values())
    paths = [e["path"] for e in verdicts["datasheet"]["errors"]]
    assert paths == list(UNFILLED_PATH.values())
    assert verdicts["weights"]["ok"]
    _same_problem(verdicts["datasheet"], registry.submit(weights, sheets["bare"].read_bytes()))
    assert "the registry would refuse this upload: 422 datasheet_unfilled" in text

    for flag, path in UNFILLED_PATH.items():
        code, verdicts, text = check(work, work["expert"], sheets[flag])
        assert code == 1, flag
        refused = verdicts["datasheet"]
        assert refused["code"] == "datasheet_unfilled"
        assert [e["path"] for e in refused["errors"]] == [path]
        # The message names the field and says what to write there.
        assert path in refused["detail"]
        assert f"  {path}: not filled in: " in text
        assert f"or regenerate with {flag}" in refused["errors"][0]["message"]
        _same_problem(refused, registry.submit(weights, sheets[flag].read_bytes()))

    # Filled in by hand, the same datasheet is accepted.
    contact = sheets["--contact"].read_text(encoding="utf-8")
    start = contact.index("contact: 'FILL IN:")
    end = contact.index("\n", contact.index("--contact)'", start))
    fixed = contact[:start] + "contact: mailto:someone@example.org" + contact[end:]
    assert registry.submit(weights, fixed.encode()).status_code == 201


def test_check_reports_a_broken_expert_with_the_servers_code(
    work: dict[str, Any], sheets: dict[str, Any], registry: Any, tmp_path: Path
) -> None:
    from registry.validation import validate_base_config

    config = validate_base_config((work["base"] / "config.json").read_bytes())
    schema = dict(config.raw)["expert_schema"]
    first = schema["tensors"][0]
    wrong_shape = make_expert_bytes(
        schema,
        base_revision=work["revision"],
        tensor_overrides={first["name"]: np.zeros([d + 1 for d in first["shape"]], np.float32)},
    )
    out_of_order = make_expert_bytes(
        schema, base_revision=work["revision"], metadata_overrides={"layers": "[1, 0]"}
    )
    one_layer_declared = make_expert_bytes(
        schema, base_revision=work["revision"], metadata_overrides={"layers": "[0]"}
    )
    layer_1 = next(t["name"] for t in schema["tensors"] if t["name"].startswith("layers.1."))
    for weights, code, where in [
        (wrong_shape, "tensor_shape_mismatch", first["name"]),
        (out_of_order, "metadata_invalid", "layers"),
        (one_layer_declared, "tensor_set_mismatch", layer_1),
    ]:
        path = tmp_path / f"{code}.safetensors"
        path.write_bytes(weights)
        exit_code, verdicts, text = check(work, path, sheets["filled"])
        assert exit_code == 1
        assert verdicts["datasheet"]["ok"]
        assert verdicts["weights"]["code"] == code
        assert f"weights {path}: {code}: " in text
        assert f"\n  {where}: " in text
        assert f"the registry would refuse this upload: 422 {code}" in text
        _same_problem(verdicts["weights"], registry.submit(weights, sheets["filled"].read_bytes()))


def test_bad_paths_and_flags_are_one_line_usage_errors(
    work: dict[str, Any], sheets: dict[str, Any], tmp_path: Path
) -> None:
    expert, sheet = work["expert"], sheets["filled"]
    not_a_bundle = tmp_path / "empty"
    not_a_bundle.mkdir()
    for args, says in [
        (["--base-dir", tmp_path / "nope", expert, sheet], "no such directory"),
        (["--base-dir", not_a_bundle, expert, sheet], "is not a base bundle: it lacks"),
        (["--base-dir", work["base"], tmp_path / "missing.safetensors", sheet], "does not"),
    ]:
        result = agora("expert", "check", *args)
        assert result.exit_code == 2, result.output
        assert says in _one_line(result.stderr)
        assert "Traceback" not in result.output + result.stderr

    # The old spelling of --base-dir still works, with a deprecation line.
    legacy = agora("expert", "check", "--base", work["base"], expert, sheet)
    assert legacy.exit_code == 0, legacy.output
    assert "`--base DIR` is deprecated; use `--base-dir DIR`" in legacy.stderr

    out = tmp_path / "ds.md"
    base = ["expert", "datasheet", "--base-dir", work["base"], "--data", work["data"]]
    named = [*base, "--name", "x", "--out", out]
    nowhere = [*base[:-1], tmp_path / "nothing", "--name", "x", "--out", out]
    for args, option, says in [
        ([*named, "--license", "not a license!"], "--license", "is not an SPDX license"),
        ([*named, "--license", "MIT", "--language", "english?"], "--language", "BCP-47"),
        ([*named, "--license", "MIT", "--heldout-share", "1.5"], "--heldout-share", "between"),
        ([*named, "--license", "MIT", "--contact", " "], "--contact", "non-blank"),
        ([*named, "--license", "MIT", "--base", work["base"]], "--base-dir", "only"),
        ([*nowhere, "--license", "MIT"], "--data", "no such file or directory"),
        ([*named, "--license", "MIT", "--out", sheet], "--out", "exists"),
    ]:
        result = agora(*args)
        assert result.exit_code == 2, (args, result.output)
        said = _one_line(result.stderr)
        assert option in said, said
        assert says in said, said
        assert "Traceback" not in result.output + result.stderr
    assert not out.exists()
