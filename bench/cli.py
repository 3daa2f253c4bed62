"""``csist bench``: speed, accuracy and field-condition benchmarks.

csist bench speed --model models/derefnet --out bench/results/speed.json --markdown bench/results/speed.md
csist bench accuracy --model models/derefnet --out bench/results/accuracy.json --markdown bench/results/accuracy.md
csist bench field --model models/derefnet --out bench/results/field.json --markdown bench/results/field.md
csist bench ceiling --field bench/results/field.json --out bench/results/ceiling.json \\
    --markdown bench/results/ceiling.md
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from bench import accuracy, ceiling, field, speed

    p = argparse.ArgumentParser(
        prog="csist bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, module, text in (
        ("speed", speed, "eager vs ONNX vs streaming vs the real server"),
        ("accuracy", accuracy, "CSO-mAP per condition beside the paper's numbers"),
        (
            "field",
            field,
            "CSO-mAP by field condition (backgrounds, brightness, PSF, geometry), network and network + fit",
        ),
        ("ceiling", ceiling, "what each field condition's frames allow: the Cramer-Rao bound and its CSO-mAP"),
    ):
        sp = sub.add_parser(
            name, help=text, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(sp)
        sp.set_defaults(func=module.main)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
