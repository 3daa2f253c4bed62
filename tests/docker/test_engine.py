"""The images on a real Docker engine (marker ``docker``: ``make test-docker``).

tests/docker/engine.py starts dockerd when none answers and provides the base images (the
official ones when they can be pulled, else stand-ins made from Debian packages). Then:

- docker/Dockerfile builds with the classic builder (DOCKER_BUILDKIT=0), unmodified, and with
  BuildKit where the client has it; docker/Dockerfile.gpu builds with the classic builder on
  the Python stand-in in place of the CUDA base (a build check only: no CUDA there);
- the CPU container runs as 10001 with no compiler in the image and the native kernels
  built, becomes healthy by its own HEALTHCHECK, answers /unmix with targets, and on SIGTERM
  answers its open WebSocket tracks' last frames, marks them expired, closes with 1001 and
  exits 0 within its drain time plus a little;
- the compose stack of profile ``replicas`` (two unmixer replicas, nginx, the detector's
  ``csist replay``) from docker-compose.yml itself, with only images, ports and thread counts
  overridden: one replica killed mid-stream, every frame still answered exactly once.

Image sizes and build times go to the run's summary ("docker images").
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from service.modelpkg.manifest import load_package
from tests.docker import engine
from tests.docker.conftest import REPORT
from tests.docker.support import REPO, free_port, http_get, wait_http

pytestmark = [pytest.mark.docker, pytest.mark.timeout(2400)]

TAG = os.environ.get("CSIST_DOCKER_TAG", "csist-unmix:engine-test")
RUN_ID = uuid.uuid4().hex[:8]  # container, network and project names of this run
# 2 shared cores for everything; delivery is checked here, not timing (no deadline)
THREADS = {"CSIST_THREADS": "1", "OMP_NUM_THREADS": "1", "CSIST_DEADLINE_MS": "0"}


def _mb(size: int) -> str:
    return f"{size / 1e6:.0f} MB"


def image_size(ref: str) -> int:
    return int(engine.docker("image", "inspect", "--format", "{{.Size}}", ref).stdout.strip())


def build(
    dockerfile: str,
    tag: str,
    args: dict[str, str],
    buildkit: bool,
    timeout: float = 1800,
    client: str | None = None,
):
    env = {**os.environ, "DOCKER_BUILDKIT": "1" if buildkit else "0"}
    command = ["build", *engine.build_network_args(), "-f", dockerfile, "-t", tag]
    command += [a for k, v in args.items() for a in ("--build-arg", f"{k}={v}")]
    started = time.monotonic()
    proc = engine.docker(*command, ".", cwd=REPO, env=env, timeout=timeout, check=False, binary=client)
    return proc, time.monotonic() - started


@pytest.fixture(scope="session")
def daemon() -> str:
    try:
        how = engine.ensure_daemon()
    except engine.Unavailable as exc:
        pytest.skip(str(exc))
    server = engine.docker("version", "--format", "{{.Server.Version}}").stdout.strip()
    REPORT.append(f"engine: {how}; server {server}")
    return how


@pytest.fixture(scope="session")
def python_base(daemon) -> str:
    started = time.monotonic()
    try:
        base = engine.ensure_python_base()
    except engine.Unavailable as exc:
        pytest.skip(str(exc))
    REPORT.append(f"base {base}: {_mb(image_size(base))}; {time.monotonic() - started:.0f} s")
    return base


@pytest.fixture(scope="session")
def cpu_image(python_base) -> str:
    """docker/Dockerfile built unmodified by the classic builder."""
    proc, seconds = build("docker/Dockerfile", TAG, {"PYTHON_IMAGE": python_base}, buildkit=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Successfully built" in proc.stdout  # the classic builder's own output
    size = image_size(TAG)
    REPORT.append(
        f"{TAG} (docker/Dockerfile, classic builder, PYTHON_IMAGE={python_base}): {_mb(size)}, "
        f"{_mb(size - image_size(python_base))} above the base; build {seconds:.0f} s"
    )
    return TAG


class Container:
    """A detached container on this run's own network, reached at its address there."""

    def __init__(self, image: str, network: str, env: dict[str, str] | None = None, name: str = ""):
        self.name = name or f"csist-engine-{RUN_ID}-{uuid.uuid4().hex[:4]}"
        envs = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
        engine.docker("run", "-d", "--name", self.name, "--network", network, *envs, image)
        self.ip = engine.docker(
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            self.name,
        ).stdout.strip()
        self.base_url = f"http://{self.ip}:8000"

    def inspect(self, template: str) -> str:
        return engine.docker("inspect", "--format", template, self.name).stdout.strip()

    def logs(self) -> str:
        proc = engine.docker("logs", self.name, check=False)
        return (proc.stdout + proc.stderr)[-4000:]

    def remove(self) -> None:
        engine.docker("rm", "-f", self.name, check=False)


