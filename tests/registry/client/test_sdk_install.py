"""``pip install agora`` without extras gives a working SDK, and the SDK imports nothing of
the server, the worker, the CLI or the model.

The first test builds the project's wheel, installs it into a fresh venv (no system site
packages) so pip resolves only ``[project].dependencies``, and uses the SDK there. The
second runs in this venv, where every extra is installed, so an import the SDK should not
make would succeed and show up in ``sys.modules``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

# Imported by nothing the SDK loads: the server's stack, the model's, the CLI's. (Not
# rich: httpx imports its own command line, which uses rich, whenever rich is installed.)
FORBIDDEN = (
    "fastapi",
    "starlette",
    "uvicorn",
    "sqlalchemy",
    "alembic",
    "boto3",
    "faiss",
    "numpy",
    "torch",
    "safetensors",
    "tokenizers",
    "yaml",
    "typer",
    "modelcore",
    "worker",
    "agora",
    "migrations",
)

# Run by the interpreter under test: import the SDK, use it against an in-process fake
# registry, and report what got imported.
PROBE = textwrap.dedent(
    """
    import json, sys

    import httpx

    from registry.client import Agora, NotFound
    from registry.client.composed import ModelDependenciesMissing

    REV = "ab" * 32
    FILE = {"digest": "sha256:" + "0" * 64, "size": 1}

    def registry(request):
        if request.url.path == "/v1/base-models":
            base = {"revision": REV, "files": {"config": FILE, "tokenizer": FILE, "weights": FILE}}
            return httpx.Response(200, json={"items": [base]})
        body = {"status": 404, "code": "expert_not_found", "detail": "no such expert"}
        return httpx.Response(404, json=body, headers={"Content-Type": "application/problem+json"})

    with Agora("http://registry.test", transport=httpx.MockTransport(registry),
               cache_dir=sys.argv[1]) as agora:
        revisions = [b.revision for b in agora.bases.list()]
        try:
            agora.get_expert("ex_nope")
            not_found = None
        except NotFound as err:
            not_found = err.code
        modules = sorted(sys.modules)
        model_error = None
        if sys.argv[2:] == ["--load"]:
            try:
                agora.load_composed("cmp_01")
            except ModelDependenciesMissing as err:
                model_error = err.detail
    print(json.dumps({
        "modules": modules,
        "revisions": revisions,
        "not_found": not_found,
        "model_error": model_error,
    }))
    """
)


def _probe(python: str, cache: Path, *args: str) -> dict[str, object]:
    out = subprocess.run(
        [python, "-c", PROBE, str(cache), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _first_party_outside_sdk(modules: object) -> list[str]:
    assert isinstance(modules, list)
    sdk = ("registry.client", "registry.protocol")
    return [
        m
        for m in modules
        if m.split(".")[0] in {"registry", "worker", "modelcore", "agora", "migrations"}
        and m != "registry"
        and not any(m == p or m.startswith(p + ".") for p in sdk)
    ]


def _forbidden(modules: object) -> list[str]:
    assert isinstance(modules, list)
    return sorted({m.split(".")[0] for m in modules} & set(FORBIDDEN))


def test_the_sdk_loads_only_itself_and_the_contracts_where_everything_is_installed(
    tmp_path: Path,
) -> None:
    found = _probe(sys.executable, tmp_path / "cache")
    assert _forbidden(found["modules"]) == []
    assert _first_party_outside_sdk(found["modules"]) == []
    assert found["revisions"] == ["ab" * 32]
    assert found["not_found"] == "expert_not_found"


def _wheel(tmp_path: Path) -> Path:
    """The project's wheel, built from a copy of the sources (the build writes build/ and
    *.egg-info next to them)."""
    keep = {"pyproject.toml", "README.md", "agora", "registry", "worker", "modelcore", "migrations"}
    src = tmp_path / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in keep:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=skip)
        else:
            shutil.copy2(path, src / name)
    dist = tmp_path / "dist"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(dist),
            "--quiet",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("agora-*.whl")
    return wheel


@pytest.mark.slow
def test_pip_install_without_extras_gives_a_working_sdk(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=False, with_pip=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", str(wheel)],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr
    listed = subprocess.run(
        [python, "-m", "pip", "list", "--format=json"], check=True, capture_output=True, text=True
    )
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    # Only the core dependencies came with it: no extra was pulled in.
    assert {"httpx", "pydantic"} <= installed
    assert not installed & {"torch", "fastapi", "sqlalchemy", "numpy", "boto3", "safetensors"}

    found = _probe(python, tmp_path / "cache", "--load")
    assert found["revisions"] == ["ab" * 32]
    assert found["not_found"] == "expert_not_found"
    assert _forbidden(found["modules"]) == []
    assert _first_party_outside_sdk(found["modules"]) == []
    # Running a composition needs the model extra, and says so before downloading.
    assert isinstance(found["model_error"], str)
    assert "pip install 'agora[model]'" in found["model_error"]
