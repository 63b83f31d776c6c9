"""docker-compose.yml as `docker compose` reads it, with .env.example as the operator's .env.

The file is resolved by Debian's docker-compose 1.29 (`docker-compose config`: anchors
merged, variables interpolated, no Docker engine needed; `make compose-tool` installs it,
and `make test` always does). Its `config` lists every service, profiled ones included.
Checked: pinned images, a healthcheck on every long-running service, the one-shots the
registry waits for, every AGORA_* variable against what the code reads, no secret in the
file, every variable documented in .env.example, and the Dockerfiles' torch builds.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from registry.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
REGISTRY_DOCKERFILE = ROOT / "docker" / "registry.Dockerfile"
WORKER_DOCKERFILE = ROOT / "docker" / "worker.Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
INSTALL_HINT = (
    "docker-compose is not installed: run `make compose-tool` "
    "(apt-get install -y -q --no-install-recommends docker-compose)"
)
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# The packages whose code reads AGORA_* variables besides the registry's Settings: the
# command line, the worker, the SDK (registry/client) and modelcore's native kernels.
CODE_DIRS = ("agora", "worker", "registry", "modelcore")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|KEY|TOKEN")
# ${VAR}, ${VAR:-default}, ${VAR:?message}; `$$` is a literal dollar for the container.
REFERENCE = re.compile(r"(?<!\$)\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def run_compose(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail(INSTALL_HINT)
    # Only PATH from this shell: a POSTGRES_PASSWORD exported here must not stand in for
    # one missing from the env file.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    return subprocess.run(
        [exe, "--env-file", str(env_file), "-f", str(COMPOSE), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    done = run_compose(ENV_EXAMPLE, "config")
    assert done.returncode == 0, done.stderr
    loaded: dict[str, Any] = yaml.safe_load(done.stdout)
    return loaded


@pytest.fixture(scope="module")
def services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = config["services"]
    return found


def one_shots(services: dict[str, dict[str, Any]]) -> set[str]:
    """Services another one waits for to exit 0: they run once, then stop."""
    return {
        name
        for service in services.values()
        for name, dependency in (service.get("depends_on") or {}).items()
        if dependency.get("condition") == "service_completed_successfully"
    }


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment as a mapping"
    return {str(k): str(v) for k, v in env.items()}


def raw_compose() -> dict[str, Any]:
    """The file as written (anchors merged by YAML, nothing interpolated)."""
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


# -- what the code reads ----------------------------------------------------------------


def _module_strings(tree: ast.Module) -> dict[str, str]:
    """Module-level NAME = "string" assignments (DISTRIBUTIONS_ENV = "AGORA_...")."""
    names: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name) and isinstance(node.value.value, str):
                    names[target.id] = node.value.value
    return names


def _is_environ(node: ast.expr) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ"
    )


def variables_read_in(path: Path) -> set[str]:
    """AGORA_* names a file reads: os.environ.get/os.getenv/os.environ[...] of a string (or
    a module constant holding one), and typer options' envvar=."""
    tree = ast.parse(path.read_text(), filename=str(path))
    constants = _module_strings(tree)

    def value(node: ast.expr | None) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name):
            return constants.get(node.id)
        return None

    found: set[str | None] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            reads_env = isinstance(func, ast.Attribute) and (
                (func.attr == "get" and _is_environ(func.value)) or func.attr == "getenv"
            )
            if reads_env and node.args:
                found.add(value(node.args[0]))
            found.update(value(k.value) for k in node.keywords if k.arg == "envvar")
        elif isinstance(node, ast.Subscript) and _is_environ(node.value):
            found.add(value(node.slice))
    return {name for name in found if name and name.startswith("AGORA_")}


def variables_read_by_code() -> dict[str, Path]:
    """Every AGORA_* variable read outside Settings, with a file that reads it."""
    readers: dict[str, Path] = {}
    for directory in CODE_DIRS:
        for path in sorted((ROOT / directory).rglob("*.py")):
            for name in variables_read_in(path):
                readers.setdefault(name, path.relative_to(ROOT))
    return readers


def settings_variables() -> set[str]:
    prefix = Settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def unknown_agora_variables(env: dict[str, str]) -> set[str]:
    known = settings_variables() | set(variables_read_by_code())
    return {name for name in env if name.startswith("AGORA_") and name not in known}


def test_the_variable_scan_finds_what_the_worker_and_the_sdk_read() -> None:
    readers = variables_read_by_code()
    assert readers["AGORA_REGISTRY_URL"].parts[0] == "agora"  # typer envvar=
    assert readers["AGORA_TOKEN"].parts[0] == "agora"
    assert readers["AGORA_CACHE_DIR"] == Path("registry/client/cache.py")  # os.environ.get
    assert readers["AGORA_NATIVE_CACHE"] == Path("modelcore/native/__init__.py")
    # Through a module constant (DISTRIBUTIONS_ENV = "AGORA_CORPUS_DISTRIBUTIONS").
    assert readers["AGORA_CORPUS_DISTRIBUTIONS"] == Path("modelcore/data/sources.py")
    assert unknown_agora_variables({"AGORA_DEVICE": "cuda", "AGORA_EMBEDDER": "minilm"}) == {
        "AGORA_DEVICE"
    }


