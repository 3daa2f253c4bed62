"""Helpers of the deployment tests: read Dockerfiles and .dockerignore the way Docker does,
replay a Dockerfile's install steps outside Docker, find (or install) nginx, pick the model.

Most machines that run the default suite have no Docker engine, so these tests check the files
by running what can run without one: the Dockerfile's pip steps in a fresh virtual environment
laid out like the image's file system, its entry point and health check from there, and nginx
with the project's configuration on loopback. tests/docker/test_engine.py (marker ``docker``,
``make test-docker``) builds and runs the images on a real engine (tests/docker/engine.py).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
BUNDLED_MODEL = REPO / "models" / "derefnet"  # the bundled model's folder

# RUN steps the emulation executes (they only install Python packages); every other RUN step
# must start with one of the system commands below (users, apt), which a test checks.
PYTHON_COMMANDS = ("python", "pip")
SYSTEM_COMMANDS = ("apt-get", "groupadd", "useradd", "chown", "chmod", "mkdir", "rm", "ln")


# ------------------------------------------------------------------------------ Dockerfile


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    flags: dict[str, str]  # leading --name=value options (--mount, --chmod, --interval, ...)
    body: str  # the rest of the line(s), continuations joined

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form of the arguments, or None for the shell form."""
        import json

        text = self.body.strip()
        if not text.startswith("["):
            return None
        return json.loads(text)


def _join_lines(text: str) -> list[str]:
    """Logical lines: comments dropped, backslash continuations joined (as Docker does)."""
    logical, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):
            continue  # a comment, also inside a continued instruction
        if not stripped and not current:
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1].rstrip() + " "
            continue
        current += stripped
        if current.strip():
            logical.append(current.strip())
        current = ""
    if current.strip():
        logical.append(current.strip())
    return logical


_FLAG = re.compile(r"^--([a-z-]+)(?:=(\S+))?\s+")


def parse_dockerfile(path: Path) -> list[Instruction]:
    out = []
    for line in _join_lines(Path(path).read_text(encoding="utf-8")):
        keyword, _, rest = line.partition(" ")
        flags = {}
        rest = rest.strip()
        while (m := _FLAG.match(rest)) is not None:
            flags[m.group(1)] = m.group(2) or ""
            rest = rest[m.end() :]
        out.append(Instruction(keyword.upper(), flags, rest))
    return out


def base_image(instructions: list[Instruction]) -> str:
    """The FROM image with ARG defaults substituted."""
    args = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            name, _, default = ins.body.partition("=")
            args[name.strip()] = default.strip()
        if ins.keyword == "FROM":
            image = ins.body.split()[0]
            return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), image)
    raise ValueError("no FROM")


def env_pairs(instruction: Instruction) -> dict[str, str]:
    """``ENV A=1 B=2`` -> {"A": "1", "B": "2"}."""
    pairs = {}
    for token in shlex.split(instruction.body):
        name, sep, value = token.partition("=")
        if not sep:
            raise ValueError(f"ENV without '=': {instruction.body!r}")
        pairs[name] = value
    return pairs


