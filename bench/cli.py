"""``csist bench``: speed, accuracy and field-condition benchmarks.

csist bench speed --model models/derefnet.onnx --out bench/results/speed.json --markdown bench/results/speed.md
csist bench accuracy --model models/derefnet.onnx --out bench/results/accuracy.json --markdown bench/results/accuracy.md
csist bench field --model models/derefnet.onnx --out bench/results/field.json --markdown bench/results/field.md
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from bench import accuracy, field, speed

    p = argparse.ArgumentParser(
        prog="csist bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "speed",
        help="eager vs ONNX vs streaming vs the real server",
        description=speed.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    speed.add_arguments(s)
    s.set_defaults(func=speed.main)
    a = sub.add_parser(
        "accuracy",
        help="CSO-mAP per condition beside the paper's numbers",
        description=accuracy.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    accuracy.add_arguments(a)
    a.set_defaults(func=accuracy.main)
    f = sub.add_parser(
        "field",
        help="CSO-mAP by field condition (backgrounds, brightness, PSF, geometry), network and network + fit",
        description=field.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    field.add_arguments(f)
    f.set_defaults(func=field.main)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
