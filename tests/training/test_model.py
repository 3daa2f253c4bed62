import numpy as np
import pytest
import torch
from torchvision.ops import deform_conv2d

from service.science import physics
from training.model import (
    DeformConv3x3,
    DeRefNet,
    DeRefNetConfig,
    LossWeights,
    count_parameters,
    derefnet_loss,
    fit_qinit,
)

SMALL = dict(stages=2, channels=8, res_blocks=1)


def test_full_size_model_matches_reference_parameter_count():
    # docs/method.md section 4.8: about 1.48M parameters counted from the reference code, 1.19M of
    # them in the 1089x1089 temporal Linear.
    model = DeRefNet()
    n = count_parameters(model)
    assert 1.47e6 < n < 1.49e6
    assert model.head.temporal.mlp.weight.numel() == 1089 * 1089


def test_shapes_window_and_trajectory_forward_agree():
    torch.manual_seed(0)
    model = DeRefNet(DeRefNetConfig(**SMALL)).eval()
    frames = torch.rand(2, 9, 11, 11) * 255
    with torch.no_grad():
        hr, sym, aligned, mids = model.forward_trajectories(frames)
        assert hr.shape == (2, 5, 33, 33)
        assert len(sym) == 2 and sym[0].shape == (18, 1, 33, 33)
        assert aligned.shape == (10, 4, 33, 33) and mids.shape == (10, 1, 33, 33)
        # window t of trajectory b through the plain window forward gives the same map
        win = torch.stack([frames[b, t : t + 5] for b in range(2) for t in range(5)])
        out = model(win)
    assert out.shape == (10, 33, 33)
    np.testing.assert_allclose(out.numpy(), (hr * model.cfg.scale).reshape(10, 33, 33).numpy(), rtol=1e-4, atol=1e-3)


def test_inference_skips_symmetry_branch():
    model = DeRefNet(DeRefNetConfig(**SMALL))
    _, sym = model.encoder(torch.rand(3, 121), with_symmetry=False)
    assert sym == [None, None]


def test_ista_stage_is_the_textbook_iteration():
    """The factored gradient step and the clip form of the soft threshold compute SeqCSIST
    eqs. 4-7 as written: r = h - rho h Phi^T Phi + rho Phi^T L, h' = G~(sign(g) max(|g| - theta, 0))."""
    torch.manual_seed(3)
    model = DeRefNet(DeRefNetConfig(**SMALL))
    enc, stage = model.encoder, model.encoder.stages[0]
    with torch.no_grad():
        stage.theta.fill_(0.05)
        h, lr = torch.rand(4, 1089) * 0.3, torch.rand(4, 121)
        phitb = lr @ enc.phi
        got, _ = stage(h, enc.phi, phitb, with_symmetry=False)
        r = h - stage.rho * (h @ (enc.phi.T @ enc.phi)) + stage.rho * phitb
        g = stage.forward_transform(r.view(-1, 1, 33, 33))
        soft = torch.sign(g) * torch.relu(torch.abs(g) - stage.theta)
        want = stage.inverse_transform(soft).view(-1, 1089)
        assert (soft == 0).any() and (soft != 0).any()  # the threshold acts on this input
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_checkpoints_with_the_old_phitphi_buffer_still_load():
    model = DeRefNet(DeRefNetConfig(**SMALL))
    state = model.state_dict()
    state["encoder.phitphi"] = model.encoder.phi.T @ model.encoder.phi  # stored before the factoring
    fresh = DeRefNet(DeRefNetConfig(**SMALL))
    fresh.load_state_dict(state)  # strict: no unexpected key
    assert "encoder.phitphi" not in fresh.state_dict()


def test_temporal_gates_depend_on_window_position():
    model = DeRefNet(DeRefNetConfig(**SMALL))
    torch.nn.init.normal_(model.head.temporal.mlp.weight, std=0.01)
    g = model.head.temporal.gates()
    assert g.shape == (5, 1089)
    assert not torch.allclose(g[0], g[4])
    assert torch.all((g > 0) & (g < 1))


