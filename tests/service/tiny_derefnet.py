"""A tiny real DeRefNet exported by ``csist export`` (single graph + streaming parts), for tests.

stages=1, channels=4, res_blocks=1 keeps the export to a few seconds (channels=32 for the AMX
kernels' tests). The offset convs get small
random weights (they start at zero in training) so that the deformable sampling matters and a
wrong feature order or window would change the answers. Built once per pytest session under
the session's base temp directory and shared by every test module that asks for it. The head's
biases are zeroed and its last conv scaled so that the untrained map has distinct peaks of
O(100) at the targets (a random head gives a near-flat map whose peaks would be ties).
"""

from __future__ import annotations

from pathlib import Path

MODEL_NAME = "derefnet"  # the model folder's name


def write_checkpoint(path: Path, seed: int = 0, channels: int = 4) -> Path:
    """A checkpoint in the trainer's format holding a tiny random DeRefNet."""
    import torch

    from training.model import DeRefNet, DeRefNetConfig, count_parameters

    torch.manual_seed(seed)
    cfg = DeRefNetConfig(stages=1, channels=channels, res_blocks=1)
    model = DeRefNet(cfg)
    with torch.no_grad():
        for conv in (model.head.align.offset1, model.head.align.offset2):
            conv.weight.normal_(0.0, 0.05 * (4 / channels) ** 0.5)  # offsets of O(0.1-1) px
        for name, p in model.head.named_parameters():
            if name.endswith("bias"):
                p.zero_()
        model.head.fusion.body[-1].weight.mul_(1e4 * 4 / channels)
    state = {"step": 1, "train_seconds": 1.0, "history": [], "commands": ["tiny test model"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"model": model.state_dict(), "config": cfg.to_dict(), "state": state, "parameters": count_parameters(model)},
        path,
    )
    return path


def export_tiny(directory: Path, channels: int = 4) -> Path:
    """Export the tiny model with parts into the folder ``directory/derefnet`` (once); return the folder."""
    from training import export

    out = directory / MODEL_NAME
    if (out / "manifest.json").is_file():
        return out
    ckpt = write_checkpoint(directory / "tiny.pt", channels=channels)
    rc = export.main(["--checkpoint", str(ckpt), "--out", str(out), "--parity-windows", "4"])
    assert rc == 0
    return out


def tiny_model_path(tmp_path_factory, channels: int = 4) -> Path:
    """The session's tiny exported model (shared through the session's base temp directory);
    ``channels=32`` gives one whose convolutions the AMX kernel takes."""
    name = "tiny_derefnet" if channels == 4 else f"tiny_derefnet_c{channels}"
    return export_tiny(tmp_path_factory.getbasetemp() / name, channels)
