"""The deployment files parse, agree with each other and with the code, and reference paths that
exist: Dockerfiles, .dockerignore, entry point and health check, docker-compose.yml (+ the GPU
override and the Prometheus config), the nginx template and its renderer, the k8s manifests.
"""

from __future__ import annotations

import http.server
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import yaml

from csist import replay
from service.runtime.config import Settings
from tests.docker.support import (
    DOCKER,
    REPO,
    SYSTEM_COMMANDS,
    DockerIgnore,
    base_image,
    buildkit_only_syntax,
    env_pairs,
    is_python_step,
    parse_dockerfile,
    run_commands,
    stage_name,
    stages,
)

CPU = parse_dockerfile(DOCKER / "Dockerfile")
GPU = parse_dockerfile(DOCKER / "Dockerfile.gpu")
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
COMPOSE_GPU = yaml.safe_load((DOCKER / "compose.gpu.yml").read_text())
# Variables the image itself reads (entry point, health check) besides the service's settings.
IMAGE_VARIABLES = {"CSIST_HOST", "CSIST_PORT", "CSIST_HEALTHCHECK_TIMEOUT_S"}


def load_script(name: str):
    """A script of docker/ as a module (docker/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, DOCKER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def setting_variables() -> set[str]:
    return {f"CSIST_{name.upper()}" for name in Settings.model_fields}


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR}`` with an empty environment, ``$$`` -> ``$``."""
    value = re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)
    return value.replace("$$", "$")


def image_env(instructions) -> dict[str, str]:
    env = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            env.update(env_pairs(ins))
    return env


def of(instructions, keyword: str):
    return [ins for ins in instructions if ins.keyword == keyword]


def copies(instructions) -> list[tuple[str, ...]]:
    """COPY sources and destination from the build context (not from another stage)."""
    return [tuple(shlex.split(ins.body)) for ins in of(instructions, "COPY") if "from" not in ins.flags]


def final_stage(instructions):
    return stages(instructions)[-1]


# ------------------------------------------------------------------------------ requirements


