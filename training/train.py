"""Train DeRefNet on SeqCSIST-format data.

    csist simulate --out data/seqcsist --trajectories 5000 --seed 0
    csist train --data data/seqcsist --out runs/derefnet --epochs 2
    csist train --data data/seqcsist --out runs/derefnet --resume runs/derefnet/last.pt

One step = ``--batch`` whole 20-frame trajectories (the paper's batch of 20 frames is one
trajectory): every frame is encoded once and the 16 full windows share the encodings. Adam with
the SeqCSIST loss (regression + beta * constraint + gamma * alignment). Validation CSO-mAP on a
fixed val subset every ``--val-every`` steps and at the end of each epoch. ``last.pt`` (written
every ``--save-every`` steps and on exit, also on Ctrl-C / SIGTERM) resumes the run exactly where
it stopped, mid-epoch included; ``best.pt`` keeps the best validation mAP.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training.data import concat_splits, conditioned, hr_maps, read_split, window_middles
from training.evaluate import detections, middle_truth, predict_trajectories, score
from training.model import DeRefNet, DeRefNetConfig, LossWeights, count_parameters, derefnet_loss, fit_qinit

WINDOW = 5


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def middle_hr_truth(split) -> np.ndarray:
    """HR maps of every full window's middle frame: (n_traj, T-4, 33, 33) float32."""
    mids = window_middles(split.frames.shape[1], WINDOW)
    flat = [split.targets[t][i] for t in range(split.n_trajectories) for i in mids]
    maps = hr_maps(flat)
    return maps.reshape(split.n_trajectories, len(mids), *maps.shape[1:])


def validate(model, split, threshold: float = 70.0, refine: str = "none") -> dict:
    maps = predict_trajectories(model, split.frames)
    return score(detections(maps, threshold, refine), middle_truth(split))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="csist train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        type=Path,
        help="data set root(s) with train/ and val/ splits; several are trained on together (their "
        "trajectories concatenated, e.g. SeqCSIST-protocol and field data)",
    )
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from this checkpoint's weights and config (fresh optimizer and step count, unlike --resume)",
    )
    p.add_argument("--out", required=True, type=Path, help="run directory for checkpoints and logs")
    p.add_argument(
        "--epochs", type=float, default=1.0, help="passes over the training trajectories (fractions allowed)"
    )
    p.add_argument(
        "--lr",
        type=float,
        default=1e-4,
        help="Adam learning rate (paper: 1e-4); on --resume the stored rate is kept unless --lr-min is set",
    )
    p.add_argument(
        "--lr-min", type=float, default=None, help="cosine-decay the lr to this value over the run (default: constant)"
    )
    p.add_argument("--batch", type=int, default=1, help="trajectories per step (1 = the paper's 20 frames)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation and shuffling")
    p.add_argument("--resume", type=Path, default=None, help="checkpoint to resume from (e.g. RUN/last.pt)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training trajectories")
    p.add_argument("--val-trajectories", type=int, default=50, help="val subset size for validation mAP")
    p.add_argument(
        "--val-refine",
        default="none",
        choices=("none", "centroid"),
        help="peak refinement for the validation mAP that picks best.pt (default: cell centres, as the reference "
        "metric)",
    )
    p.add_argument("--val-every", type=int, default=500, help="validate every N steps (and at each epoch end)")
    p.add_argument("--save-every", type=int, default=100, help="write last.pt every N steps")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (saving last.pt) after this many minutes")
    p.add_argument("--zeta", type=float, default=LossWeights.zeta, help="regression loss weight (paper: 1)")
    p.add_argument("--beta", type=float, default=LossWeights.beta, help="constraint loss weight (paper: 0.01)")
    p.add_argument("--gamma", type=float, default=LossWeights.gamma, help="alignment loss weight (paper: 0.01)")
    p.add_argument("--stages", type=int, default=DeRefNetConfig.stages, help="unfolded ISTA stages")
    p.add_argument("--channels", type=int, default=DeRefNetConfig.channels, help="feature channels")
    p.add_argument("--res-blocks", type=int, default=DeRefNetConfig.res_blocks, help="fusion residual blocks")
    return p


