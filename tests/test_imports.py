"""The import rules of the project, read from the sources (every import, also those inside
functions and ``TYPE_CHECKING`` blocks):

- ``service`` (the runtime) never imports torch, torchvision, ``training``, ``bench`` or
  ``csist``; ``training`` may import ``service``, never the other way round;
- inside ``service`` a layer imports only its own layer or the ones below it:
  science, kernels < modelpkg < engine < runtime < api; the settings, metrics, logs and plan
  names are the foundation every layer may import (and they import only each other);
- no import cycles among the project's modules;
- the ONNX-only tools (``csist split-head``, ``split-amx``, ``quantize``) load without torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("service", "training", "bench", "csist")
LAYERS = {"science": 0, "kernels": 0, "modelpkg": 1, "engine": 2, "runtime": 3, "api": 4}
FOUNDATION = {
    "service.runtime.config",
    "service.runtime.metrics",
    "service.runtime.logs",
    "service.engine.names",
    "service.science.physics",  # the sensor's constants and forward model (numpy and scipy only)
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(path: Path, name: str) -> set[str]:
    """Every module named by an import statement of the file (absolute; relative resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = sources()
    out = {}
    for name, path in mods.items():
        deps = set()
        for imported in imports_of(path, name):
            # the longest project module the import names (a name imported from a module is not one)
            parts = imported.split(".")
            for k in range(len(parts), 0, -1):
                candidate = ".".join(parts[:k])
                if candidate in mods:
                    if candidate != name and not name.startswith(candidate + "."):
                        deps.add(candidate)
                    break
        out[name] = deps
    return out


def test_service_imports_no_torch_and_nothing_above_it():
    bad = []
    for name, path in sources().items():
        if not name.startswith("service"):
            continue
        for imported in imports_of(path, name):
            top = imported.split(".")[0]
            if top in ("torch", "torchvision", "training", "bench", "csist"):
                bad.append(f"{name} imports {imported}")
    assert not bad, bad


def test_service_layers_import_only_downwards(graph):
    bad = []
    for name, deps in graph.items():
        parts = name.split(".")
        if parts[0] != "service" or len(parts) < 2 or parts[1] not in LAYERS:
            continue
        for dep in deps:
            dparts = dep.split(".")
            if dparts[0] != "service" or len(dparts) < 2:
                continue
            if dparts[1] not in LAYERS:
                bad.append(f"{name} imports {dep}, which is in no layer")
            elif name in FOUNDATION and dep not in FOUNDATION:
                bad.append(f"{name} (foundation) imports {dep}")
            elif dep not in FOUNDATION and LAYERS[dparts[1]] > LAYERS[parts[1]]:
                bad.append(f"{name} ({parts[1]}) imports {dep} ({dparts[1]}), a layer above it")
    assert not bad, bad


def test_no_import_cycles(graph):
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_onnx_only_tools_load_without_torch():
    code = (
        "import sys; import training.split_head, training.split_amx, training.quantize; "
        "sys.exit('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"torch was imported: {proc.stderr}"


def test_the_rules_see_a_violation(tmp_path):
    """The reader finds imports inside functions and relative ones (or the rules check nothing)."""
    f = tmp_path / "mod.py"
    f.write_text("def f():\n    import torch\n    from .peaks import x\n")
    assert {"torch", "service.science.peaks", "service.science.peaks.x"} <= imports_of(f, "service.science.mod")
