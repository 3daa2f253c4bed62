"""``csist plans``: the execution plans of a model on this host, checked and timed as the service
does at start-up (``CSIST_PLAN=auto``), printed as a table without serving.

    csist plans                                  # the bundled model, the service's settings
    csist plans --model models/derefnet-int8 --budget 20 --json plans.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from service.engine.names import AUTO, PLANS
from service.engine.plans import PlanOptions
from service.engine.select import select_plan, table
from service.modelpkg.model import ModelError, resolve_providers
from service.runtime.config import DEFAULT_MODEL_PATH, Settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="csist plans", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH, help="model folder (with its manifest.json)")
    p.add_argument("--plan", default=AUTO, choices=(AUTO, *PLANS), help="check one plan only (then it is not timed)")
    p.add_argument(
        "--budget",
        type=float,
        default=Settings.model_fields["plan_budget_s"].default,
        help="seconds for timing the candidates",
    )
    p.add_argument(
        "--providers",
        default=None,
        help="ONNX Runtime providers, comma-separated (default: CSIST_PROVIDERS, i.e. auto)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads per call (default: as the service, 1 per worker on a multi-core CPU)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.budget < 0:
        raise SystemExit("csist plans: --budget must be >= 0")
    settings = Settings(**({"providers": args.providers} if args.providers else {}))
    providers = resolve_providers(settings.provider_list())
    workers, threads = settings.parallelism(cuda="CUDAExecutionProvider" in providers)
    threads = threads if args.threads is None else args.threads
    options = PlanOptions(
        tuple(providers), threads, settings.ort_spinning, settings.ort_graph_level, settings.ort_arena
    )
    try:
        selection = select_plan(args.model, options=options, requested=args.plan, budget_s=args.budget)
    except ModelError as exc:
        print(f"csist plans: {exc}", file=sys.stderr)
        return 1
    report = selection.report()
    host = report["host"]
    print(
        f"{args.model}: plan {report['name']} ({host['cpu']}, {host['isa']}, {host['cpus']} CPUs, "
        f"onnxruntime {host['onnxruntime']}; {workers} worker(s) x {threads or 'default'} thread(s); "
        f"chosen in {report['selection_s']} s)\n"
    )
    print(table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