def run_commands(instructions: list[Instruction]) -> list[str]:
    return [ins.body for ins in instructions if ins.keyword == "RUN"]


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The build stages, each from its FROM on (ARGs before the first FROM are left out)."""
    out: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            out.append([ins])
        elif out:
            out[-1].append(ins)
    return out


def stage_name(stage: list[Instruction]) -> str | None:
    """``FROM image AS name`` -> name."""
    words = stage[0].body.split()
    return words[2] if len(words) == 3 and words[1].lower() == "as" else None


# Dockerfile syntax the classic builder rejects or misreads (BuildKit's frontend only):
# instruction flags, heredocs, and the parser directive that pulls a frontend image.
BUILDKIT_ONLY_FLAGS = {
    "RUN": {"mount", "network", "security"},
    "COPY": {"chmod", "link", "parents", "exclude"},
    "ADD": {"chmod", "link", "parents", "exclude", "checksum", "keep-git-dir"},
}


def buildkit_only_syntax(path: Path) -> list[str]:
    """What in a Dockerfile needs BuildKit; [] when the classic builder builds it too."""
    text = Path(path).read_text(encoding="utf-8")
    found = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break  # parser directives come first, before any instruction or blank line
        if re.match(r"#\s*syntax\s*=", line, re.I):
            found.append(f"parser directive {line.strip()!r}")
    if re.search(r"<<-?\s*[\"']?[A-Za-z_]\w*", "\n".join(_join_lines(text))):
        found.append("a heredoc (<<)")
    for ins in parse_dockerfile(path):
        bad = set(ins.flags) & BUILDKIT_ONLY_FLAGS.get(ins.keyword, set())
        found += [f"{ins.keyword} --{flag}" for flag in sorted(bad)]
    return found


def is_python_step(command: str) -> bool:
    return command.split()[0] in PYTHON_COMMANDS


# ------------------------------------------------------------------------------ .dockerignore


def _glob_regex(pattern: str) -> re.Pattern:
    """Docker's pattern syntax: ``*`` and ``?`` within a path segment, ``**`` across segments."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
                out.append("(?:.*/)?")
            else:
                out.append(".*")
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.index("]", i)
            out.append(pattern[i : j + 1])
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("^" + "".join(out) + "$")