@pytest.fixture(scope="module")
def network(daemon):
    name = f"csist-engine-{RUN_ID}"
    engine.docker("network", "create", name)
    yield name
    engine.docker("network", "rm", name, check=False)


def wait_health(container: Container, timeout: float) -> str:
    """The container's health once it is no longer "starting" (its HEALTHCHECK decides)."""
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = container.inspect("{{.State.Health.Status}}")
        if status not in ("starting", ""):
            return status
        if container.inspect("{{.State.Running}}") != "true":
            return "exited"
        time.sleep(0.5)
    return status


def frame_msg(track_id: str, index: int, patch) -> str:
    return json.dumps({"type": "frame", "track_id": track_id, "frame_index": index, "patch": patch.tolist()})


# ------------------------------------------------------------------------------ builds


def test_cpu_image_builds_with_the_classic_builder_without_a_compiler(cpu_image):
    def run(*command: str) -> subprocess.CompletedProcess:
        return engine.docker("run", "--rm", "--entrypoint", "sh", cpu_image, "-c", " ".join(command), check=False)

    config = json.loads(engine.docker("image", "inspect", cpu_image).stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["csist-entrypoint"]
    assert config["Healthcheck"]["Test"] == ["CMD", "csist-healthcheck", "/healthz"]
    # the compiler stayed in the build stage; the kernels it built did not
    assert run("command -v gcc cc x86_64-linux-gnu-gcc-12").stdout.strip() == ""
    native = run("python -c 'import service.kernels._deform, service.kernels._conv, onnxruntime; print(1)'")
    assert native.returncode == 0 and native.stdout.strip() == "1", native.stderr
    torch = run("python -c 'import torch'")
    assert torch.returncode != 0  # the runtime only
    modes = run("stat -c %a /usr/local/bin/csist-entrypoint /usr/local/bin/csist-healthcheck")
    assert modes.stdout.split() == ["755", "755"]


def test_cpu_image_builds_with_buildkit(python_base):
    tag, refused = f"{TAG}-buildkit", []
    for client in engine.docker_clients():  # the first one whose BuildKit works
        proc, seconds = build("docker/Dockerfile", tag, {"PYTHON_IMAGE": python_base}, buildkit=True, client=client)
        if proc.returncode != 0 and re.search(r"buildx|BuildKit is enabled but", proc.stderr):
            refused.append(f"{client}: {proc.stderr.strip().splitlines()[0]}")
            continue
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        break
    else:
        pytest.skip(f"no docker client here has BuildKit: {refused}")
    REPORT.append(
        f"{tag} (docker/Dockerfile, BuildKit, client {client}): {_mb(image_size(tag))}; build {seconds:.0f} s"
    )
    engine.docker("image", "rm", tag, check=False)


def test_gpu_dockerfile_builds_with_the_classic_builder(python_base):
    """On the Python stand-in in place of the CUDA base (apt and python3.11 as on Ubuntu
    22.04): the file's syntax, stages and steps, not CUDA."""
    if os.environ.get("CSIST_DOCKER_GPU_BUILD", "1") == "0":
        pytest.skip("CSIST_DOCKER_GPU_BUILD=0")
    cuda = os.environ.get("CSIST_DOCKER_CUDA_IMAGE")
    base = cuda if cuda and engine.try_pull(cuda) else python_base
    tag = f"{TAG}-gpu"
    proc, seconds = build("docker/Dockerfile.gpu", tag, {"CUDA_IMAGE": base}, buildkit=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    check = engine.docker(
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        tag,
        "-c",
        "command -v gcc; id -u; python -c 'import onnxruntime as o, service.kernels._deform; "
        "print(o.get_available_providers())'; pip list 2>/dev/null | grep -i '^onnxruntime'",
        check=False,
    )
    assert check.returncode == 0, check.stderr
    lines = check.stdout.split("\n")
    assert lines[0] == "10001"  # no gcc line before it
    assert "CUDAExecutionProvider" in lines[1]
    assert [line.split()[0] for line in lines[2:] if line.strip()] == ["onnxruntime-gpu"]
    REPORT.append(
        f"{tag} (docker/Dockerfile.gpu, classic builder, CUDA_IMAGE={base}): "
        f"{_mb(image_size(tag))}; build {seconds:.0f} s"
    )


# ------------------------------------------------------------------------------ one container


def test_container_is_healthy_serves_unmix_and_drains_on_sigterm(cpu_image, network):
    from csist.replay import make_track

    drain_s = 1.0
    container = Container(cpu_image, network, env={**THREADS, "CSIST_DRAIN_S": str(drain_s)})
    try:
        started = time.monotonic()
        assert wait_health(container, timeout=120) == "healthy", container.logs()
        REPORT.append(f"container healthy {time.monotonic() - started:.0f} s after start")
        uid = engine.docker("exec", container.name, "id", "-u").stdout.strip()
        pid1 = engine.docker("exec", container.name, "sh", "-c", "grep ^Uid: /proc/1/status").stdout
        assert uid == "10001" and pid1.split()[1:3] == ["10001", "10001"]
        assert wait_http(f"{container.base_url}/readyz", timeout=30)

        import httpx

        frames = make_track(0, seed=0).frames[:5]
        body = {"frames": [{"patch": f.tolist(), "frame_index": i} for i, f in enumerate(frames)]}
        r = httpx.post(f"{container.base_url}/unmix", json=body, timeout=30)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert [x["frame_index"] for x in answer["results"]] == list(range(5))
        assert any(x["targets"] for x in answer["results"]), answer
        if (REPO / "models/derefnet/manifest.json").exists():  # the bundled model
            assert answer["model"]["sha256"] == load_package(REPO / "models/derefnet").sha256
        # the plan chosen at start-up, with the image's native kernels among the candidates
        plan = httpx.get(f"{container.base_url}/v2/models/derefnet", timeout=30).json()["plan"]
        rows = {row["plan"]: row for row in plan["candidates"]}
        assert plan["requested"] == "auto" and rows[plan["name"]]["status"] == "chosen"
        assert rows["native-deform"]["status"] in ("chosen", "passed"), rows["native-deform"]
        REPORT.append(
            f"container plan {plan['name']} ({plan['host']['isa']}): "
            + ", ".join(f"{n} {r.get('ms_per_window', r['status'])}" for n, r in rows.items())
        )

        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        async def scenario():
            async with connect(f"ws://{container.ip}:8000/ws/unmix") as ws:
                for i in range(2):
                    await ws.send(frame_msg("A", i, frames[i]))
                for i in range(3):
                    await ws.send(frame_msg("B", i, frames[i]))
                first = json.loads(await asyncio.wait_for(ws.recv(), 30))  # B's frame 0
                engine.docker("kill", "--signal", "TERM", container.name)
                signalled = time.monotonic()
                messages = []
                try:
                    while True:
                        messages.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
                except ConnectionClosed:
                    pass
                return first, messages, ws.close_code, ws.close_reason, signalled

        first, messages, code, reason, signalled = asyncio.run(scenario())
        exit_code = int(engine.docker("wait", container.name, timeout=60).stdout.strip())
        stopped_after = time.monotonic() - signalled
        REPORT.append(f"SIGTERM to exit {stopped_after:.1f} s (CSIST_DRAIN_S={drain_s})")
        logs = container.logs()
    finally:
        container.remove()

    assert (first["track_id"], first["frame_index"]) == ("B", 0)
    by_track: dict[str, list] = {}
    for m in messages:
        by_track.setdefault(m["track_id"], []).append((m["type"], m.get("frame_index"), m.get("reason")))
    # the in-flight tracks' remaining frames answered, then closed by the shutdown
    assert by_track["A"] == [
        ("result", 0, None),
        ("result", 1, None),
        ("expired", None, "shutdown"),
    ]
    assert by_track["B"] == [
        ("result", 1, None),
        ("result", 2, None),
        ("expired", None, "shutdown"),
    ]
    assert code == 1001 and reason == "server shutting down"
    assert exit_code == 0, logs
    assert stopped_after < drain_s + 10, logs
    assert "draining" in logs


# ------------------------------------------------------------------------------ compose


def compose_files(tmp_path: Path, command: list[str], nginx_image: str) -> list[str]:
    """-f arguments: docker-compose.yml (for Compose v1 without the top-level ``name``, which
    it rejects; the project name is given with -p instead) and an override with the images
    built here and one thread per replica."""
    main = REPO / "docker-compose.yml"
    if command == ["docker-compose"]:
        text = main.read_text()
        assert re.search(r"^name: ", text, re.M)
        main = tmp_path / "docker-compose.yml"
        main.write_text(re.sub(r"^name: .*\n", "", text, flags=re.M))
    override = {
        "services": {
            "unmixer-replica": {"image": TAG, "environment": {**THREADS, "CSIST_DRAIN_S": "0"}},
            "detector-gateway": {"image": TAG, "environment": THREADS},
            "gateway": {"image": nginx_image},
        }
    }
    (tmp_path / "override.yml").write_text(yaml.safe_dump(override))
    return ["-f", str(main), "-f", str(tmp_path / "override.yml")]


def test_compose_replicas_one_killed_mid_stream_every_frame_answered_once(cpu_image, tmp_path):
    try:
        command = engine.compose_command()
        nginx_image = engine.ensure_nginx_image()
    except engine.Unavailable as exc:
        pytest.skip(str(exc))
    project = f"csist-engine-{RUN_ID}"
    gateway_port = free_port()
    compose = [
        *command,
        "--project-directory",
        str(REPO),
        "-p",
        project,
        *compose_files(tmp_path, command, nginx_image),
        "--profile",
        "replicas",
    ]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CSIST_")},
        "CSIST_GATEWAY_PUBLISH": f"127.0.0.1:{gateway_port}",
    }

    def run(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([*compose, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, f"{args}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        return proc

    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)  # the detector writes as the image's user
    client = None
    REPORT.append(f"compose: {' '.join(command)}")
    try:
        started = time.monotonic()
        # gateway waits for healthy replicas, as the file says (depends_on: service_healthy)
        run("up", "-d", "--no-build", "gateway", timeout=600)
        replicas = run("ps", "-q", "unmixer-replica").stdout.split()
        assert len(replicas) == 2, replicas  # deploy.replicas of the file
        gateway = run("ps", "-q", "gateway").stdout.split()[0]
        assert wait_for(lambda: _health(gateway) == "healthy", 60), run("logs", "gateway").stdout[-3000:]
        REPORT.append(f"compose stack healthy {time.monotonic() - started:.0f} s after `up`")
        base = f"http://127.0.0.1:{gateway_port}"
        assert wait_http(f"{base}/readyz", timeout=30)

        ips = {c: _ip(c) for c in replicas}
        summary_path, answers_path = out / "summary.json", out / "answers.jsonl"
        log = open(tmp_path / "detector.log", "w")
        # the compose file's detector service with a bounded run and its answers kept
        client = subprocess.Popen(
            [
                *compose,
                "run",
                "--rm",
                "--no-deps",
                "-T",
                "-v",
                f"{out}:/out",
                "detector-gateway",
                "replay",
                "--url",
                "ws://gateway:8080/ws/unmix",
                "--tracks",
                "2",
                "--fps",
                "10",
                "--seconds",
                "3",
                "--seed",
                "7",
                "--reconnect-timeout",
                "20",
                "--drain-timeout",
                "30",
                "--json-out",
                "/out/summary.json",
                "--answers-out",
                "/out/answers.jsonl",
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        assert wait_for(lambda: answers_path.exists() and len(answers_path.read_text().splitlines()) >= 10, 90), (
            tmp_path / "detector.log"
        ).read_text()[-3000:]
        victim = wait_for(lambda: next((c for c in replicas if _ws_connections(ips[c]) >= 1), None), 10)
        assert victim is not None, "no replica holds the detector's WebSocket"
        answered_before = len(answers_path.read_text().splitlines())
        engine.docker("kill", victim)  # SIGKILL: a crash, no drain

        assert client.wait(timeout=180) == 0, (tmp_path / "detector.log").read_text()[-4000:]
        summary = json.loads(summary_path.read_text())
        answers = [json.loads(line) for line in answers_path.read_text().splitlines()]
        keys = [(a["track_id"], a["frame_index"]) for a in answers]
        expected = {(t, i) for t, n in summary["frames_per_track"].items() for i in range(n)}
        assert len(keys) == len(set(keys)), "a frame was answered twice to the user"
        assert set(keys) == expected
        assert all("targets" in a for a in answers)
        assert summary["ok"] and summary["missing"] == 0 and summary["errors"] == 0
        assert summary["answered"] == summary["frames"] == len(expected) > answered_before
        assert summary["reconnects"] >= 1 and summary["resent_frames"] >= 4
        assert summary["duplicates_dropped"] >= 1
        REPORT.append(
            f"compose replicas: {summary['frames']} frames, {summary['reconnects']} reconnect(s), "
            f"{summary['resent_frames']} resent, "
            f"{summary['duplicates_dropped']} duplicate(s) dropped"
        )

        import httpx

        from tests.service.conftest import simulate_track

        body = {"frames": [{"patch": f.tolist()} for f in simulate_track(5, seed=1)]}
        for _ in range(3):  # REST through nginx while one replica is down
            r = httpx.post(f"{base}/unmix", json=body, timeout=30)
            assert r.status_code == 200, r.text
            assert len(r.json()["results"]) == 5
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait(10)
        down = run("down", "-v", "--remove-orphans", "-t", "5", timeout=180, check=False)
        if down.returncode != 0:
            print(down.stdout + down.stderr, file=sys.stderr)


def _health(container: str) -> str:
    return engine.docker("inspect", "--format", "{{.State.Health.Status}}", container).stdout.strip()


def _ip(container: str) -> str:
    return engine.docker(
        "inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", container
    ).stdout.strip()


def _ws_connections(ip: str) -> float:
    try:
        status, body = http_get(f"http://{ip}:8000/metrics", timeout=3)
    except OSError:
        return 0.0
    match = re.search(r"^csist_ws_connections\s+(\S+)$", body.decode(), re.M)
    return float(match.group(1)) if status == 200 and match else 0.0


def wait_for(predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None
