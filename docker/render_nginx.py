#!/usr/bin/env python3
"""Write docker/nginx.conf for a given list of replicas (hosts without Docker, and the tests).

    python docker/render_nginx.py --upstream 10.0.0.5:8000 --upstream 10.0.0.6:8000 \\
        --port 8080 > /etc/nginx/nginx.conf

The template's ``${NGINX_PORT}`` becomes ``--port`` and the line holding ``${UNMIXER_UPSTREAM}``
is written once per ``--upstream``. Nothing else changes (nginx's own ``$variables`` stay), so
the rendered file is exactly what the compose set-up runs. Standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "nginx.conf"
UPSTREAM_VAR = "${UNMIXER_UPSTREAM}"
PORT_VAR = "${NGINX_PORT}"
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}$|^unix:/\S+$")


def render(template: str, upstreams: list[str], port: int) -> str:
    """The configuration for ``upstreams`` (host:port each) with nginx listening on ``port``."""
    if not upstreams:
        raise ValueError("at least one upstream is needed")
    for address in upstreams:
        if not _ADDRESS.match(address):
            raise ValueError(f"not a host:port address: {address!r}")
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {port}")
    out: list[str] = []
    seen = set()
    for line in template.splitlines(keepends=True):
        if line.lstrip().startswith("#"):  # comments stay as they are
            out.append(line)
        elif UPSTREAM_VAR in line:
            seen.add(UPSTREAM_VAR)
            out += [line.replace(UPSTREAM_VAR, address) for address in upstreams]
        else:
            if PORT_VAR in line:
                seen.add(PORT_VAR)
            out.append(line.replace(PORT_VAR, str(port)))
    missing = {UPSTREAM_VAR, PORT_VAR} - seen
    if missing:
        raise ValueError(f"the template does not use {', '.join(sorted(missing))}")
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="render docker/nginx.conf for a list of replicas")
    p.add_argument("--upstream", action="append", default=[], help="a replica's host:port (repeat the flag)")
    p.add_argument("--port", type=int, default=8080, help="port nginx listens on")
    p.add_argument("--template", type=Path, default=TEMPLATE, help="the nginx.conf template")
    p.add_argument("--out", type=Path, default=None, help="output file (default: stdout)")
    args = p.parse_args(argv)
    try:
        text = render(args.template.read_text(encoding="utf-8"), args.upstream, args.port)
    except ValueError as exc:
        p.error(str(exc))
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