# -- the resolved file --------------------------------------------------------------------


def test_the_example_env_gives_a_valid_file_with_every_service(services) -> None:
    assert set(services) == {
        "postgres",
        "minio",
        "minio-init",
        "migrate",
        "registry",
        "worker-token",
        "worker",
        "worker-cpu",
    }


def test_pulled_images_are_pinned_to_exact_releases(services) -> None:
    pulled = {name: s["image"] for name, s in services.items() if "build" not in s}
    assert set(pulled) == {"postgres", "minio", "minio-init"}
    for name, image in pulled.items():
        reference, _, digest = image.partition("@")
        repository, _, tag = reference.rpartition(":")
        assert repository, f"{name}: {image} has no tag"
        assert "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest", f"{name}: {image}"
        if digest:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{name}: {image}"
        # An exact release: a minor version at least (16.9-bookworm), or MinIO's dated one.
        assert re.match(r"\d+\.\d+", tag) or re.fullmatch(
            r"RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", tag
        ), f"{name}: {image} is not an exact release"
    assert services["postgres"]["image"].startswith("postgres:16.")
    for dockerfile in (REGISTRY_DOCKERFILE, WORKER_DOCKERFILE):
        bases = re.findall(r"^FROM\s+(\S+)", dockerfile.read_text(), flags=re.MULTILINE)
        assert bases, dockerfile
        for base in bases:
            assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), f"{dockerfile}: {base}"


def test_every_long_running_service_has_a_healthcheck_and_restarts(services) -> None:
    runs_once = one_shots(services)
    assert runs_once == {"minio-init", "migrate", "worker-token"}
    for name, service in services.items():
        if name in runs_once:
            # A restart policy would run it again and again: it must exit and stay down.
            assert "restart" not in service, name
            assert "healthcheck" not in service, name
            continue
        test = service.get("healthcheck", {}).get("test")
        assert test, f"{name} has no healthcheck"
        assert test[0] in {"CMD", "CMD-SHELL"}, f"{name}: {test}"
        assert service.get("restart") == "unless-stopped", name


