"""The `agora` command as a whole: what it needs installed, its panels, the old names, the
method choices (from the spec table), the one --weights parser, and the admin commands'
search for the registry's data."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from agora.cli import build_app
from agora.common import parse_weights
from agora.methods import BASE_PATH_METHODS, LOCAL_EVAL_METHODS
from registry.protocol import METHOD_SPECS, METHODS

ROOT = Path(__file__).resolve().parents[2]
# What the core install (httpx, pydantic, typer, rich) does not have.
HEAVY = [
    "torch",
    "modelcore",
    "worker",
    "fastapi",
    "starlette",
    "sqlalchemy",
    "uvicorn",
    "alembic",
    "pydantic_settings",
    "numpy",
    "boto3",
    "faiss",
]


def _core_only(*args: str) -> subprocess.CompletedProcess[str]:
    """`agora ARGS` in a process where every optional dependency fails to import."""
    code = (
        "import sys\n"
        f"for name in {HEAVY!r}: sys.modules[name] = None\n"
        f"sys.argv = ['agora', *{list(args)!r}]\n"
        "from agora.cli import main\n"
        "main()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "AGORA_CACHE_DIR": "/nonexistent"},
        check=False,
    )


@pytest.fixture
def no_bases_registry() -> Iterator[str]:
    """An HTTP server that answers like a registry with no base model yet."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"items": []}).encode()
            status = 200 if self.path.startswith("/v1/base-models") else 404
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_core_install_runs_help_and_registry_commands(no_bases_registry: str) -> None:
    helped = _core_only("--help")
    assert helped.returncode == 0, helped.stderr
    for panel in ("Registry", "Local", "Running a registry"):
        assert panel in helped.stdout
    # A registry command runs: it asks the registry for its bases (there are none).
    searched = _core_only("search", "some text", "--registry", no_bases_registry)
    assert searched.returncode == 2, searched.stdout + searched.stderr
    assert "no base model yet" in searched.stderr
    # Local and server commands name the extra to install.
    local = _core_only("local", "eval", "--base-dir", "bases/tiny")
    assert local.returncode == 2
    assert "pip install 'agora[model]'" in local.stderr
    trained = _core_only("expert", "train", "--base-dir", "b", "--domain", "d", "--out", "x")
    assert trained.returncode == 2
    assert "pip install 'agora[model]'" in trained.stderr
    for args in (["serve"], ["admin", "list-tokens"], ["db", "upgrade"]):
        refused = _core_only(*args)
        assert refused.returncode == 2, args
        assert "pip install 'agora[server]'" in refused.stderr, args


def test_building_the_cli_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from agora.cli import build_app\n"
        "build_app()\n"
        f"print(sorted(set({HEAVY!r}) & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert out.strip() == "[]"


