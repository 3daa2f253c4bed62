"""The CPU image's install steps and entry point, without Docker.

docker/Dockerfile is replayed (tests/docker/support.py: Emulation) into a temporary directory
that plays the image's file system, with a fresh Python 3.11 virtual environment as the image's
Python: COPY steps copy what .dockerignore lets through, the pip RUN steps run as written,
ENV is applied (absolute paths mapped into that directory). Then, from that environment only:
torch is not installed; the ENTRYPOINT serves the model (the bundled one when it exists, else
the stand-in) and answers /readyz and /unmix; the HEALTHCHECK command and the compose
healthcheck pass; the compose detector's own command (`csist replay`) streams to it; SIGTERM
stops it cleanly. Needs the package index (pip); a warm pip cache makes it take well under
a minute.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from csist.replay import make_track
from service.modelpkg.manifest import load_package
from tests.docker.support import (
    BUNDLED_MODEL,
    DOCKER,
    REPO,
    Emulation,
    free_port,
    parse_dockerfile,
    wait_http,
)

pytestmark = pytest.mark.timeout(900)


def python311() -> str:
    """A Python 3.11 to create the venv with (the image's Python version)."""
    for candidate in (shutil.which("python3.11"), sys.executable):
        if candidate:
            out = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 11))"],
                capture_output=True,
                text=True,
            ).stdout.strip()
            if out == "True":
                return candidate
    pytest.skip("no Python 3.11 to build the image's environment with")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Emulation:
    """docker/Dockerfile replayed into a temporary root with a fresh venv."""
    tmp = tmp_path_factory.mktemp("image")
    venv = tmp / "venv"
    subprocess.run([python311(), "-m", "venv", str(venv)], check=True, timeout=120)
    emulation = Emulation(context=REPO, root=tmp / "root", venv=venv)
    started = time.monotonic()
    emulation.run(parse_dockerfile(DOCKER / "Dockerfile"))
    emulation.log.append(f"image steps: {time.monotonic() - started:.1f} s")
    print("\n".join(emulation.log))
    return emulation


def venv_python(image: Emulation) -> str:
    return str(image.venv / "bin" / "python")