def test_the_registry_starts_after_its_one_shots(services) -> None:
    registry = services["registry"]
    assert registry["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "minio-init": {"condition": "service_completed_successfully"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    assert services["migrate"]["command"] == ["agora", "db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # Only the one-shot migrates: the serving process never does.
    assert "upgrade" not in " ".join(registry["command"])
    assert environment(registry)["AGORA_AUTO_MIGRATE"] == "false"
    assert services["migrate"]["image"] == registry["image"]
    assert services["migrate"]["build"] == registry["build"]
    assert services["worker-token"]["depends_on"]["registry"]["condition"] == "service_healthy"
    for worker in ("worker", "worker-cpu"):
        assert services[worker]["depends_on"] == {
            "worker-token": {"condition": "service_completed_successfully"}
        }


def test_every_agora_variable_is_a_setting_or_read_by_the_code(services) -> None:
    for name, service in services.items():
        unknown = unknown_agora_variables(environment(service))
        assert not unknown, f"{name} sets {sorted(unknown)}, which nothing reads"


def test_the_registry_environment_is_a_postgres_and_s3_registry(services, monkeypatch) -> None:
    env = environment(services["registry"])
    for name in list(os.environ):
        if name.startswith("AGORA_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    required = {
        f"AGORA_{name}".upper()
        for name, field in Settings.model_fields.items()
        if field.is_required()
    }
    assert required <= set(env), f"settings without a default left unset: {required - set(env)}"
    settings = Settings()  # validates every AGORA_* value the file sets
    assert settings.resolved_database_url.startswith("postgresql+psycopg://agora:")
    assert settings.resolved_database_url.endswith("@postgres:5432/agora")
    assert settings.resolved_storage_url == "s3://agora-blobs"
    assert settings.s3_endpoint_url == "http://minio:9000"
    assert settings.embedder == "minilm"
    assert not settings.should_auto_migrate
    assert not settings.should_run_embedded_worker
    # The registry signs S3 requests with its own MinIO user, never MinIO's root.
    values = env_example()
    assert env["AWS_ACCESS_KEY_ID"] == values["S3_ACCESS_KEY_ID"]
    assert env["AWS_ACCESS_KEY_ID"] != values["MINIO_ROOT_USER"]
    assert values["MINIO_ROOT_PASSWORD"] not in env.values()
    # migrate and worker-token see the same database and bucket as the server.
    for name in ("migrate", "worker-token"):
        assert environment(services[name]) == env, name


def test_workers_hold_no_database_or_storage_credentials(services) -> None:
    for name in ("worker", "worker-cpu"):
        env = environment(services[name])
        assert env["AGORA_REGISTRY_URL"] == "http://registry:8000"
        leaked = [k for k in env if re.search(r"DATABASE|STORAGE|S3|AWS|MINIO|POSTGRES", k)]
        assert not leaked, f"{name}: {leaked}"
        # The worker token comes from the one-shot's volume, read-only.
        assert "worker-tokens:/tokens:ro" in services[name]["volumes"]


def test_the_gpu_worker_reserves_gpus_and_the_cpu_one_is_a_profile(services) -> None:
    gpu, cpu = services["worker"], services["worker-cpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    ]
    assert "--device cuda" in " ".join(gpu["entrypoint"])
    assert "profiles" not in gpu
    assert cpu["profiles"] == ["cpu"]
    assert "deploy" not in cpu
    assert "--device cpu" in " ".join(cpu["entrypoint"])
    # The CPU worker never pulls CUDA wheels; the GPU one gets PyPI's CUDA build.
    assert cpu["build"]["args"]["TORCH_INDEX"] == CPU_INDEX
    assert gpu["build"]["args"]["TORCH_INDEX"] != CPU_INDEX
    for worker in (gpu, cpu):
        assert worker["stop_signal"] == "SIGTERM"
        assert worker["build"]["dockerfile"] == "docker/worker.Dockerfile"


def test_the_worker_token_is_trusted_and_kept_private(services) -> None:
    script = " ".join(services["worker-token"]["entrypoint"])
    # All compose workers share this token: untrusted, their outputs could never be
    # checked by a different one.
    assert "create-token --role worker --trusted" in script
    assert "umask 077" in script
    assert "test -n" in script  # a failed create-token leaves no empty token behind


def test_volumes_are_named(config, services) -> None:
    named = set(config["volumes"])
    assert {"postgres-data", "minio-data", "registry-staging", "worker-tokens"} <= named
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("/"):
                # Bind mounts: only the repository's own scripts, read-only.
                assert source.startswith(str(ROOT / "docker")), f"{name}: {volume}"
                assert volume.endswith(":ro"), f"{name}: {volume}"
            else:
                assert source in named, f"{name}: {volume}"


# -- secrets and .env.example -------------------------------------------------------------


def referenced_variables() -> dict[str, str]:
    """Every ${VAR...} in docker-compose.yml, with its operator (':?', ':-' or '')."""
    return {m[1]: m[2] or "" for m in REFERENCE.finditer(COMPOSE.read_text())}


def test_no_secret_is_written_in_the_file() -> None:
    text = COMPOSE.read_text()
    raw = raw_compose()
    secret_values = 0
    for name, service in raw["services"].items():
        for key, written in (service.get("environment") or {}).items():
            value = str(written)
            if SECRET_NAME.search(key):
                secret_values += 1
                match = REFERENCE.fullmatch(value)
                assert match, f"{name}: {key} is not a ${{...}} reference"
                assert match[2] == ":?", f"{name}: {key} is not required (${{{key}:?...}})"
            for userinfo in re.findall(r"://[^/@\s]*:([^/@\s]+)@", value):
                assert REFERENCE.fullmatch(userinfo), f"{name}: {key} has a password in it"
    assert secret_values >= 8
    for secret in {v for k, v in env_example().items() if SECRET_NAME.search(k)}:
        assert secret not in text


@pytest.mark.parametrize(
    "variable",
    sorted(name for name, op in referenced_variables().items() if op == ":?"),
)
def test_a_missing_secret_stops_compose_naming_the_env_example(variable, tmp_path) -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    kept = [line for line in lines if not line.startswith(f"{variable}=")]
    assert len(kept) == len(lines) - 1, f"{variable} is not set in .env.example"
    env_file = tmp_path / ".env"
    env_file.write_text("\n".join(kept) + "\n")
    done = run_compose(env_file, "config")
    assert done.returncode != 0
    assert f"set {variable} in .env (see .env.example)" in done.stderr


def test_every_secret_is_required() -> None:
    references = referenced_variables()
    secrets = {name for name in references if SECRET_NAME.search(name) or "USER" in name}
    assert secrets == {
        "POSTGRES_PASSWORD",
        "MINIO_ROOT_USER",
        "MINIO_ROOT_PASSWORD",
        "S3_ACCESS_KEY_ID",
        "S3_SECRET_ACCESS_KEY",
    }
    assert {references[name] for name in secrets} == {":?"}


def test_env_example_documents_every_variable_the_file_reads() -> None:
    documented: dict[str, bool] = {}
    paragraph_has_comment = False
    for line in ENV_EXAMPLE.read_text().splitlines():
        if not line.strip():
            paragraph_has_comment = False
        elif line.startswith("#"):
            paragraph_has_comment = True
        else:
            documented[line.partition("=")[0]] = paragraph_has_comment
    # COMPOSE_PROJECT_NAME is read by compose itself (docker-compose.yml has no `name:`).
    expected = set(referenced_variables()) | {"COMPOSE_PROJECT_NAME"}
    assert set(documented) == expected
    undocumented = [name for name, commented in documented.items() if not commented]
    assert not undocumented, f"no comment above {undocumented} in .env.example"
    for name, value in env_example().items():
        if SECRET_NAME.search(name) or "USER" in name:
            assert value.startswith("change-me"), f"{name}: not an obvious placeholder"


# -- images --------------------------------------------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, f"{dockerfile} ends in a continuation"
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def pip_installs(dockerfile: Path) -> list[str]:
    return [args for op, args in instructions(dockerfile) if op == "RUN" and "pip install" in args]


def makefile_torch() -> str:
    match = re.search(r"^TORCH\s*\?=\s*torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert match, "the Makefile pins torch"
    return match[1]


def test_the_registry_image_installs_cpu_torch_before_anything_else() -> None:
    steps = instructions(REGISTRY_DOCKERFILE)
    installs = pip_installs(REGISTRY_DOCKERFILE)
    assert len(installs) >= 2
    first, project = installs[0], installs[-1]
    assert f"--index-url {CPU_INDEX} " in first
    assert '"torch==${TORCH_VERSION}"' in first
    assert ("ARG", f"TORCH_VERSION={makefile_torch()}") in steps
    # The installed build becomes a constraint, and nothing can swap it for a CUDA wheel.
    assert "'.[server,embed]'" in project
    assert "-c /etc/pip-torch.txt" in project
    assert "-c constraints.txt" in project
    assert ("ENV", "PIP_CONSTRAINT=/etc/pip-torch.txt") in steps
    assert "grep -q '+cpu$' /etc/pip-torch.txt" in first
    assert "assert not torch.version.cuda" in project
    # The embedder is loaded once at build: an image without it does not build (at run
    # time AGORA_EMBEDDER=minilm would fall back to hashing with only a warning).
    assert "MiniLMEmbedder().embed(" in project


def test_the_worker_image_installs_the_chosen_torch_first() -> None:
    steps = instructions(WORKER_DOCKERFILE)
    installs = pip_installs(WORKER_DOCKERFILE)
    first, project = installs[0], installs[-1]
    assert '--index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"' in first
    assert ("ARG", f"TORCH_VERSION={makefile_torch()}") in steps
    assert ("ARG", f"TORCH_INDEX={CPU_INDEX}") in steps  # the default never pulls CUDA
    assert "'.[model]'" in project
    assert "-c /etc/pip-torch.txt" in project
    # gcc for modelcore.native, before the Python packages.
    apt = next(i for i, (op, a) in enumerate(steps) if op == "RUN" and "apt-get install" in a)
    assert "gcc" in steps[apt][1]
    assert "--no-install-recommends" in steps[apt][1]
    assert apt < next(i for i, step in enumerate(steps) if step == ("RUN", first))


def test_images_run_as_an_unprivileged_user() -> None:
    for dockerfile in (REGISTRY_DOCKERFILE, WORKER_DOCKERFILE):
        users = [args for op, args in instructions(dockerfile) if op == "USER"]
        assert users == ["agora"], dockerfile
        assert "--uid 10001" in dockerfile.read_text()


def test_the_build_context_holds_only_what_the_images_copy() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "everything is left out first"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for dockerfile in (REGISTRY_DOCKERFILE, WORKER_DOCKERFILE):
        for op, args in instructions(dockerfile):
            if op == "COPY":
                *sources, _ = args.split()
                for source in sources:
                    assert source in allowed, f"{dockerfile.name} copies {source}, left out"
    for private in (".env", ".git", ".venv", ".agora", "tests", "docs"):
        assert private not in allowed


def test_the_readme_deployment_commands_name_real_services_and_profiles(services) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Deployment\n") :]
    section = section[: section.index("\n## ", 1)]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert block, "README.md's Deployment section shows the docker compose commands"
    commands = [line.split("#")[0].strip() for line in block[1].splitlines()]
    assert "cp .env.example .env && chmod 600 .env" in commands
    assert "docker compose up -d --build" in commands
    token = "docker compose exec registry agora admin create-token --role admin --name ops"
    assert token in commands
    scaled = [c for c in commands if "--scale" in c]
    assert len(scaled) >= 2
    for command in scaled:
        for name in re.findall(r"--scale ([\w-]+)=\d+", command):
            assert name in services, command
            for profile in services[name].get("profiles", []):
                assert f"--profile {profile}" in command, command
