"""The container image (Dockerfile): what its final stage holds and runs, and its install and entrypoint steps run for
real outside the repository.

`make image` (scripts/image.sh) builds the image itself with buildah and checks the result, but takes minutes and a
builder, so the suite proves the same steps another way, in seconds: scripts/image-install.sh, the script the
Dockerfile's build stage runs, installs into a fresh prefix outside the repository (the dependencies taken from
.venv instead of PyPI, the one difference), and services are started through the installed entrypoint with the
Dockerfile's own run-time environment, against the real servers: the migrations apply, the ledger serves gRPC
health, the gateway serves its OpenAPI document from the installed descriptor set, and every other name reaches
its service's settings.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from dev import pgtools
from dev.mesh import free_port, wait_grpc_serving, wait_port
from tests.deploy.manifests import CHART_DIR, IMAGE_REPOSITORY, REPO_ROOT, Rendering, pod_spec, workloads

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
ENTRYPOINT = REPO_ROOT / "scripts" / "esp-service"
IMAGE_SCRIPT = REPO_ROOT / "scripts" / "image.sh"
IMAGE_PREFIX = "/opt/esp"
"""Where the Dockerfile installs ESP mesh; the test installs into a temporary directory instead."""
START_TIMEOUT_S = 60


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def stages() -> list[list[Instruction]]:
    """The Dockerfile's instructions, one list per ``FROM`` (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result: list[list[Instruction]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, arguments = line.partition(" ")
        if keyword.upper() == "FROM":
            result.append([])
        if result:
            result[-1].append(Instruction(keyword.upper(), arguments.strip()))
    return result


def final_stage() -> list[Instruction]:
    return stages()[-1]


def image_environment(prefix: Path) -> dict[str, str]:
    """The final stage's ``ENV``, with the image's install prefix moved to ``prefix``."""
    environment: dict[str, str] = {}
    for instruction in final_stage():
        if instruction.keyword == "ENV":
            for assignment in shlex.split(instruction.arguments):
                name, _, value = assignment.partition("=")
                environment[name] = value.replace(IMAGE_PREFIX, str(prefix))
    return environment


def entrypoint_names() -> set[str]:
    """The service names scripts/esp-service accepts (its ``NAMES``)."""
    match = re.search(r'^NAMES="([^"]+)"', ENTRYPOINT.read_text(), re.M)
    assert match, "scripts/esp-service: no NAMES"
    return set(match.group(1).split())


def test_the_image_is_built_in_stages_and_the_final_one_runs_as_a_numeric_non_root_user():
    all_stages = stages()
    assert len(all_stages) >= 2
    users = [i.arguments for i in final_stage() if i.keyword == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]), users
    assert users[-1].split(":")[0] == "10001", "the manifests' runAsUser"


def test_the_final_stage_has_no_healthcheck_and_runs_the_entrypoint():
    keywords = [i.keyword for stage in stages() for i in stage]
    assert "HEALTHCHECK" not in keywords
    [entrypoint] = [i.arguments for i in final_stage() if i.keyword == "ENTRYPOINT"]
    assert entrypoint == '["esp-service"]'


def test_the_final_stage_installs_only_the_python_runtime_and_copies_only_the_install():
    installs = " ".join(i.arguments for i in final_stage() if i.keyword == "RUN")
    packages = set(re.findall(r"apt-get install [^&]*", installs)[0].split()[2:]) - {"-y", "--no-install-recommends"}
    assert packages == {"python3", "ca-certificates"}
    copies = [i.arguments for i in final_stage() if i.keyword in ("COPY", "ADD")]
    assert copies == [f"--from=build {IMAGE_PREFIX} {IMAGE_PREFIX}"]


def test_the_final_stage_never_writes_bytecode_at_run_time():
    environment = image_environment(Path(IMAGE_PREFIX))
    assert environment["PYTHONDONTWRITEBYTECODE"] == "1"
    assert environment["HOME"] == "/tmp", "the one writable directory of a read-only root"
    assert environment["PATH"].startswith(f"{IMAGE_PREFIX}/venv/bin:{IMAGE_PREFIX}/bin:")


def test_the_build_context_leaves_out_everything_local_or_generated():
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line and not line.startswith("#")}
    assert {".git", ".venv", ".dev", "gen", "tests", "bench", "**/__pycache__", ".pytest_cache"} <= ignored
    copied = [
        source
        for instruction in stages()[0]
        if instruction.keyword == "COPY"
        for source in instruction.arguments.split()[:-1]
    ]
    assert copied and all((REPO_ROOT / source).exists() for source in copied)
    assert not set(copied) & ignored


def test_the_entrypoint_knows_every_service_and_the_migrations():
    services = {path.parent.name for path in (REPO_ROOT / "services").glob("*/__main__.py")}
    assert entrypoint_names() == services | {"migrate"}


def test_every_manifest_starts_a_name_the_entrypoint_knows(rendering: Rendering):
    commands = [pod_spec(workload)["containers"][0]["command"] for workload in workloads(rendering)]
    assert all(command[0] == "esp-service" and command[1] in entrypoint_names() for command in commands), commands


def test_make_image_tags_the_version_the_chart_and_the_prod_overlay_deploy(renderings: dict[str, Rendering]):
    """``make image`` tags the image with pyproject.toml's version, the tag a release deploys."""
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert 'tomllib.load(open("pyproject.toml", "rb"))["project"]["version"]' in IMAGE_SCRIPT.read_text()
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["appVersion"] == version
    for name in ("kustomize-prod", "helm-default"):
        images = {c["image"] for w in workloads(renderings[name]) for c in pod_spec(w)["containers"]}
        assert images == {f"{IMAGE_REPOSITORY}:{version}"}, name