def test_image_requirements_are_pyprojects_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = load_script("requirements")
    cpu = reqs.requirements(REPO / "pyproject.toml")
    gpu = reqs.requirements(REPO / "pyproject.toml", gpu=True)
    assert cpu == project["dependencies"]
    names = {reqs.requirement_name(r) for r in cpu}
    assert "onnxruntime" in names and not names & {"torch", "torchvision", "onnxruntime-gpu"}
    gpu_names = [reqs.requirement_name(r) for r in gpu]
    assert "onnxruntime-gpu" in gpu_names and "onnxruntime" not in gpu_names
    assert set(gpu_names) == (names - {"onnxruntime"}) | {"onnxruntime-gpu"}
    assert reqs.requirement_name("Foo_Bar.baz[extra]>=1") == "foo-bar-baz"
    # the command line the Dockerfiles run prints one requirement per line
    out = subprocess.run(
        [sys.executable, "docker/requirements.py", "--gpu", "pyproject.toml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.splitlines() == gpu


# ------------------------------------------------------------------------------ Dockerfiles


def test_cpu_dockerfile_layout():
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base_image(CPU))
    env = image_env(CPU)
    assert env["CSIST_MODEL_PATH"] == "/app/models/derefnet"
    assert ("models/", "models/") in copies(CPU)  # the bundled model, into WORKDIR /app
    assert of(CPU, "WORKDIR")[-1].body == "/app"
    assert not {k for k in env if k.startswith("CSIST_")} - setting_variables() - IMAGE_VARIABLES
    # a non-root user, by number (Kubernetes' runAsNonRoot can only check numbers)
    user = of(CPU, "USER")[-1].body
    assert re.fullmatch(r"\d+:\d+", user) and not user.startswith("0:")
    assert of(CPU, "EXPOSE")[-1].body == env["CSIST_PORT"] == "8000"
    (health,) = of(CPU, "HEALTHCHECK")
    assert health.body.startswith("CMD ") and "/healthz" in health.body
    assert ["csist-entrypoint"] == of(CPU, "ENTRYPOINT")[-1].exec_form()
    dests = {c[1] for c in copies(CPU)}
    scripts = {"/usr/local/bin/csist-entrypoint", "/usr/local/bin/csist-healthcheck"}
    assert scripts <= dests
    # executable whatever the checkout's file modes (COPY --chmod is BuildKit-only)
    chmod = [r for r in run_commands(final_stage(CPU)) if r.startswith("chmod 0755 ")]
    assert chmod and scripts <= set(chmod[0].split("&&")[0].split()[2:])


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_build_with_the_classic_builder_too(name):
    assert buildkit_only_syntax(DOCKER / name) == []


def test_buildkit_only_syntax_is_recognised(tmp_path):
    path = tmp_path / "Dockerfile"
    path.write_text(
        "# syntax=docker/dockerfile:1\nFROM x\nRUN --mount=type=cache,target=/c pip install .\n"
        "COPY --chmod=0755 a /b\nCOPY --link c /d\nRUN <<EOF\necho hi\nEOF\n"
    )
    found = buildkit_only_syntax(path)
    assert found[0].startswith("parser directive")
    assert {"RUN --mount", "COPY --chmod", "COPY --link", "a heredoc (<<)"} <= set(found)
    path.write_text("FROM x AS build\nRUN pip install .\nFROM x\nCOPY --from=build --chown=1:1 /a /a\n")
    assert buildkit_only_syntax(path) == []


@pytest.mark.parametrize("instructions", [CPU, GPU], ids=["cpu", "gpu"])
def test_multi_stage_leaves_the_compiler_in_the_build_stage(instructions):
    build, image = stages(instructions)
    assert stage_name(build) == "build" and stage_name(image) is None
    assert build[0].body.split()[0] == image[0].body.split()[0]  # the same base: venv links hold
    compiler = re.compile(r"\b(gcc|g\+\+|build-essential|libc6-dev|python3\.11-dev)\b")
    assert any(compiler.search(r) for r in run_commands(build))
    assert not any(compiler.search(r) for r in run_commands(image))
    assert not [r for r in run_commands(image) if is_python_step(r)]  # pip ran in the build stage
    (venv,) = [i for i in image if i.keyword == "COPY" and "from" in i.flags]
    assert venv.flags["from"] == "build" and venv.body.split() == ["/opt/venv", "/opt/venv"]
    assert image_env(image)["PATH"].startswith("/opt/venv/bin:")
    for keyword in ("USER", "ENTRYPOINT", "HEALTHCHECK", "EXPOSE"):
        assert of(image, keyword) and not of(build, keyword)


@pytest.mark.parametrize("instructions", [CPU, GPU], ids=["cpu", "gpu"])
def test_run_steps_install_only_the_service(instructions):
    runs = run_commands(instructions)
    python_steps = [r for r in runs if is_python_step(r)]
    for step in runs:
        assert is_python_step(step) or step.split()[0] in SYSTEM_COMMANDS, step
        assert "torch" not in step
    # the dependency list comes from pyproject.toml through docker/requirements.py only
    assert any("docker/requirements.py" in s and "pip install -r requirements.txt" in s for s in python_steps)
    assert any(re.search(r"pip install --no-deps \.$", s) for s in python_steps)
    for step in python_steps:  # relative paths only: the install test replays them elsewhere
        assert not re.search(r"(^|\s)/", step), step
    # the build stage creates the venv the image copies (the emulation's venv plays it)
    assert any(re.search(r"python(3\.11)? -m venv /opt/venv$", r) for r in runs)


def test_gpu_dockerfile_is_the_same_layout_on_cuda():
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-cudnn-runtime-ubuntu[\d.]+", base_image(GPU))
    cpu_steps = [s for s in run_commands(CPU) if is_python_step(s)]
    gpu_steps = [s for s in run_commands(GPU) if is_python_step(s)]
    assert gpu_steps == [s.replace("requirements.py pyproject", "requirements.py --gpu pyproject") for s in cpu_steps]
    assert "--gpu" in gpu_steps[0]
    assert copies(GPU) == copies(CPU)
    for keyword in ("USER", "ENTRYPOINT", "HEALTHCHECK", "EXPOSE"):
        assert [(i.flags, i.body) for i in of(GPU, keyword)] == [(i.flags, i.body) for i in of(CPU, keyword)]
    cpu_env, gpu_env = image_env(CPU), image_env(GPU)
    assert {k: v for k, v in gpu_env.items() if k in cpu_env} == cpu_env
    assert gpu_env["PATH"].startswith("/opt/venv/bin:")  # python/pip/csist are the venv's
    assert any("python3.11 -m venv /opt/venv" in r for r in run_commands(GPU))


# ------------------------------------------------------------------------------ .dockerignore


def test_dockerignore_matching_rules():
    ignore = DockerIgnore("data\n**/*.pt\nmodels/*\n!models/*.onnx\n# comment\n")
    assert ignore.excluded("data/seqcsist/train/image/image_0.png")
    assert ignore.excluded("runs/x/best.pt") and ignore.excluded("best.pt")
    assert ignore.excluded("models/derefnet.pt") and ignore.excluded("models/notes.txt")
    assert not ignore.excluded("models/derefnet.onnx")
    assert not ignore.excluded("service/data.py") and not ignore.excluded("training/data.py")


def test_dockerignore_keeps_data_runs_venvs_and_checkpoints_out():
    ignore = DockerIgnore.of(REPO)
    for path in [
        "data/seqcsist/meta.json",
        "runs/derefnet/best.pt",
        "runs/derefnet/last.pt",
        "models/derefnet.pt",
        "models/best.pt",
        "models/checkpoints/derefnet-last.pt",  # training's resume point
        "models/checkpoints/notes.json",
        "models/derefnet/head.seg0.tmp.onnx",  # a split under test
        "models/derefnet/amx/encoder.weights.tmp.npz",
        "models/derefnet/manifest.json.part",  # a manifest being written
        ".venv/bin/python",
        "venv/lib/x.py",
        "service/__pycache__/app.cpython-311.pyc",
        ".git/HEAD",
        "tests/service/api/test_rest.py",
        ".pytest_cache/v/cache",
        "csist_unmix.egg-info/PKG-INFO",
    ]:
        assert ignore.excluded(path), path
    for path in [
        "pyproject.toml",
        "README.md",  # pyproject's readme: the build needs it
        "service/api/app.py",
        "service/api/routes/ws.py",
        "csist/replay.py",
        "training/data.py",
        "models/derefnet/model.onnx",
        "models/derefnet/manifest.json",
        "models/derefnet/provenance.json",
        "models/derefnet/head.deform.npz",  # the native kernel's weights, listed in the manifest
        "setup.py",
        "service/kernels/_native/deform.c",
        "service/kernels/_native/conv.c",
        "models/derefnet/amx/encoder.weights.npz",  # the AMX split's weights, listed in the manifest
        "models/derefnet-int8/amx/head.seg0.onnx",
        "docker/entrypoint.sh",
        "docker/healthcheck.py",
        "docker/requirements.py",
    ]:
        assert not ignore.excluded(path), path


def test_every_file_of_the_bundled_models_reaches_the_build():
    """What a manifest lists is what the image's service verifies at start-up: all of it must be
    in the build context, under models/<folder>/ as in the checkout."""
    from service.modelpkg.manifest import MANIFEST, load_package

    ignore = DockerIgnore.of(REPO)
    folders = sorted(p.parent for p in (REPO / "models").glob(f"*/{MANIFEST}"))
    assert [f.name for f in folders] == ["derefnet", "derefnet-int8"]
    for folder in folders:
        package = load_package(folder)
        for name in [MANIFEST, *(f.file for f in package.manifest.files)]:
            path = (folder / name).relative_to(REPO).as_posix()
            assert not ignore.excluded(path), path


@pytest.mark.parametrize("instructions", [CPU, GPU], ids=["cpu", "gpu"])
def test_copy_sources_exist_and_reach_the_build(instructions):
    ignore = DockerIgnore.of(REPO)
    for source in (s for c in copies(instructions) for s in c[:-1]):
        rel = os.path.normpath(source)
        assert (REPO / rel).exists(), source
        assert not ignore.excluded(rel), source


# ------------------------------------------------------------------------------ entry point


def test_entrypoint_dispatch(tmp_path):
    script = DOCKER / "entrypoint.sh"
    assert os.access(script, os.X_OK) and os.access(DOCKER / "healthcheck.py", os.X_OK)
    subprocess.run(["sh", "-n", str(script)], check=True)
    fake = tmp_path / "csist"
    fake.write_text('#!/bin/sh\necho "csist $*"\n')
    fake.chmod(0o755)
    base = {"PATH": f"{tmp_path}:/usr/bin:/bin"}

    def run(*args: str, **env: str) -> str:
        return subprocess.run(
            [str(script), *args], env={**base, **env}, capture_output=True, text=True, check=True
        ).stdout.strip()

    assert run() == "csist serve --host 0.0.0.0 --port 8000"
    assert run(CSIST_HOST="127.0.0.1", CSIST_PORT="9001") == "csist serve --host 127.0.0.1 --port 9001"
    assert run("--log-level", "debug") == "csist serve --host 0.0.0.0 --port 8000 --log-level debug"
    assert run("serve", "--model", "m.onnx") == "csist serve --host 0.0.0.0 --port 8000 --model m.onnx"
    assert run("replay", "--url", "ws://x:1/ws/unmix") == "csist replay --url ws://x:1/ws/unmix"
    assert run("echo", "hello") == "hello"


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_healthcheck_script():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = str(server.server_address[1])
    env = {**os.environ, "CSIST_PORT": port, "http_proxy": "http://127.0.0.1:9"}
    script = str(DOCKER / "healthcheck.py")
    try:

        def run(*args: str) -> int:
            return subprocess.run([sys.executable, script, *args], env=env).returncode

        assert run() == 0  # /healthz by default, and no proxy in the way
        assert run("/readyz") == 1  # 503
        server.shutdown()
        server.server_close()
        assert run() == 1  # nothing listening
    finally:
        server.server_close()


# ------------------------------------------------------------------------------ compose


def _service_port(url: str) -> tuple[str, int]:
    m = re.fullmatch(r"wss?://([\w.-]+):(\d+)/ws/unmix", url)
    assert m, url
    return m.group(1), int(m.group(2))


def _check_paths(services: dict) -> None:
    for name, svc in services.items():
        build = svc.get("build")
        if build is not None:
            context = REPO / interpolate(build.get("context", "."))
            assert context.is_dir(), name
            assert (context / interpolate(build.get("dockerfile", "Dockerfile"))).is_file(), name
        for volume in svc.get("volumes", []):
            source = interpolate(volume.split(":")[0])
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: {source}"


def test_compose_services_profiles_and_paths():
    services = COMPOSE["services"]
    assert {
        "unmixer",
        "detector",
        "prometheus",
        "unmixer-replica",
        "gateway",
        "detector-gateway",
    } <= set(services)
    profiles = {name: svc.get("profiles", []) for name, svc in services.items()}
    assert profiles["unmixer"] == profiles["detector"] == []
    assert profiles["prometheus"] == ["monitoring"]
    assert all(profiles[s] == ["replicas"] for s in ("unmixer-replica", "gateway", "detector-gateway"))
    _check_paths(services)
    assert services["unmixer"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert int(interpolate(str(services["unmixer-replica"]["deploy"]["replicas"]))) >= 2
    assert all(p.endswith(":8000") for p in services["unmixer"]["ports"])


def test_compose_healthchecks_and_dependencies():
    services = COMPOSE["services"]
    for name, svc in services.items():
        for dep, spec in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} -> {dep}"
            assert spec["condition"] == "service_healthy", name
            assert "healthcheck" in services[dep], dep
            # a dependency must run whenever the dependant does
            assert set(services[dep].get("profiles", [])) <= set(svc.get("profiles", [])), name
    for name in ("unmixer", "unmixer-replica"):
        assert services[name]["healthcheck"]["test"] == ["CMD", "csist-healthcheck", "/readyz"]
    for name in ("detector", "detector-gateway"):
        assert services[name]["depends_on"]


def test_compose_detectors_run_the_replay_client_against_a_service():
    services = COMPOSE["services"]
    targets = {"detector": ("unmixer", 8000), "detector-gateway": ("gateway", 8080)}
    for name, (host, port) in targets.items():
        command = [interpolate(str(c)) for c in services[name]["command"]]
        assert command[0] == "replay"  # the entry point runs `csist replay`
        args = replay.build_parser().parse_args(command[1:])  # every flag exists
        assert _service_port(args.url) == (host, port)
        assert host in services[name]["depends_on"]
        assert args.seconds == 0 and args.tracks >= 1 and args.fps > 0
    gateway = services["gateway"]
    assert gateway["environment"]["NGINX_PORT"] == "8080"
    assert any(p.endswith(":8080") for p in gateway["ports"])
    upstream_host, upstream_port = gateway["environment"]["UNMIXER_UPSTREAM"].split(":")
    assert upstream_host == "unmixer-replica" and upstream_port == "8000"
    (mount,) = gateway["volumes"]
    assert mount.startswith("./docker/nginx.conf:/etc/nginx/templates/nginx.conf.template")
    assert gateway["environment"]["NGINX_ENVSUBST_OUTPUT_DIR"] == "/etc/nginx"


def test_compose_settings_are_real_settings():
    known = setting_variables() | IMAGE_VARIABLES
    for name, svc in COMPOSE["services"].items():
        for key in svc.get("environment", {}):
            if key.startswith("CSIST_"):
                assert key in known, f"{name}: {key}"
    for key in COMPOSE_GPU["services"]["unmixer"]["environment"]:
        assert key in known
    model = interpolate(COMPOSE["services"]["unmixer"]["environment"]["CSIST_MODEL_PATH"])
    assert model == image_env(CPU)["CSIST_MODEL_PATH"]  # the image's bundled model by default


def test_compose_gpu_override():
    services = COMPOSE_GPU["services"]
    assert set(services) <= set(COMPOSE["services"])
    _check_paths(services)
    for svc in services.values():
        assert svc["build"]["dockerfile"] == "docker/Dockerfile.gpu"
        assert svc["image"] != COMPOSE["services"]["unmixer"]["image"]
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"]
    providers = interpolate(services["unmixer"]["environment"]["CSIST_PROVIDERS"])
    assert providers.split(",")[0] == "CUDAExecutionProvider"


def test_prometheus_scrapes_the_unmixers():
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert set(sd["names"]) == {"unmixer", "unmixer-replica"} and sd["port"] == 8000


def _compose_command() -> list[str] | None:
    """``docker compose`` (v2), else Debian's ``docker-compose`` (v1), else None."""
    if shutil.which("docker") and (
        subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.mark.skipif(
    _compose_command() is None,
    reason="neither the docker compose plugin nor docker-compose is installed",
)
def test_docker_compose_config_accepts_the_files(tmp_path):
    command = _compose_command()
    main = "docker-compose.yml"
    if command == ["docker-compose"]:
        # Compose v1 (Debian's docker-compose) rejects the top-level name: give it with -p
        text = (REPO / main).read_text()
        main = str(tmp_path / "docker-compose.yml")
        Path(main).write_text(re.sub(r"^name: .*\n", "", text, flags=re.M))
        command = [*command, "--project-directory", str(REPO), "-p", COMPOSE["name"]]
    for files in ([main], [main, "docker/compose.gpu.yml"]):
        args = [a for f in files for a in ("-f", f)]
        for profile in ([], ["--profile", "replicas", "--profile", "monitoring"]):
            subprocess.run([*command, *args, *profile, "config", "-q"], cwd=REPO, check=True)


# ------------------------------------------------------------------------------ nginx


def test_nginx_template_renders_for_a_list_of_replicas():
    render = load_script("render_nginx")
    template = (DOCKER / "nginx.conf").read_text()
    text = render.render(template, ["127.0.0.1:9001", "127.0.0.1:9002", "[::1]:9003"], 8089)
    code = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert [c for c in code if c.startswith("server ") and not c.endswith("{")] == [
        f"server {a} max_fails=1 fail_timeout=10s;" for a in ("127.0.0.1:9001", "127.0.0.1:9002", "[::1]:9003")
    ]
    assert "listen 8089;" in code
    assert "${" not in "\n".join(code)
    # WebSocket upgrade, long timeouts, nginx's own variables untouched
    assert "proxy_set_header Upgrade $http_upgrade;" in code
    assert "proxy_set_header Connection $connection_upgrade;" in code
    assert "proxy_read_timeout 1h;" in code and "proxy_http_version 1.1;" in code
    for bad in ([], ["no-port"], ["a:1; evil"]):
        with pytest.raises(ValueError):
            render.render(template, bad, 8089)


# ------------------------------------------------------------------------------ Kubernetes


def _k8s() -> dict[str, dict]:
    docs = {}
    for path in sorted((DOCKER / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in docs
            docs[doc["kind"]] = doc
    return docs


def test_k8s_manifests_fit_together_and_the_service():
    from service.api.routes import health, models, unmix, ws

    docs = _k8s()
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    deploy, svc, hpa = docs["Deployment"], docs["Service"], docs["HorizontalPodAutoscaler"]
    pod = deploy["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    assert container["image"].split(":")[0] == COMPOSE["services"]["unmixer"]["image"].split(":")[0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert ports["http"] == int(env["CSIST_PORT"])
    assert env["CSIST_MODEL_PATH"] == image_env(CPU)["CSIST_MODEL_PATH"]
    assert not set(env) - setting_variables() - IMAGE_VARIABLES
    assert svc["spec"]["ports"][0]["targetPort"] in ports
    routes = {r.path for module in (health, models, unmix, ws) for r in module.router.routes}
    assert {"/healthz", "/readyz", "/metrics"} <= routes
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in routes and get["port"] in ports, probe
    # the image's user, and time for drain + in-flight work before the kill
    uid, gid = of(CPU, "USER")[-1].body.split(":")
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] and (security["runAsUser"], security["runAsGroup"]) == (
        int(uid),
        int(gid),
    )
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(env["CSIST_DRAIN_S"]) + float(env["CSIST_SHUTDOWN_TIMEOUT_S"])
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"], target["apiVersion"]) == (
        "Deployment",
        deploy["metadata"]["name"],
        deploy["apiVersion"],
    )
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert pod["metadata"]["annotations"]["prometheus.io/path"] in routes


# ------------------------------------------------------------------------------ engine helper


def test_engine_helper_has_help_and_needs_no_engine_to_import():
    out = subprocess.run(
        [sys.executable, "-m", "tests.docker.engine", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "python-base" in out.stdout and "nginx-image" in out.stdout