@pytest.mark.parametrize("seed", [0, 1])
def test_grid_sample_deform_conv_equals_torchvision(seed):
    torch.manual_seed(seed)
    conv = DeformConv3x3(6)
    x = torch.randn(2, 6, 13, 11, dtype=torch.float64, requires_grad=True)
    # offsets large enough to sample across pixels and outside the border
    offset = (torch.randn(2, 18, 13, 11, dtype=torch.float64) * 1.7).requires_grad_(True)
    weight = conv.weight.detach().double().requires_grad_(True)
    conv.weight = torch.nn.Parameter(weight)

    conv.mode = "grid_sample"
    ours = conv(x, offset)
    g_ours = torch.autograd.grad(ours.pow(2).sum(), (x, offset, conv.weight))
    ref = deform_conv2d(x, offset, conv.weight, padding=(1, 1))
    g_ref = torch.autograd.grad(ref.pow(2).sum(), (x, offset, conv.weight))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    conv.mode = "torchvision"
    torch.testing.assert_close(conv(x, offset), ref)


def test_model_output_same_with_either_deform_mode():
    torch.manual_seed(3)
    model = DeRefNet(DeRefNetConfig(**SMALL)).eval()
    for m in (model.head.align.offset1, model.head.align.offset2):
        torch.nn.init.normal_(m.weight, std=0.05)
    x = torch.rand(3, 5, 11, 11) * 255
    with torch.no_grad():
        a = model(x)
        model.set_deform_mode("torchvision")
        b = model(x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def test_loss_parts_and_weights():
    torch.manual_seed(0)
    model = DeRefNet(DeRefNetConfig(**SMALL))
    frames = torch.rand(1, 6, 11, 11) * 255
    truth = torch.zeros(1, 2, 33, 33)
    total, parts = derefnet_loss(model, frames, truth, LossWeights(1.0, 0.01, 0.01))
    expect = parts["reg"] + 0.01 * parts["constraint"] + 0.01 * parts["align"]
    assert total.item() == pytest.approx(expect, rel=1e-5)
    only_reg, _ = derefnet_loss(model, frames, truth, LossWeights(1.0, 0.0, 0.0))
    assert only_reg.item() == pytest.approx(parts["reg"], rel=1e-5)
    assert all(v > 0 for v in parts.values())


def test_qinit_least_squares_recovers_linear_map():
    rng = np.random.default_rng(0)
    phi = physics.sampling_matrix()
    hr = np.zeros((3000, 1089))
    for row in hr:
        row[rng.choice(1089, size=3, replace=False)] = rng.uniform(220, 250, size=3)
    lr = hr @ phi.T
    q = fit_qinit(lr.reshape(-1, 11, 11), hr.reshape(-1, 33, 33))
    assert q.shape == (1089, 121)
    # normal equations hold: (Q Y - X) Y^T = 0 up to the tiny ridge
    resid = (q @ lr.T - hr.T) @ lr
    assert np.abs(resid).max() < 1e-3 * np.abs(hr.T @ lr).max()
    # and Q inverts Phi on average better than the zero map does
    assert np.linalg.norm(q @ lr.T - hr.T) < np.linalg.norm(hr)


def test_short_training_lowers_loss():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    from training.simulate import SimParams, simulate_trajectory

    trajs = [simulate_trajectory(rng, SimParams(frames=8)) for _ in range(2)]
    frames = torch.from_numpy(np.stack([physics.quantize(f).astype(np.float32) for f, _ in trajs]))
    truth = torch.from_numpy(
        np.stack([[physics.hr_map(t[i]) for i in range(2, 6)] for _, t in trajs]).astype(np.float32)
    )
    model = DeRefNet(DeRefNetConfig(**SMALL))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        loss, _ = derefnet_loss(model, frames, truth)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