class Stop:
    """Turns SIGTERM/SIGINT into a clean stop at the next step boundary."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.init is not None and args.resume is not None:
        raise SystemExit("csist train: --init and --resume exclude each other (--resume continues a run)")
    # the network learns on the frames the service gives it: background planes removed
    train = conditioned(concat_splits([read_split(d, "train", limit=args.train_limit) for d in args.data]))
    val = conditioned(concat_splits([read_split(d, "val", limit=args.val_trajectories) for d in args.data]))
    truth = middle_hr_truth(train)  # (n, 16, 33, 33)

    ckpt = torch.load(args.resume, map_location="cpu", weights_only=False) if args.resume else None
    init = torch.load(args.init, map_location="cpu", weights_only=False) if args.init else None
    if ckpt or init:
        cfg = DeRefNetConfig(**(ckpt or init)["config"])
    else:
        cfg = DeRefNetConfig(stages=args.stages, channels=args.channels, res_blocks=args.res_blocks)
    torch.manual_seed(args.seed)
    model = DeRefNet(cfg)
    if ckpt or init:
        model.load_state_dict((ckpt or init)["model"])
    else:
        all_frames = train.frames.reshape(-1, *train.frames.shape[2:])
        all_maps = hr_maps([t for traj in train.targets for t in traj])
        model.encoder.qinit.copy_(torch.from_numpy(fit_qinit(all_frames, all_maps)))
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    if ckpt:
        opt.load_state_dict(ckpt["optimizer"])
    weights = LossWeights(args.zeta, args.beta, args.gamma)

    n = train.n_trajectories
    steps_per_epoch = math.ceil(n / args.batch)
    # The epoch permutations and step positions depend on these: a resume must keep them.
    layout = {"batch": args.batch, "train_trajectories": n, "seed": args.seed}
    if ckpt and ckpt["state"].get("layout", layout) != layout:
        raise SystemExit(
            f"--resume: the run was made with {ckpt['state']['layout']}, not {layout}; "
            "keep --batch, --train-limit and --seed when resuming"
        )
    total_steps = max(1, round(args.epochs * steps_per_epoch))
    state = ckpt["state"] if ckpt else {"step": 0, "best_map": -1.0, "train_seconds": 0.0, "history": []}
    state["layout"] = layout
    if init is not None and "init" not in state:
        state["init"] = {
            "checkpoint": str(args.init),
            "step": init["state"]["step"],
            "commands": init["state"].get("commands", []),
        }
    command = "csist train " + " ".join(sys.argv[2:] if argv is None else argv)
    state.setdefault("commands", []).append(command)
    stop = Stop()
    start = time.time()
    seconds_before = state["train_seconds"]

    def save(name: str, extra: dict | None = None) -> None:
        state["train_seconds"] = seconds_before + time.time() - start
        payload = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "config": cfg.to_dict(),
            "loss_weights": asdict(weights),
            "state": state,
            "args": {
                k: [str(x) for x in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v
                for k, v in vars(args).items()
            },
            "command": command,
            "hardware": {
                "device": str(device),
                "threads": torch.get_num_threads(),
                "machine": platform.machine(),
                "cpu": platform.processor(),
            },
            "parameters": count_parameters(model),
            **(extra or {}),
        }
        tmp = args.out / f".{name}.tmp"
        torch.save(payload, tmp)
        tmp.replace(args.out / name)

    def run_validation() -> dict:
        r = validate(model, val, refine=args.val_refine)
        entry = {"step": state["step"], "val_mAP": r["mAP"], "val_count_accuracy": r["count_accuracy"]}
        state["history"].append(entry)
        tqdm.write(json.dumps(entry))
        if r["mAP"] > state["best_map"]:
            state["best_map"] = r["mAP"]
            save("best.pt", {"val": r})
        return r

    bar = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True)
    while state["step"] < total_steps and not stop.requested:
        epoch, pos = divmod(state["step"], steps_per_epoch)
        order = np.random.default_rng([args.seed, epoch]).permutation(n)
        idx = order[pos * args.batch : (pos + 1) * args.batch]
        if args.lr_min is not None:
            frac = state["step"] / max(1, total_steps - 1)
            for g in opt.param_groups:
                g["lr"] = args.lr_min + 0.5 * (args.lr - args.lr_min) * (1 + math.cos(math.pi * frac))
        frames = torch.from_numpy(train.frames[idx]).to(device)
        target = torch.from_numpy(truth[idx]).to(device)
        loss, parts = derefnet_loss(model, frames, target, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["step"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.5f}", reg=f"{parts['reg']:.5f}", epoch=epoch)
        if state["step"] % 20 == 0:
            state.setdefault("losses", []).append([state["step"], loss.item(), parts["reg"]])
        # validate first, so that the last.pt written at this step knows a new best
        if state["step"] % args.val_every == 0 or state["step"] % steps_per_epoch == 0:
            run_validation()
        if state["step"] % args.save_every == 0:
            save("last.pt")
        if args.max_minutes and time.time() - start > 60 * args.max_minutes:
            tqdm.write(f"time limit of {args.max_minutes} min reached")
            break
    bar.close()
    if state["best_map"] < 0 or not state["history"] or state["history"][-1]["step"] != state["step"]:
        run_validation()
    save("last.pt")
    print(
        f"stopped at step {state['step']}/{total_steps}; best val mAP {state['best_map']:.2f}; "
        f"train time {state['train_seconds'] / 3600:.2f} h; checkpoints in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