def _commands(group: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every command under a (typer-built) group, by its path: ``local eval``."""
    for name, command in group.commands.items():
        path = f"{prefix} {name}".strip()
        if hasattr(command, "commands"):
            yield from _commands(command, path)
        else:
            yield path, command


def test_every_weights_option_takes_a_comma_list_or_repeats() -> None:
    root = typer.main.get_command(build_app())
    taking = {
        path: next(p for p in command.params if "--weights" in p.opts)
        for path, command in _commands(root)
        if any("--weights" in p.opts for p in command.params)
    }
    assert {"compose", "local eval", "local merge"} <= set(taking)
    assert all(option.multiple for option in taking.values()), taking
    assert parse_weights(["0.7,0.3"]) == parse_weights(["0.7", "0.3"]) == [0.7, 0.3]
    assert parse_weights(["3", "1,2"]) == [3.0, 1.0, 2.0]
    assert parse_weights(None) is None
    with pytest.raises(typer.BadParameter):
        parse_weights(["0.7,heavy"])


def test_local_directories_are_base_dir_and_registry_revisions_are_base() -> None:
    root = typer.main.get_command(build_app())
    for path, command in _commands(root):
        visible = {o for p in command.params if not getattr(p, "hidden", False) for o in p.opts}
        if path.startswith("local ") or path == "expert train":
            assert "--base-dir" in visible, path
            assert "--base" not in visible, path
        elif path in ("search", "compose", "expert submit", "expert init"):
            assert "--base" in visible, path
            base = next(p for p in command.params if "--base" in p.opts)
            assert not base.required, path  # the registry's only base is the default


def test_old_names_still_run_with_a_deprecation_line(tmp_path: Path) -> None:
    runner = CliRunner()
    app = build_app()
    missing = str(tmp_path / "no-such-base")
    old_eval = runner.invoke(app, ["eval", "--base", missing, "--json"])
    assert old_eval.exit_code == 2  # the bundle does not exist: refused after the notice
    assert "`agora eval` is deprecated; use `agora local eval`" in old_eval.stderr
    assert "`--base DIR` is deprecated; use `--base-dir DIR`" in old_eval.stderr
    assert old_eval.stdout == ""
    extra = {"merge": ["--out", "x"], "distill": ["--domain", "d", "--out", "x"], "matrix": []}
    for name, args in extra.items():
        moved = runner.invoke(app, ["expert", name, "--base-dir", missing, *args])
        assert moved.exit_code == 2
        assert f"`agora expert {name}` is deprecated; use `agora local {name}`" in moved.stderr
    new = runner.invoke(app, ["local", "eval", "--base-dir", missing])
    assert new.exit_code == 2
    assert "deprecated" not in new.stderr
    # Hidden from the help, still accepted.
    root_help = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).stdout
    assert " eval " not in root_help
    expert_help = runner.invoke(app, ["expert", "--help"], env={"COLUMNS": "200"}).stdout
    assert "merge" not in expert_help
    assert "train" in expert_help


def test_method_choices_are_the_spec_table() -> None:
    runner = CliRunner()
    app = build_app()
    env = {"COLUMNS": "300"}
    compose_help = runner.invoke(app, ["compose", "--help"], env=env).stdout
    assert f"One of {', '.join(METHODS)}." in compose_help
    local_help = runner.invoke(app, ["local", "eval", "--help"], env=env).stdout
    assert " | ".join(LOCAL_EVAL_METHODS) in local_help
    assert set(LOCAL_EVAL_METHODS) < set(METHODS)
    assert tuple(n for n, s in METHOD_SPECS.items() if s.has_base_path) == BASE_PATH_METHODS


def test_no_method_name_is_written_in_the_cli() -> None:
    """Method names come from registry.protocol; agora/ never spells one as a literal."""
    found = []
    for path in sorted((ROOT / "agora").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in METHOD_SPECS:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert found == []


def test_admin_commands_refuse_where_there_is_no_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from registry.app import build_runtime
    from registry.metrics import Metrics
    from registry.settings import Settings

    for name in ("AGORA_DATA_DIR", "AGORA_DATABASE_URL", "AGORA_STORAGE_URL"):
        monkeypatch.delenv(name, raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    runner = CliRunner()
    args = ["admin", "create-token", "--role", "admin", "--name", "me"]
    refused = runner.invoke(build_app(), args, env={"COLUMNS": "300"})
    assert refused.exit_code == 2
    assert f"no registry data in {elsewhere / '.agora'}" in refused.stderr
    assert "AGORA_DATA_DIR" in refused.stderr
    assert not (elsewhere / ".agora").exists()  # nothing created behind the user's back
    for other in (["admin", "list-tokens"], ["admin", "gc"], ["db", "upgrade"]):
        assert runner.invoke(build_app(), other).exit_code == 2, other
    assert not (elsewhere / ".agora").exists()

    # The server's data, as `agora serve` left it in its own directory.
    data = tmp_path / "server" / ".agora"
    build_runtime(Settings(data_dir=data), Metrics()).engine.dispose()
    made = runner.invoke(build_app(), [*args, "--data-dir", str(data)])
    assert made.exit_code == 0, made.output
    listed = runner.invoke(build_app(), ["admin", "list-tokens"], env={"AGORA_DATA_DIR": str(data)})
    assert listed.exit_code == 0, listed.output
    assert "\tadmin\tme\t" in listed.stdout
    missing = runner.invoke(
        build_app(), ["admin", "list-tokens", "--data-dir", str(tmp_path / "typo")]
    )
    assert missing.exit_code == 2
    assert "(from --data-dir)" in missing.stderr
