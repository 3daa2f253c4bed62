#!/usr/bin/env python3
"""A real Docker engine for the deployment tests: start it, and make the base images the
project's Dockerfiles and docker-compose.yml name where the registry cannot be reached.

    python -m tests.docker.engine daemon          # start dockerd unless an engine answers
    python -m tests.docker.engine python-base     # print the PYTHON_IMAGE to build with
    python -m tests.docker.engine nginx-image     # print the gateway's nginx image
    python -m tests.docker.engine compose         # print the compose command (installs it)
    python -m tests.docker.engine all             # all of the above

Images made here (tests/docker/test_engine.py uses them; docs/deployment.md describes them):

- ``csist-base/python:3.11-bookworm``: a stand-in for ``python:3.11-slim-bookworm`` when that
  cannot be pulled, made from Debian's packages (``debootstrap`` + ``docker import``):
  python3.11 as ``python`` / ``python3`` (with venv, headers and pip, as the official image
  has them), and this machine's CA certificates, so that pip in a build reaches the package
  index through the same TLS-inspecting egress as the host.
- ``csist-base/nginx:bookworm``: a stand-in for ``nginx:1.27-alpine``, Debian's nginx on that
  base, with an entry point that fills ``/etc/nginx/templates/*.template`` from the
  environment the way the official image does (the compose file relies on it).

dockerd is started in the background when it is installed and no engine answers; sandboxes
that refuse its defaults get the fallbacks of ``DAEMON_FALLBACKS`` in turn. It keeps running
after the tests, so that its image cache serves the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PYTHON_IMAGE = "python:3.11-slim-bookworm"  # the Dockerfile's default base
NGINX_IMAGE = "nginx:1.27-alpine"  # docker-compose.yml's gateway
PYTHON_STANDIN = "csist-base/python:3.11-bookworm"
NGINX_STANDIN = "csist-base/nginx:bookworm"
SUITE = "bookworm"
# python3.11 as the official image carries it: interpreter, venv (ensurepip), headers, pip.
BASE_PACKAGES = [
    "python3.11",
    "python3.11-venv",
    "python3.11-dev",
    "python3-pip",
    "ca-certificates",
]
DAEMON_LOG = Path(os.environ.get("CSIST_DOCKERD_LOG", "/var/tmp/csist-dockerd.log"))
# Tried in order when dockerd does not come up with its defaults: no iptables (no NAT for
# containers: builds then use the host's network), then also the vfs storage driver (no
# overlay mounts), then also no default bridge.
DAEMON_FALLBACKS = [
    [],
    ["--iptables=false"],
    ["--iptables=false", "--storage-driver=vfs"],
    ["--iptables=false", "--storage-driver=vfs", "--bridge=none"],
]
STATE = Path(os.environ.get("CSIST_DOCKER_STATE", "/var/tmp/csist-docker-state.json"))


class Unavailable(RuntimeError):
    """The engine or an image cannot be had here; the message says why (a skip reason)."""


def docker(
    *args: str, timeout: float = 120, check: bool = True, binary: str | None = None, **kw
) -> subprocess.CompletedProcess:
    binary = binary or shutil.which("docker")
    if binary is None:
        raise Unavailable("the docker client is not installed")
    proc = subprocess.run([binary, *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


def docker_clients() -> list[str]:
    """Every distinct docker client here, PATH's first: a newer static client without buildx
    cannot use BuildKit, while Debian's docker.io client (/usr/bin/docker) drives the
    daemon's built-in BuildKit itself."""
    found: list[str] = []
    dirs = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin"]
    for directory in dirs:
        path = Path(directory or ".") / "docker"
        if os.access(path, os.X_OK) and path.is_file() and str(path.resolve()) not in found:
            found.append(str(path.resolve()))
    return found


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return docker("info", "--format", "{{.ServerVersion}}", timeout=20, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def daemon_flags() -> list[str]:
    """The flags the running dockerd was started with by ensure_daemon ([] when unknown, or
    when the dockerd it recorded is gone: an engine started otherwise has its defaults)."""
    try:
        state = json.loads(STATE.read_text())
        os.kill(int(state["pid"]), 0)
        return list(state.get("dockerd_flags", []))
    except (OSError, ValueError, KeyError, TypeError):
        return []


def build_network_args() -> list[str]:
    """Without dockerd's iptables rules a build's containers have no route out: use the host's."""
    return ["--network", "host"] if "--iptables=false" in daemon_flags() else []


def ensure_daemon(timeout: float = 60) -> str:
    """Make sure an engine answers; start dockerd if needed. Returns how (for the test log)."""
    if shutil.which("docker") is None:
        raise Unavailable("the docker client is not installed (Debian: apt-get install docker.io)")
    if engine_answers():
        return "an engine was already running"
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise Unavailable("no Docker engine answers and dockerd is not installed")
    if os.geteuid() != 0:
        raise Unavailable("no Docker engine answers and starting dockerd needs root")
    tried = []
    for flags in DAEMON_FALLBACKS:
        DAEMON_LOG.parent.mkdir(parents=True, exist_ok=True)
        log = open(DAEMON_LOG, "a")
        log.write(f"\n--- dockerd {' '.join(flags)} ---\n")
        log.flush()
        # its own session: the daemon outlives the test run (and pytest's process group)
        proc = subprocess.Popen(
            [dockerd, *flags],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if engine_answers():
                STATE.write_text(json.dumps({"dockerd_flags": flags, "pid": proc.pid}))
                how = " ".join(flags) or "with its defaults"
                return f"started dockerd {how} (pid {proc.pid}, log {DAEMON_LOG})"
            time.sleep(0.5)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        tried.append(" ".join(flags) or "(defaults)")
    tail = DAEMON_LOG.read_text(errors="replace")[-1500:] if DAEMON_LOG.exists() else ""
    raise Unavailable(f"dockerd did not start with {tried}; log tail:\n{tail}")


def image_exists(ref: str) -> bool:
    return docker("image", "inspect", ref, check=False, timeout=30).returncode == 0


def try_pull(ref: str, timeout: float = 90) -> bool:
    """The image, locally or pulled; False where the registry is out of reach."""
    if image_exists(ref):
        return True
    try:
        return docker("pull", ref, check=False, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def debian_mirror() -> str:
    """The host's Debian mirror (apt sources), so that the stand-ins use what apt here uses."""
    if os.environ.get("CSIST_DEBIAN_MIRROR"):
        return os.environ["CSIST_DEBIAN_MIRROR"]
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("URIs:"):
                uri = line.split()[1]
                if uri.rstrip("/").endswith("/debian"):
                    return uri
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        for line in sources.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[1].rstrip("/").endswith("/debian"):
                return parts[1]
    return "http://deb.debian.org/debian"


def _install_debootstrap() -> str:
    found = shutil.which("debootstrap") or ("/usr/sbin/debootstrap" if Path("/usr/sbin/debootstrap").exists() else None)
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable("debootstrap is not installed (apt-get install debootstrap, as root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for args in (
        ["install", "-y", "-q", "debootstrap"],
        ["update", "-q"],
        ["install", "-y", "-q", "debootstrap"],
    ):
        subprocess.run(["apt-get", *args], env=env, capture_output=True, timeout=600)
        found = shutil.which("debootstrap")
        if found:
            return found
    raise Unavailable("debootstrap could not be installed with apt-get")


def _copy_host_certificates(root: Path) -> None:
    """This machine's trust store into the root file system: a TLS-inspecting egress signs
    with a CA the Debian bundle lacks, and update-ca-certificates in an image keeps the
    local ones."""
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.exists():
        target = root / "etc/ssl/certs/ca-certificates.crt"
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink():
            target.unlink()
        shutil.copyfile(bundle, target)
    local = Path("/usr/local/share/ca-certificates")
    if local.is_dir():
        dest = root / "usr/local/share/ca-certificates"
        dest.mkdir(parents=True, exist_ok=True)
        for cert in local.glob("*.crt"):
            shutil.copyfile(cert, dest / cert.name)


def build_python_standin(tag: str = PYTHON_STANDIN, workdir: Path | None = None) -> str:
    """debootstrap a Debian bookworm with python3.11 and import it as ``tag``."""
    if os.geteuid() != 0:
        raise Unavailable("building the Python base stand-in (debootstrap) needs root")
    debootstrap = _install_debootstrap()
    mirror = debian_mirror()
    parent = Path(workdir or os.environ.get("CSIST_DOCKER_WORKDIR", "/var/tmp"))
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="csist-rootfs-", dir=parent))
    root = tmp / "root"
    try:
        proc = subprocess.run(
            [
                debootstrap,
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                SUITE,
                str(root),
                mirror,
            ],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if proc.returncode != 0:
            raise Unavailable(f"debootstrap failed ({proc.returncode}): {proc.stdout[-1500:]}{proc.stderr[-1500:]}")
        _copy_host_certificates(root)
        security = mirror.rstrip("/").removesuffix("/debian") + "/debian-security"
        (root / "etc/apt/sources.list").write_text(
            f"deb {mirror} {SUITE} main\ndeb {mirror} {SUITE}-updates main\ndeb {security} {SUITE}-security main\n"
        )
        bin_dir = root / "usr/local/bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        for name in ("python", "python3"):  # the official image's names
            link = bin_dir / name
            if link.exists() or link.is_symlink():
                link.unlink()
            link.symlink_to("/usr/bin/python3.11")
        pip = bin_dir / "pip"
        pip.write_text('#!/bin/sh\nexec python3.11 -m pip "$@"\n')
        pip.chmod(0o755)
        # an image starts with empty apt lists and no package cache, like the official one
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (root / sub).glob("*"):
                if item.is_file():
                    item.unlink()
        changes = [
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            # Debian marks its Python externally managed (PEP 668); the official image's
            # pip installs system-wide, so this one does too
            "ENV PIP_BREAK_SYSTEM_PACKAGES=1",
            # pip's own certificate bundle lacks the egress CA copied in above
            "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
            "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
            'CMD ["python3"]',
        ]
        args = [a for c in changes for a in ("--change", c)]
        tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            [shutil.which("docker") or "docker", "import", *args, "-", tag],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            timeout=900,
        )
        tar.stdout.close()
        tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            raise RuntimeError(f"docker import failed: {imported.stderr[-2000:]}")
        return tag
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_python_base() -> str:
    """The PYTHON_IMAGE to build with: $CSIST_DOCKER_PYTHON_IMAGE, else the Dockerfile's
    default when it is here or can be pulled, else the Debian stand-in (made once)."""
    chosen = os.environ.get("CSIST_DOCKER_PYTHON_IMAGE")
    if chosen:
        if not try_pull(chosen):
            raise Unavailable(f"CSIST_DOCKER_PYTHON_IMAGE={chosen} is neither here nor pullable")
        return chosen
    if try_pull(PYTHON_IMAGE):
        return PYTHON_IMAGE
    if not image_exists(PYTHON_STANDIN):
        build_python_standin()
    return PYTHON_STANDIN


# The official nginx image's template step (docker-entrypoint.d/20-envsubst-on-templates.sh):
# only variables defined in the environment are substituted, so nginx's own $variables stay.
NGINX_ENTRYPOINT = r"""#!/bin/sh
set -eu
templates=/etc/nginx/templates
out="${NGINX_ENVSUBST_OUTPUT_DIR:-/etc/nginx/conf.d}"
defined=$(printf '${%s} ' $(env | cut -d= -f1))
if [ -d "$templates" ]; then
    for t in "$templates"/*.template; do
        [ -e "$t" ] || continue
        envsubst "$defined" < "$t" > "$out/$(basename "$t" .template)"
    done
fi
if [ "$#" -eq 0 ]; then
    set -- nginx -g 'daemon off;'
fi
exec "$@"
"""

NGINX_DOCKERFILE = """\
ARG BASE
FROM ${BASE}
RUN apt-get update \\
    && apt-get install -y --no-install-recommends nginx-light gettext-base wget \\
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/* \\
    && ln -sf /dev/stdout /var/log/nginx/access.log \\
    && ln -sf /dev/stderr /var/log/nginx/error.log
COPY entrypoint.sh /docker-entrypoint.sh
RUN chmod 0755 /docker-entrypoint.sh
EXPOSE 80
STOPSIGNAL SIGQUIT
ENTRYPOINT ["/docker-entrypoint.sh"]
"""


def ensure_nginx_image(python_base: str | None = None) -> str:
    """The gateway's image: $CSIST_DOCKER_NGINX_IMAGE, nginx:1.27-alpine when here or
    pullable, else Debian's nginx on the Debian stand-in (built once)."""
    chosen = os.environ.get("CSIST_DOCKER_NGINX_IMAGE")
    if chosen:
        return chosen
    if try_pull(NGINX_IMAGE):
        return NGINX_IMAGE
    if image_exists(NGINX_STANDIN):
        return NGINX_STANDIN
    base = python_base or ensure_python_base()
    with tempfile.TemporaryDirectory(prefix="csist-nginx-") as ctx:
        Path(ctx, "Dockerfile").write_text(NGINX_DOCKERFILE)
        Path(ctx, "entrypoint.sh").write_text(NGINX_ENTRYPOINT)
        docker(
            "build",
            *build_network_args(),
            "--build-arg",
            f"BASE={base}",
            "-t",
            NGINX_STANDIN,
            ctx,
            timeout=900,
            env={**os.environ, "DOCKER_BUILDKIT": "0"},
        )
    return NGINX_STANDIN


def compose_command() -> list[str]:
    """``docker compose`` (the v2 plugin) when it works, else Debian's ``docker-compose``
    (installed here when missing and apt can)."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for args in (
            ["install", "-y", "-q", "docker-compose"],
            ["update", "-q"],
            ["install", "-y", "-q", "docker-compose"],
        ):
            subprocess.run(["apt-get", *args], env=env, capture_output=True, timeout=600)
            if shutil.which("docker-compose"):
                break
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise Unavailable("neither `docker compose` nor `docker-compose` is available")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="start a Docker engine and make the base images the deployment tests need",
    )
    p.add_argument(
        "what",
        choices=["daemon", "python-base", "nginx-image", "compose", "all"],
        help="daemon: start dockerd if no engine answers; python-base / nginx-image: print the "
        "image to use (made from Debian packages when the registry is out of reach); compose: "
        "print the compose command",
    )
    args = p.parse_args(argv)
    try:
        if args.what in ("daemon", "all"):
            print(ensure_daemon())
        if args.what in ("python-base", "all"):
            print(ensure_python_base())
        if args.what in ("nginx-image", "all"):
            print(ensure_nginx_image())
        if args.what in ("compose", "all"):
            print(" ".join(compose_command()))
    except Unavailable as exc:
        print(f"unavailable: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
