"""The documentation stays true to the repository.

- every relative link of the markdown pages (README.md, CHANGELOG.md, docs/, docker/) resolves
  to a file of the repository, and every ``#anchor`` to a heading of that file (GitHub's
  rules); nothing links outside the repository (``../shared/...``);
- docs/configuration.md holds the settings table that scripts/config_docs.py generates from
  ``service.runtime.config.Settings``;
- README.md is the user's page: at most 400 lines;
- every ``CSIST_*`` name in README.md and docs/ is a setting, or one of the few variables
  other programs of the repository read (listed below with the file that reads each).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from service.runtime.config import Settings

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MAX_README_LINES = 400

# Variables that are not fields of Settings, and the file that reads each.
OTHER_VARIABLES = {
    "CSIST_HOST": "docker/entrypoint.sh",  # --host of csist serve in the images
    "CSIST_PORT": "docker/entrypoint.sh",  # --port of csist serve in the images
    "CSIST_HEALTHCHECK_TIMEOUT_S": "docker/healthcheck.py",
    "CSIST_REPLICAS": "docker-compose.yml",
    "CSIST_PUBLISH": "docker-compose.yml",
    "CSIST_GATEWAY_PUBLISH": "docker-compose.yml",
    "CSIST_DOCKER_TESTS": "tests/docker/conftest.py",
    "CSIST_DOCKER_PYTHON_IMAGE": "tests/docker/engine.py",
    "CSIST_DOCKER_NGINX_IMAGE": "tests/docker/engine.py",
    "CSIST_DOCKER_CUDA_IMAGE": "tests/docker/test_engine.py",
    "CSIST_DOCKER_GPU_BUILD": "tests/docker/test_engine.py",
    "CSIST_DOCKER_TAG": "tests/docker/test_engine.py",
    "CSIST_DOCKER_STATE": "tests/docker/engine.py",
    "CSIST_DOCKERD_LOG": "tests/docker/engine.py",
    "CSIST_DOCKER_WORKDIR": "tests/docker/engine.py",
    "CSIST_DEBIAN_MIRROR": "tests/docker/engine.py",
    "CSIST_TEST_MODEL": "tests/docker/support.py",
    "CSIST_GPU_VENV": "bench/gpu.sh",
}

# Pages that no longer exist (or never were in the repository); nothing may point at them.
GONE = ("docs/service.md", "docs/deploy.md", "DESIGN.md")


def pages() -> list[Path]:
    found = [README, REPO / "CHANGELOG.md"]
    for folder in ("docs", "docker"):
        found += sorted((REPO / folder).rglob("*.md"))
    return [p for p in found if p.exists()]


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every markdown link and image outside code."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = _INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)
        for match in _LINK.finditer(line):
            found.append((number, match.group(1)))
        ref = _REFERENCE_DEF.match(line)
        if ref:
            found.append((number, ref.group(1)))
    return found


def github_anchor(heading: str) -> str:
    """GitHub's id of a heading: the rendered text, lower case, punctuation removed, spaces
    to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading id of a markdown file, with GitHub's -1, -2 ... for repeated ones."""
    seen: dict[str, int] = {}
    ids = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = re.match(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = github_anchor(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        ids.add(base if n == 0 else f"{base}-{n}")
    for name in re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", path.read_text(encoding="utf-8")):
        ids.add(name)
    return ids


def test_github_anchor_rules():
    assert github_anchor("Set-up: two commands") == "set-up-two-commands"
    assert github_anchor("Forward model (`service/science/physics.py`)") == "forward-model-servicesciencephysicspy"
    assert github_anchor("4.1 Qinit") == "41-qinit"
    assert github_anchor("`WS /ws/unmix`: streaming") == "ws-wsunmix-streaming"


def test_link_extraction_skips_code(tmp_path: Path):
    page = tmp_path / "probe.md"
    page.write_text("see [a](x.md) and `[b](y.md)`\n```\n[c](z.md)\n```\n![img](i.png#top)\n")
    assert [target for _, target in links(page)] == ["x.md", "i.png#top"]


@pytest.mark.parametrize("page", pages(), ids=rel)
def test_relative_links_resolve(page: Path):
    problems = []
    for number, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("//"):
            continue  # http:, https:, mailto: ...
        where = f"{rel(page)}:{number}: {target}"
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        try:
            dest.relative_to(REPO)
        except ValueError:
            problems.append(f"{where}: points outside the repository")
            continue
        if not dest.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor:
            if dest.is_dir() or dest.suffix.lower() != ".md":
                problems.append(f"{where}: an anchor into a file that is not markdown")
            elif anchor not in anchors(dest):
                problems.append(f"{where}: no heading '#{anchor}' in {rel(dest)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", pages(), ids=rel)
def test_no_pointer_to_missing_pages(page: Path):
    text = page.read_text(encoding="utf-8")
    found = [f"{rel(page)}:{n}: {name}" for n, line in enumerate(text.splitlines(), 1) for name in GONE if name in line]
    if "../shared/" in text:
        found.append(f"{rel(page)}: ../shared/")
    assert not found, "pages outside the repository or gone:\n" + "\n".join(found)


def _config_docs():
    spec = importlib.util.spec_from_file_location("config_docs", REPO / "scripts" / "config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_page_is_generated_from_settings():
    config_docs = _config_docs()
    page = config_docs.PAGE.read_text(encoding="utf-8")
    assert page == config_docs.render(page), (
        "docs/configuration.md is out of date with service.runtime.config.Settings; run "
        "python scripts/config_docs.py\n" + "\n".join(config_docs.check())
    )
    table = config_docs.settings_table()
    for name in Settings.model_fields:
        assert f"`CSIST_{name.upper()}`" in table
    assert str(REPO) not in table, "the default paths must be relative to the repository"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES})"


def test_docs_name_only_real_settings():
    settings = {f"CSIST_{name.upper()}" for name in Settings.model_fields}
    unknown = []
    for page in [README, *sorted((REPO / "docs").rglob("*.md"))]:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for name in re.findall(r"\bCSIST_[A-Z][A-Z0-9_]*", line):
                if name not in settings and name not in OTHER_VARIABLES:
                    unknown.append(f"{rel(page)}:{number}: {name}")
    assert not unknown, (
        "not a field of service.runtime.config.Settings nor a known variable of tests/test_docs.py:\n"
        + "\n".join(unknown)
    )


@pytest.mark.parametrize("name", sorted(OTHER_VARIABLES))
def test_other_variables_are_still_read(name: str):
    reader = REPO / OTHER_VARIABLES[name]
    assert name in reader.read_text(encoding="utf-8"), f"{rel(reader)} no longer reads {name}"
