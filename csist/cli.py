"""The ``csist`` command: one entry point for users.

    csist simulate --out data/seqcsist --trajectories 5000 --seed 0
    csist train --data data/seqcsist --out runs/derefnet
    csist evaluate --model models/derefnet --data data/seqcsist --split test
    csist export --checkpoint runs/derefnet/best.pt --out models/derefnet
    csist quantize --model models/derefnet --out models/derefnet-int8
    csist split-head --model models/derefnet
    csist split-amx --model models/derefnet
    csist migrate-model old/derefnet.onnx --out models/derefnet
    csist serve --host 127.0.0.1 --port 8000
    csist plans --model models/derefnet
    csist bench speed|accuracy|field

Each subcommand is the ``main(argv)`` of its module, imported only when asked for, so that
``csist serve`` works in the service image where torch is not installed.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "simulate": ("training.simulate", "simulate SeqCSIST-protocol or field trajectories to disk"),
    "train": ("training.train", "train DeRefNet on a simulated or published data set"),
    "evaluate": ("training.evaluate", "CSO-mAP of a checkpoint or ONNX model on a split"),
    "export": ("training.export", "export a checkpoint to ONNX: a model folder with its manifest"),
    "quantize": ("training.quantize", "int8 variant of an exported model (static QDQ), a folder of its own"),
    "split-head": ("training.split_head", "cut the head at its DeformConv nodes for the native kernel"),
    "split-amx": ("training.split_amx", "cut encoder and head at their Convs for the bfloat16 AMX kernel"),
    "migrate-model": ("service.modelpkg.migrate", "move a model of the old flat layout (.onnx + .json) into a folder"),
    "serve": ("service.api.server", "run the inference service (FastAPI + ONNX Runtime)"),
    "plans": ("service.engine.cli", "check and time the execution plans of a model on this host"),
    "replay": ("csist.replay", "stream simulated tracks to a running service"),
    "bench": ("bench.cli", "speed, accuracy and field-condition benchmarks"),
}


def usage() -> str:
    lines = ["usage: csist COMMAND [--help] [ARGS]", "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"csist: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