class DockerIgnore:
    """Which paths of the build context a .dockerignore keeps out (the last match decides)."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
            self.rules.append((negate, _glob_regex(pattern)))

    @classmethod
    def of(cls, context: Path) -> DockerIgnore:
        path = Path(context) / ".dockerignore"
        return cls(path.read_text(encoding="utf-8") if path.exists() else "")

    def excluded(self, relpath: str) -> bool:
        parts = Path(relpath).parts
        candidates = ["/".join(parts[: k + 1]) for k in range(len(parts))]  # path and parents
        result = False
        for negate, regex in self.rules:
            if any(regex.match(c) for c in candidates):
                result = not negate
        return result


# ------------------------------------------------------------------------------ emulation


@dataclass
class Emulation:
    """A Dockerfile's steps replayed in ``root`` (the image's "/") with ``venv``'s Python."""

    context: Path
    root: Path
    venv: Path
    env: dict[str, str] = field(default_factory=dict)  # ENV of the image, paths mapped
    workdir: Path | None = None
    executed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    user: str | None = None
    entrypoint: list[str] | None = None
    healthcheck: list[str] | None = None
    log: list[str] = field(default_factory=list)

    def map_path(self, path: str) -> Path:
        """An absolute path of the image inside ``root``; a relative one inside WORKDIR."""
        if path.startswith("/"):
            return self.root / path.lstrip("/")
        return (self.workdir or self.root) / path

    def process_env(self) -> dict[str, str]:
        """The environment of a process in the "image": its ENV, its PATH, no CSIST_* leaks."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CSIST_", "VIRTUAL_ENV"))}
        env.pop("PYTHONPATH", None)
        env.update(self.env)
        env["PATH"] = os.pathsep.join(
            [str(self.venv / "bin"), str(self.root / "usr/local/bin"), os.environ.get("PATH", "")]
        )
        return env

    def _copy(self, ins: Instruction, ignore: DockerIgnore) -> None:
        tokens = ins.exec_form() or shlex.split(ins.body)
        sources, dest = tokens[:-1], tokens[-1]
        target = self.map_path(dest)
        to_dir = dest.endswith("/") or len(sources) > 1
        for src in sources:
            rel = os.path.normpath(src)
            path = self.context / rel
            if not path.exists():
                raise FileNotFoundError(f"COPY source {src} does not exist in the context")
            if ignore.excluded(rel):
                raise FileNotFoundError(f"COPY source {src} is excluded by .dockerignore")
            if path.is_dir():
                for file in sorted(path.rglob("*")):
                    frel = file.relative_to(self.context).as_posix()
                    if file.is_dir() or ignore.excluded(frel):
                        continue
                    out = target / file.relative_to(path)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, out)
                target.mkdir(parents=True, exist_ok=True)
            else:
                out = target / path.name if to_dir else target
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out)
                if "chmod" in ins.flags:
                    out.chmod(int(ins.flags["chmod"], 8))

    def run(self, instructions: list[Instruction], timeout: float = 600) -> None:
        """Replay the instructions; python/pip RUN steps execute, system steps are skipped."""
        ignore = DockerIgnore.of(self.context)
        for ins in instructions:
            if ins.keyword == "WORKDIR":
                self.workdir = self.map_path(ins.body.strip())
                self.workdir.mkdir(parents=True, exist_ok=True)
            elif ins.keyword == "COPY" and "from" in ins.flags:
                # another stage's files: the build stage's venv, which self.venv already is
                self.skipped.append(f"COPY --from={ins.flags['from']} {ins.body}")
            elif ins.keyword == "COPY":
                self._copy(ins, ignore)
            elif ins.keyword == "ENV":
                for name, value in env_pairs(ins).items():
                    if name in ("PATH", "VIRTUAL_ENV"):
                        continue  # the venv plays the image's Python; PATH is set per process
                    self.env[name] = str(self.map_path(value)) if value.startswith("/") else value
            elif ins.keyword == "RUN":
                if not is_python_step(ins.body):
                    self.skipped.append(ins.body)
                    continue
                started = time.monotonic()
                proc = subprocess.run(
                    ["/bin/sh", "-c", ins.body],
                    cwd=self.workdir,
                    env=self.process_env(),
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                )
                self.log.append(f"RUN {ins.body} ({time.monotonic() - started:.1f} s)")
                if proc.returncode != 0:
                    raise RuntimeError(
                        f"RUN {ins.body!r} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
                    )
                self.executed.append(ins.body)
            elif ins.keyword == "USER":
                self.user = ins.body.strip()
            elif ins.keyword == "ENTRYPOINT":
                self.entrypoint = ins.exec_form()
            elif ins.keyword == "HEALTHCHECK":
                body = ins.body.strip()
                assert body.startswith("CMD "), body
                self.healthcheck = Instruction("CMD", {}, body[4:]).exec_form()


# ------------------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> bool:
    """Poll ``url`` until it answers 200 (False on timeout or if ``proc`` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            if http_get(url, timeout=2.0)[0] == 200:
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def find_nginx() -> str | None:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx", "/usr/local/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def install_nginx(timeout: float = 300.0) -> tuple[str | None, str]:
    """nginx from Debian's packages when it is missing: (path, "") or (None, why not)."""
    found = find_nginx()
    if found:
        return found, ""
    apt = shutil.which("apt-get")
    if apt is None:
        return None, "nginx is not installed and there is no apt-get to install it"
    if os.geteuid() != 0:
        return None, "nginx is not installed and installing it needs root"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    reasons = []

    def apt_get(*args: str) -> bool:
        try:
            proc = subprocess.run([apt, *args], env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            reasons.append(f"apt-get {' '.join(args)} timed out")
            return False
        if proc.returncode != 0:
            reasons.append(f"apt-get {' '.join(args)}: {proc.stderr.strip()[-300:]}")
        return proc.returncode == 0

    for refresh in (False, True):
        if refresh:
            apt_get("update", "-q")
        for package in ("nginx-light", "nginx"):
            if apt_get("install", "-y", "-q", "--no-install-recommends", package) and find_nginx():
                return find_nginx(), ""
    return None, "could not install nginx: " + " | ".join(reasons)


def model_path(tmp_factory) -> Path:
    """The model the tests serve: $CSIST_TEST_MODEL if set (a candidate), else the bundled
    models/derefnet when it is there, else the stand-in of the service tests."""
    explicit = os.environ.get("CSIST_TEST_MODEL")
    if explicit:
        return Path(explicit).resolve()
    if (BUNDLED_MODEL / "manifest.json").is_file():
        return BUNDLED_MODEL
    from tests.service.conftest import standin_weights, write_standin

    return write_standin(tmp_factory.mktemp("model"), standin_weights())