@dataclass(frozen=True)
class Installed:
    prefix: Path
    environment: dict[str, str]

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(args), cwd=self.prefix, env={**self.environment, **(env or {})}, capture_output=True, text=True,
            timeout=timeout, check=False,
        )

    def start(self, name: str, env: dict[str, str], log: Path) -> subprocess.Popen:
        with log.open("wb") as out:
            return subprocess.Popen(
                ["esp-service", name], cwd=self.prefix, env={**self.environment, **env}, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )


def build_context_copy(destination: Path) -> Path:
    """What the build stage's ``COPY`` instructions put in its working directory, copied to ``destination``."""
    for instruction in stages()[0]:
        if instruction.keyword != "COPY":
            continue
        *sources, target = instruction.arguments.split()
        for source in sources:
            path = REPO_ROOT / source
            into = destination / target / path.name if target.endswith("/") else destination / target
            into.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, into, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(path, into)
    return destination


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """ESP mesh installed by scripts/image-install.sh, from a copy of the image's build context, into a fresh prefix;
    both outside the repository."""
    root = tmp_path_factory.mktemp("image")
    source = build_context_copy(root / "src")
    prefix = root / "opt-esp"
    base_python = Path(sys.executable).resolve()
    completed = subprocess.run(
        ["sh", str(source / "scripts" / "image-install.sh"), str(source), str(prefix)],
        env={
            **os.environ,
            "PYTHON": str(base_python),
            "ESP_IMAGE_DEPS_SITE": sysconfig.get_paths()["purelib"],
            "ESP_IMAGE_TOOLS": str(Path(sys.executable).parent),
        },
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    home = tmp_path_factory.mktemp("home")
    environment = {**image_environment(prefix), "HOME": str(home), "LANG": "C.UTF-8"}
    return Installed(prefix, environment)


def test_the_install_holds_the_generated_code_the_entrypoint_and_compiled_bytecode(installed: Installed):
    prefix = installed.prefix
    assert (prefix / "gen" / "esp.binpb").stat().st_size > 0
    assert list((prefix / "gen" / "esp").rglob("*_pb2_grpc.py"))
    assert list((prefix / "gen" / "esp").rglob("__pycache__/*.pyc"))
    assert os.access(prefix / "bin" / "esp-service", os.X_OK)
    purelib = installed.run("python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    site = Path(purelib.stdout.strip())
    assert list((site / "services").rglob("__pycache__/*.pyc"))
    assert not list(site.glob("pip")) and not list(site.glob("setuptools")), "no installer at run time"
    assert not list((prefix / "venv" / "bin").glob("pip*"))


def test_the_installed_code_is_the_install_and_not_the_repository(installed: Installed):
    completed = installed.run(
        "python", "-c", "import dev.migrate, esp.v1, services.ledger; print(services.ledger.__file__, esp.v1.__file__,"
        " dev.migrate.__file__)",
    )
    assert completed.returncode == 0, completed.stderr
    assert all(path.startswith(str(installed.prefix)) for path in completed.stdout.split()), completed.stdout


def test_the_entrypoint_refuses_a_name_it_does_not_know(installed: Installed):
    completed = installed.run("esp-service", "mailer")
    assert completed.returncode == 64
    assert "no service named 'mailer'" in completed.stderr


@pytest.mark.parametrize("name", sorted({"campaigns", "ingest", "reports", "router", "sender", "webhooks"}))
def test_each_service_name_starts_its_service_which_reads_its_settings(installed: Installed, name: str):
    """Up to its settings, which refuse a port that is not a number before anything connects anywhere."""
    completed = installed.run("esp-service", name, env={"ESP_GRPC_PORT": "not-a-port"})
    assert completed.returncode != 0
    assert "ESP_GRPC_PORT" in completed.stderr, completed.stderr[-2000:]


@pytest.fixture
def database(admin_dsn: str) -> Iterator[str]:
    name = pgtools.unique_database_name("image")
    yield pgtools.create_database(admin_dsn, name)
    pgtools.drop_database(admin_dsn, name)


def stop(process: subprocess.Popen) -> int:
    process.terminate()
    try:
        return process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def test_the_installed_migrations_apply_and_the_ledger_serves_grpc_health(
    installed: Installed, database: str, redis_url: str, nats_url: str, run_id: str, tmp_path: Path
):
    migrated = installed.run("esp-service", "migrate", env={"ESP_POSTGRES_DSN": database})
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert re.search(r"^[1-9]\d* migration\(s\) applied$", migrated.stdout, re.M), migrated.stdout

    port = free_port()
    ledger = installed.start(
        "ledger",
        {
            "ESP_POSTGRES_DSN": database, "ESP_REDIS_URL": redis_url, "ESP_NATS_URL": nats_url,
            "ESP_NAMESPACE": f"{run_id}-image", "ESP_GRPC_PORT": str(port),
        },
        tmp_path / "ledger.log",
    )
    try:
        wait_grpc_serving(port, START_TIMEOUT_S, ledger, "ledger")
    finally:
        code = stop(ledger)
    assert code == 0, (tmp_path / "ledger.log").read_text()[-3000:]


def test_the_installed_gateway_serves_the_api_from_the_installed_descriptor_set(installed: Installed, tmp_path: Path):
    port = free_port()
    gateway = installed.start(
        "gateway", {"ESP_GATEWAY_PORT": str(port), "ESP_INGEST_ADDR": f"127.0.0.1:{free_port()}"},
        tmp_path / "gateway.log",
    )
    try:
        wait_port(port, START_TIMEOUT_S, gateway, "gateway")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/openapi.json", timeout=10) as response:
            document = response.read().decode()
    finally:
        stop(gateway)
    assert '"/v1/messages' in document
