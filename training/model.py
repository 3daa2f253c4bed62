"""DeRefNet: deep unfolding + temporal deformable alignment for sequential CSIST unmixing.

After Zhai et al., "SeqCSIST: Sequential Closely-Spaced Infrared Small Target Unmixing",
IEEE TGRS 2025 (section IV), as specified in docs/method.md section 4:

    LR window (B, 5, 11, 11)
      -> H0 = Qinit @ L per frame                      (least-squares initialisation)
      -> 9 unfolded ISTA stages per frame               (FrameEncoder, ISTA-Net+ style)
      -> x sigmoid(Linear(e_p)) per window position p   (TemporalEncoding)
      -> TDFA: align each neighbour to the middle frame (SelectiveAttention + 2 deformable convs)
      -> residual fusion of middle + 4 aligned frames   (Fusion)
      -> HR map of the middle frame (B, 33, 33)

The per-frame encoder depends on one frame only, so ``encode`` and ``head`` are separate: a
trajectory (or a stream) encodes each frame once and reuses it in the 5 windows that hold it.

All inputs and outputs are in sensor units (LR pixel values 0..255, HR brightness); the network
works on values divided by ``config.scale`` so that the paper's initial threshold (0.01) and
loss weights act on O(1) numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from service.science import physics


@dataclass
class DeRefNetConfig:
    size: int = 11  # LR patch side, pixels
    ratio: int = 3  # unmixing ratio c: HR grid is (ratio*size)^2 = 33x33
    psf_sigma: float = 0.5  # Gaussian PSF sigma used to build Phi, LR pixels
    window: int = 5  # frames per window; the output is the middle frame's HR map
    stages: int = 9  # unfolded ISTA stages per frame
    channels: int = 32  # feature channels of every 3x3 conv
    res_blocks: int = 5  # residual blocks in the fusion
    rho_init: float = 0.5  # initial ISTA gradient step rho_k
    theta_init: float = 0.01  # initial soft threshold theta_k (in scaled units)
    scale: float = 255.0  # sensor units per network unit (8-bit full scale)
    deform: str = "grid_sample"  # "grid_sample" (fast CPU backward, training) | "torchvision"

    @property
    def hr(self) -> int:
        return self.size * self.ratio

    def to_dict(self) -> dict:
        return asdict(self)


def conv3x3(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=bias)


class IstaStage(nn.Module):
    """One unfolded ISTA-Net+ iteration (SeqCSIST eqs. 4-7).

    Gradient step r = h - rho * Phi^T Phi h + rho * Phi^T L, then h' = G~(soft(G(r), theta))
    with G = conv-ReLU-conv a learned sparsifying transform and G~ its learned inverse
    (bias-free, as in ISTA-Net). The symmetry residual G~(G(r)) - r feeds the constraint loss
    only, so inference skips it.

    Phi^T Phi h is computed as (h Phi^T) Phi: two 1089 x 121 products instead of one
    1089 x 1089 (9x fewer multiply-adds, and ONNX Runtime runs it at half the encoder's time).
    soft(g, theta) = g - clip(g, -theta, theta), the same function as sign(g) max(|g| - theta, 0)
    for theta >= 0 in two element-wise ops instead of five (ONNX ``Sign`` alone took 11 % of the
    encoder); theta is kept non-negative, as a threshold must be.
    """

    def __init__(self, cfg: DeRefNetConfig):
        super().__init__()
        c = cfg.channels
        self.hr = cfg.hr
        self.rho = nn.Parameter(torch.tensor(cfg.rho_init))
        self.theta = nn.Parameter(torch.tensor(cfg.theta_init))
        self.forward_transform = nn.Sequential(conv3x3(1, c, False), nn.ReLU(), conv3x3(c, c, False))
        self.inverse_transform = nn.Sequential(conv3x3(c, c, False), nn.ReLU(), conv3x3(c, 1, False))

    def forward(self, h, phi, phitb, with_symmetry: bool = True):
        r = h - self.rho * ((h @ phi.T) @ phi) + self.rho * phitb  # (N, 1089)
        r_img = r.view(-1, 1, self.hr, self.hr)  # (N, 1, 33, 33)
        g = self.forward_transform(r_img)  # (N, C, 33, 33)
        theta = F.relu(self.theta)
        shrunk = g - torch.clamp(g, -theta, theta)
        h_next = self.inverse_transform(shrunk).view(-1, self.hr * self.hr)
        if not with_symmetry:
            return h_next, None
        symmetry = self.inverse_transform(g) - r_img  # (N, 1, 33, 33)
        return h_next, symmetry


class FrameEncoder(nn.Module):
    """LR frames (N, 11, 11) -> stage-9 HR estimates (N, 1089); depends on one frame only."""

    def __init__(self, cfg: DeRefNetConfig):
        super().__init__()
        self.cfg = cfg
        phi = torch.from_numpy(physics.sampling_matrix(cfg.size, cfg.ratio, cfg.psf_sigma)).float()
        self.register_buffer("phi", phi)  # (121, 1089)
        # Least-squares LR -> HR map fitted on training data (see ``fit_qinit``); the
        # pseudo-inverse of Phi is a data-free stand-in until then.
        self.register_buffer("qinit", torch.linalg.pinv(phi))  # (1089, 121)
        self.stages = nn.ModuleList(IstaStage(cfg) for _ in range(cfg.stages))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints before the factored gradient step stored Phi^T Phi, derived from phi.
        state_dict.pop(prefix + "phitphi", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, frames, with_symmetry: bool = True):
        lr = frames.reshape(frames.shape[0], -1) / self.cfg.scale  # (N, 121)
        phitb = lr @ self.phi  # (N, 1089): Phi^T L as row vectors
        h = lr @ self.qinit.T  # (N, 1089)
        symmetry = []
        for stage in self.stages:
            h, sym = stage(h, self.phi, phitb, with_symmetry)
            symmetry.append(sym)
        return h, symmetry


class TemporalEncoding(nn.Module):
    """Gate T_p = sigmoid(Linear(e_p)) per window position p (SeqCSIST section IV-B).

    The paper encoded the absolute frame index of a 20-frame trajectory; a stream has no such
    index, so e_p encodes the position p in the window: e_p = p / (window - 1) on every entry.
    """

    def __init__(self, cfg: DeRefNetConfig):
        super().__init__()
        n = cfg.hr * cfg.hr
        self.mlp = nn.Linear(n, n)
        pos = torch.arange(cfg.window, dtype=torch.float32) / (cfg.window - 1)
        self.register_buffer("codes", pos[:, None].expand(cfg.window, n).clone())  # (5, 1089)

    def gates(self):
        return torch.sigmoid(self.mlp(self.codes))  # (5, 1089)

    def forward(self, feats):
        return feats * self.gates()  # (B, 5, 1089)


class DeformConv3x3(nn.Module):
    """3x3 deformable convolution (no bias) with externally given offsets (B, 18, H, W).

    ``mode="torchvision"`` calls ``torchvision.ops.deform_conv2d`` (exported as ONNX DeformConv);
    ``mode="grid_sample"`` computes the same bilinear sampling with ``F.grid_sample``, whose CPU
    backward is several times faster. Offsets follow torchvision's layout: channel 2k is the
    row (dy) and 2k+1 the column (dx) offset of kernel tap k, taps in row-major order.
    """

    def __init__(self, channels: int, mode: str = "grid_sample"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, channels, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.mode = mode

    def forward(self, x, offset):
        if self.mode == "torchvision":
            return deform_conv2d(x, offset, self.weight, padding=(1, 1))
        return self._grid_sample(x, offset)

    def _grid_sample(self, x, offset):
        b, c, h, w = x.shape
        off = offset.view(b, 9, 2, h, w)  # (B, 9 taps, [dy, dx], H, W)
        ky, kx = torch.meshgrid(torch.arange(3, device=x.device), torch.arange(3, device=x.device), indexing="ij")
        ky = (ky.reshape(9, 1, 1) - 1).to(x.dtype)
        kx = (kx.reshape(9, 1, 1) - 1).to(x.dtype)
        gy = torch.arange(h, device=x.device, dtype=x.dtype).view(1, h, 1)
        gx = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w)
        py = gy + ky + off[:, :, 0]  # (B, 9, H, W) sampling rows
        px = gx + kx + off[:, :, 1]  # (B, 9, H, W) sampling columns
        grid = torch.stack((2 * px / (w - 1) - 1, 2 * py / (h - 1) - 1), dim=-1)  # (B, 9, H, W, 2)
        grid = grid.view(b, 9 * h, w, 2)
        cols = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        cols = cols.view(b, c * 9, h * w)  # (B, C*9, H*W), channel-major like the weight
        out = self.weight.view(self.weight.shape[0], c * 9) @ cols  # (B, C, H*W)
        return out.view(b, -1, h, w)


class SelectiveAttention(nn.Module):
    """Weights middle and neighbour features by channel-mean and channel-max attention maps."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.squeeze_mid = nn.Conv2d(channels, half, 1)
        self.squeeze_nb = nn.Conv2d(channels, half, 1)
        self.mix = conv3x3(2, 2)

    def forward(self, mid, nb):
        a_mid, a_nb = self.squeeze_mid(mid), self.squeeze_nb(nb)  # (B, C/2, H, W) each
        both = torch.cat([a_mid, a_nb], dim=1)
        stats = torch.cat([both.mean(1, keepdim=True), both.amax(1, keepdim=True)], dim=1)  # (B, 2, H, W)
        att = torch.sigmoid(self.mix(stats))
        return torch.cat([a_mid * att[:, :1], a_nb * att[:, 1:]], dim=1)  # (B, C, H, W)


class TDFA(nn.Module):
    """Temporal deformable feature alignment of one neighbour frame to the middle frame.

    Shared by the 4 neighbours (as in the reference implementation). The first deformable conv
    takes its offsets from the attention output, the second from its own input; offset convs
    start at zero so that training begins from plain 3x3 convolutions.
    """

    def __init__(self, cfg: DeRefNetConfig):
        super().__init__()
        c = cfg.channels
        self.embed = nn.Sequential(conv3x3(1, c), nn.ReLU())
        self.attention = SelectiveAttention(c)
        self.offset1 = conv3x3(c, 18)
        self.offset2 = conv3x3(c, 18)
        for conv in (self.offset1, self.offset2):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.deform1 = DeformConv3x3(c, cfg.deform)
        self.deform2 = DeformConv3x3(c, cfg.deform)
        self.out = conv3x3(c, 1)

    def forward(self, mid, nb):
        f_mid, f_nb = self.embed(mid), self.embed(nb)  # (B, C, 33, 33)
        att = self.attention(f_mid, f_nb)
        x = self.deform1(f_nb, self.offset1(att))
        x = self.deform2(x, self.offset2(x))
        return self.out(x)  # (B, 1, 33, 33)


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(conv3x3(c, c), nn.ReLU(), conv3x3(c, c))

    def forward(self, x):
        return x + self.body(x)


class Fusion(nn.Module):
    """Middle frame + 4 aligned neighbours (5 ch) -> HR map (SeqCSIST section IV-C)."""

    def __init__(self, cfg: DeRefNetConfig):
        super().__init__()
        c = cfg.channels
        self.body = nn.Sequential(
            conv3x3(cfg.window, c),
            nn.ReLU(),
            *[ResBlock(c) for _ in range(cfg.res_blocks)],
            conv3x3(c, 1, bias=False),
        )

    def forward(self, stack):
        return self.body(stack)[:, 0]  # (B, 33, 33)


class WindowHead(nn.Module):
    """Stage-9 features of a window (B, 5, 1089) -> middle HR map and aligned neighbours."""

    def __init__(self, cfg: DeRefNetConfig):
        super().__init__()
        self.cfg = cfg
        self.temporal = TemporalEncoding(cfg)
        self.align = TDFA(cfg)
        self.fusion = Fusion(cfg)

    def forward(self, feats):
        b, w, _ = feats.shape
        n = self.cfg.hr
        x = self.temporal(feats).view(b, w, 1, n, n)  # (B, 5, 1, 33, 33)
        m = w // 2
        mid = x[:, m]
        neighbours = torch.cat([x[:, i] for i in range(w) if i != m], dim=0)  # (4B, 1, 33, 33)
        aligned = self.align(mid.repeat(w - 1, 1, 1, 1), neighbours)  # (4B, 1, 33, 33)
        aligned = aligned.view(w - 1, b, n, n).transpose(0, 1)  # (B, 4, 33, 33)
        stack = torch.cat([aligned[:, :m], mid, aligned[:, m:]], dim=1)  # (B, 5, 33, 33)
        return self.fusion(stack), aligned


class DeRefNet(nn.Module):
    def __init__(self, cfg: DeRefNetConfig | None = None):
        super().__init__()
        self.cfg = cfg or DeRefNetConfig()
        self.encoder = FrameEncoder(self.cfg)
        self.head = WindowHead(self.cfg)

    def set_deform_mode(self, mode: str) -> None:
        assert mode in ("grid_sample", "torchvision"), mode
        self.cfg.deform = mode
        for m in self.modules():
            if isinstance(m, DeformConv3x3):
                m.mode = mode

    def forward(self, windows):
        """LR windows (B, 5, 11, 11) in sensor units -> middle-frame HR maps (B, 33, 33)."""
        b, w = windows.shape[:2]
        feats, _ = self.encoder(windows.reshape(b * w, -1), with_symmetry=False)
        hr, _ = self.head(feats.view(b, w, -1))
        return hr * self.cfg.scale

    def forward_trajectories(self, frames, with_symmetry: bool = True):
        """Training forward over whole trajectories (B, T, 11, 11), each frame encoded once.

        Returns the HR maps of every full window's middle frame (B, T-4, 33, 33) in scaled
        units, plus what the auxiliary losses need: the symmetry residuals of every stage, the
        aligned neighbours (B*(T-4), 4, 33, 33) and the middle frames' stage-9 features.
        """
        b, t = frames.shape[:2]
        w, n = self.cfg.window, self.cfg.hr
        feats, symmetry = self.encoder(frames.reshape(b * t, -1), with_symmetry)
        feats = feats.view(b, t, -1)  # (B, T, 1089)
        idx = torch.arange(t - w + 1, device=frames.device)[:, None] + torch.arange(w, device=frames.device)
        win = feats[:, idx].reshape(-1, w, n * n)  # (B*(T-4), 5, 1089)
        hr, aligned = self.head(win)
        mids = win[:, w // 2].view(-1, 1, n, n)
        return hr.view(b, t - w + 1, n, n), symmetry, aligned, mids


@dataclass
class LossWeights:
    zeta: float = 1.0  # regression (MSE to the HR ground truth)
    beta: float = 0.01  # constraint (symmetry residuals of the ISTA stages)
    gamma: float = 0.01  # alignment (L1 between aligned neighbours and the middle frame)


def derefnet_loss(model: DeRefNet, frames, hr_truth, weights: LossWeights = LossWeights()):
    """The SeqCSIST loss (docs/method.md section 4.6) over trajectories.

    frames (B, T, 11, 11) sensor units; hr_truth (B, T-4, 33, 33) brightness of each window's
    middle frame. Returns the total and its three parts (as floats for logging).
    """
    hr, symmetry, aligned, mids = model.forward_trajectories(frames)
    reg = F.mse_loss(hr, hr_truth / model.cfg.scale)
    con = torch.stack([s.pow(2).mean() for s in symmetry]).mean()
    ali = (aligned - mids).abs().mean()
    total = weights.zeta * reg + weights.beta * con + weights.gamma * ali
    parts = {"reg": reg.item(), "constraint": con.item(), "align": ali.item()}
    return total, parts


def fit_qinit(lr_frames: np.ndarray, hr_maps: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """Least-squares LR -> HR initialisation Qinit = X Y^T (Y Y^T)^-1 (docs/method.md section 4.1).

    Training passes the observed training frames as Y (8-bit, off-cell targets, clipped at
    255) rather than Phi X: Qinit is then the best linear map from what the sensor really
    delivers to the HR truth, which is what the network sees at inference.

    lr_frames (N, 11, 11) and hr_maps (N, 33, 33) in sensor units; the map is linear, so it
    applies equally to scaled inputs. A tiny ridge keeps Y Y^T invertible on small data sets.
    Returns (1089, 121) float32.
    """
    y = lr_frames.reshape(len(lr_frames), -1).astype(np.float64).T  # (121, N)
    x = hr_maps.reshape(len(hr_maps), -1).astype(np.float64).T  # (1089, N)
    yyt = y @ y.T
    yyt += ridge * np.trace(yyt) / len(yyt) * np.eye(len(yyt))
    return np.linalg.solve(yyt, (x @ y.T).T).T.astype(np.float32)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_checkpoint_model(path: str | Path, device: str = "cpu") -> DeRefNet:
    """The DeRefNet of a training checkpoint (its stored config and weights), in eval mode."""
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model = DeRefNet(DeRefNetConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()
