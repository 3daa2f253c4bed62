#!/usr/bin/env python3
"""Container health check: ``csist-healthcheck [PATH]`` exits 0 if the local service answers 200.

GET ``http://127.0.0.1:$CSIST_PORT`` + PATH (default ``/healthz``, the liveness endpoint; the
compose file asks ``/readyz`` so that dependants wait for the warmed-up model). Standard library
only, no proxy, a short timeout: Docker runs it every few seconds.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else "/healthz"
    url = f"http://127.0.0.1:{os.environ.get('CSIST_PORT', '8000')}{path}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=float(os.environ.get("CSIST_HEALTHCHECK_TIMEOUT_S", "3"))) as r:
            return 0 if r.status == 200 else 1
    except Exception as exc:  # refused, timeout, 503 while loading or draining
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