def test_install_steps_give_the_service_without_torch(image):
    assert image.executed, "no pip step ran"
    # system steps: the C compiler and the venv (the emulation's venv plays it), modes and the
    # user; and the copy of the build stage's venv
    assert all(s.split()[0] in ("chmod", "apt-get", "COPY") for s in image.skipped), image.skipped
    code = (
        "import importlib.util as u, json; "
        "print(json.dumps({m: u.find_spec(m) is not None for m in "
        "('torch', 'torchvision', 'onnx', 'onnxruntime', 'fastapi', 'uvicorn', 'websockets', "
        "'cv2', 'scipy', 'service', 'training', 'service.kernels._deform', 'service.kernels._conv')}))"
    )
    found = json.loads(
        subprocess.run(
            [venv_python(image), "-c", code],
            env=image.process_env(),
            cwd=image.workdir,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert not found["torch"] and not found["torchvision"] and not found["onnx"], found
    assert all(found[m] for m in ("onnxruntime", "fastapi", "uvicorn", "websockets", "cv2", "scipy")), found
    assert found["service"] and found["training"]
    assert found["service.kernels._deform"], "pip did not compile the native DeformConv kernel"
    assert found["service.kernels._conv"], "pip did not compile the native (AMX) convolution kernels"
    dists = subprocess.run(
        [venv_python(image), "-m", "pip", "list", "--format=json"],
        env=image.process_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = {d["name"].lower() for d in json.loads(dists)}
    assert "onnxruntime" in names and "onnxruntime-gpu" not in names and "torch" not in names
    assert "csist-unmix" in names
    # the installed package is the image's copy, not this checkout (no PYTHONPATH leaks in)
    where = subprocess.run(
        [venv_python(image), "-c", "import service; print(service.__file__)"],
        env=image.process_env(),
        cwd=image.workdir,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert str(image.venv) in where


def test_entrypoint_serves_the_model_and_the_detector_streams_to_it(image, model, tmp_path):
    env = image.process_env()
    port = free_port()
    env.update(
        CSIST_HOST="127.0.0.1",
        CSIST_PORT=str(port),
        CSIST_THREADS="1",
        CSIST_DEADLINE_MS="0",  # the install and the entry point are checked here, not timing
        CSIST_LOG_LEVEL="warning",
        OMP_NUM_THREADS="1",
    )
    image_model = Path(env["CSIST_MODEL_PATH"])
    if model == BUNDLED_MODEL:  # the image serves its own copy of the bundled model
        assert (image_model / "manifest.json").is_file(), "the bundled model did not reach the image"
    else:  # the stand-in (before a model is bundled) or $CSIST_TEST_MODEL
        env["CSIST_MODEL_PATH"] = str(model)
    served = load_package(env["CSIST_MODEL_PATH"])
    for f in served.manifest.files:  # every file the service verifies at start-up
        assert (served.directory / f.file).is_file(), f.file
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(image.entrypoint, env=env, cwd=image.workdir, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_http(f"{base}/readyz", timeout=90, proc=server), (tmp_path / "server.log").read_text()[-3000:]

        # REST: a 5-frame track, one result per frame, from the served model
        import httpx

        frames = make_track(0, seed=0).frames[:5]  # a SeqCSIST trajectory's first frames
        body = {"frames": [{"patch": f.tolist(), "frame_index": i} for i, f in enumerate(frames)]}
        r = httpx.post(f"{base}/unmix", json=body, timeout=30)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert [x["frame_index"] for x in answer["results"]] == list(range(5))
        assert answer["model"]["sha256"] == served.sha256
        assert any(r["targets"] for r in answer["results"]), answer  # it finds targets

        # the image's HEALTHCHECK, and the compose file's readiness check, from the image
        compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
        compose_check = compose["services"]["unmixer"]["healthcheck"]["test"]
        assert compose_check[0] == "CMD"
        for command in (image.healthcheck, compose_check[1:]):
            assert subprocess.run(command, env=env, timeout=30).returncode == 0, command

        # the compose detector's command (csist replay, through the entry point), bounded
        detector = [str(c) for c in compose["services"]["detector"]["command"]]
        detector = [c.replace("${REPLAY_SECONDS:-0}", "0") for c in detector]
        detector = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", c) for c in detector]
        summary_path = tmp_path / "replay.json"
        detector += [
            "--url",
            f"ws://127.0.0.1:{port}/ws/unmix",
            "--max-frames",
            "60",
            "--json-out",
            str(summary_path),
            "--quiet",
        ]
        replay = subprocess.run(
            image.entrypoint + detector,
            env=env,
            cwd=image.workdir,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert replay.returncode == 0, replay.stdout + replay.stderr
        summary = json.loads(summary_path.read_text())
        assert summary["frames"] == summary["answered"] == 60 and summary["missing"] == 0

        # graceful stop on SIGTERM
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
        log.close()


def test_gpu_requirements_resolve_without_cpu_onnxruntime_or_torch(image, tmp_path):
    """The GPU image's requirement list resolves on PyPI (metadata only, nothing installed)."""
    reqs = tmp_path / "requirements.txt"
    subprocess.run(
        [
            venv_python(image),
            str(DOCKER / "requirements.py"),
            "--gpu",
            str(REPO / "pyproject.toml"),
        ],
        stdout=open(reqs, "w"),
        check=True,
    )
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [
            venv_python(image),
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "-q",
            "--report",
            str(report),
            "-r",
            str(reqs),
        ],
        env={**image.process_env(), "PIP_PROGRESS_BAR": "off"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert "onnxruntime-gpu" in names
    assert "onnxruntime" not in names and "torch" not in names
    assert os.path.getsize(report) > 0
