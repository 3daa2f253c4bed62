#!/usr/bin/env python3
"""Print the service's pip requirements, read from pyproject.toml: the one list of them.

    python docker/requirements.py pyproject.toml > requirements.txt          # CPU image
    python docker/requirements.py --gpu pyproject.toml > requirements.txt    # GPU image

The images install exactly ``[project.dependencies]`` (the runtime: no torch, no extras), so a
dependency added to pyproject.toml reaches the images with no second list to keep in step.
``--gpu`` swaps ``onnxruntime`` for the ``gpu`` extra (``onnxruntime-gpu``): the two packages
install the same ``onnxruntime`` module and must never share an environment. Standard library
only (it runs before anything is installed).
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

CPU_RUNTIME = "onnxruntime"  # the dependency the gpu extra replaces


def requirement_name(requirement: str) -> str:
    """Normalised project name of a requirement string (PEP 503): 'Foo_Bar[x]>=1' -> 'foo-bar'."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: Path, gpu: bool = False) -> list[str]:
    """The runtime requirements of the project; with ``gpu`` the ONNX Runtime GPU build."""
    project = tomllib.loads(Path(pyproject).read_text(encoding="utf-8"))["project"]
    deps = list(project["dependencies"])
    if gpu:
        deps = [d for d in deps if requirement_name(d) != CPU_RUNTIME]
        deps += project["optional-dependencies"]["gpu"]
    return deps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="print the service's requirements from pyproject.toml")
    p.add_argument("pyproject", nargs="?", default="pyproject.toml", help="path of pyproject.toml")
    p.add_argument("--gpu", action="store_true", help="onnxruntime-gpu instead of onnxruntime")
    args = p.parse_args(argv)
    print("\n".join(requirements(Path(args.pyproject), gpu=args.gpu)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
