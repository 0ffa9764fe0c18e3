"""The comparison objectives (VICReg, SimCLR), each loss against an independent float64
reference written out here from the formula, plus the invariances the losses must have."""
import math

import pytest
import torch

from common import simclr_loss, vicreg_loss


# --------------------------------------------------------------------------- references
def reference_vicreg(z1, z2, sim=25.0, var=25.0, cov=1.0, eps=1e-4):
    """VICReg in float64: sim * mean (z1 - z2)^2 + var * mean over the views of
    mean_j relu(1 - sqrt(Var_j + eps)) + cov * sum over the views of sum_{i!=j} Cov_ij^2 / D,
    Cov = zc^T zc / (N - 1) over the centred batch, Var its diagonal (unbiased)."""
    z1, z2 = z1.double(), z2.double()
    n, d = z1.shape
    invariance = ((z1 - z2) ** 2).sum() / (n * d)

    def terms(z):
        zc = z - z.sum(0) / n
        c = zc.T @ zc / (n - 1)
        std = torch.sqrt(torch.diagonal(c) + eps)
        hinge = torch.clamp(1 - std, min=0).sum() / d
        off = ~torch.eye(d, dtype=torch.bool)
        return hinge, (c[off] ** 2).sum() / d

    (h1, c1), (h2, c2) = terms(z1), terms(z2)
    return sim * invariance + var * (h1 + h2) / 2 + cov * (c1 + c2)


def reference_simclr(z1, z2, temperature=0.1):
    """NT-Xent in float64, one anchor at a time: u = the 2N rows [z1; z2] scaled to unit
    length, s = u u^T / t; anchor i's positive is row i +- N, its denominator every row but i;
    loss = mean over the 2N anchors of -log(exp(s_ip) / sum_{k != i} exp(s_ik))."""
    u = torch.cat([z1, z2]).double()
    u = u / torch.sqrt((u ** 2).sum(1, keepdim=True))
    m = u.shape[0]
    s = u @ u.T / temperature
    total = 0.0
    for i in range(m):
        p = (i + m // 2) % m
        denominator = sum(torch.exp(s[i, k]) for k in range(m) if k != i)
        total = total - torch.log(torch.exp(s[i, p]) / denominator)
    return total / m


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + 0.3


def hadamard(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def grad_error(fn, ref, z1, z2, **kw):
    """max |d fn / d(z1, z2) - d ref / d(z1, z2)| over the largest reference entry, fn in
    float32 and ref in float64 on the same values, both by autograd."""
    a = [z.clone().requires_grad_(True) for z in (z1, z2)]
    b = [z.float().requires_grad_(True) for z in (z1, z2)]
    ga = torch.autograd.grad(ref(*a, **kw), a)
    gb = torch.autograd.grad(fn(*b, **kw), b)
    top = max(g.abs().max().item() for g in ga)
    assert top > 0
    return max((y.double() - x).abs().max().item() for x, y in zip(ga, gb)) / top


# vicreg_loss takes the off-diagonal covariance from the (N, N) Gram matrix when N < D and
# from the (D, D) covariance otherwise: its tests run shapes on both sides of that line.
GRAM, COV = [(8, 32), (12, 64)], [(16, 16), (16, 8)]


def test_shapes_cover_both_paths():
    assert all(n < d for n, d in GRAM) and not any(n < d for n, d in COV)


# --------------------------------------------------------------------------- VICReg
# scale 1: features with std near 1, the hinge active on some; 0.5: active on all, so a
# biased variance (N instead of N - 1) moves the variance term by ~1.5% and fails; 0.01:
# Var ~1e-4 is the size of eps, so a missing or misplaced eps fails. The covariance term
# changes by ((N-1)/N)^2, >= 12%, if divided by N.
@pytest.mark.parametrize('scale', [1.0, 0.5, 0.01])
@pytest.mark.parametrize('shape', GRAM + COV)
def test_vicreg_matches_float64_reference(shape, scale):
    z1, z2 = randn(*shape, seed=1, scale=scale), randn(*shape, seed=2, scale=scale)
    got = vicreg_loss(z1.float(), z2.float())
    assert got.dtype == torch.float32 and got.shape == ()
    # float32 sums over N D and D^2 terms: relative error ~1e-6
    assert got.item() == pytest.approx(reference_vicreg(z1, z2).item(), rel=1e-5)


@pytest.mark.parametrize('shape', [GRAM[0], COV[1]])
def test_vicreg_coefficients_weight_each_term(shape):
    z1, z2 = randn(*shape, seed=3, scale=0.5), randn(*shape, seed=4, scale=0.5)
    for kw in (dict(sim=1.0, var=0.0, cov=0.0), dict(sim=0.0, var=1.0, cov=0.0),
               dict(sim=0.0, var=0.0, cov=1.0), dict(sim=5.0, var=2.0, cov=0.3, eps=1e-2)):
        ref = reference_vicreg(z1, z2, **kw).item()
        assert ref > 0
        assert vicreg_loss(z1.float(), z2.float(), **kw).item() == pytest.approx(ref, rel=1e-5)
    # the invariance term alone is 25 x the plain mean squared difference
    mse = ((z1 - z2) ** 2).mean().item()
    assert vicreg_loss(z1.float(), z2.float(), var=0.0, cov=0.0).item() == pytest.approx(
        25 * mse, rel=1e-5)


@pytest.mark.parametrize('scale', [1.0, 0.5])
@pytest.mark.parametrize('shape', [GRAM[0], COV[0]])
def test_vicreg_gradient_matches_autograd_on_reference(shape, scale):
    z1, z2 = randn(*shape, seed=5, scale=scale), randn(*shape, seed=6, scale=scale)
    err = grad_error(vicreg_loss, reference_vicreg, z1, z2)
    assert err <= 1e-4, err  # float32 backward: ~1e-6 of the largest entry


@pytest.mark.parametrize('shape', [GRAM[0], COV[0]])
def test_vicreg_invariance_term_vanishes_for_identical_views(shape):
    z = randn(*shape, seed=7, scale=0.5).float()
    both = vicreg_loss(z, z).item()
    assert both == pytest.approx(vicreg_loss(z, z, sim=0.0).item(), rel=1e-6)
    assert both == pytest.approx(reference_vicreg(z, z).item(), rel=1e-5)
    assert vicreg_loss(z, z + 0.1).item() > both + 25 * 0.01 * 0.99  # MSE 0.01 of a shift


def test_vicreg_zero_for_decorrelated_features_with_std_above_one():
    # Columns 1.. of a 16x16 Hadamard matrix: zero mean, mutually orthogonal, so Cov is
    # diagonal (exact zeros off it); times 2 the std is 2 sqrt(16/15) > 1: the hinge is off
    z = 2 * hadamard(16)[:, 1:]  # (N=16, D=15)
    assert vicreg_loss(z.float(), z.float()).item() < 1e-5
    # ... and at half scale the std is 0.5 sqrt(16/15): the hinge is on for every feature
    h = 0.5 * hadamard(16)[:, 1:]
    hinge = 1 - math.sqrt(0.25 * 16 / 15 + 1e-4)
    assert vicreg_loss(h.float(), h.float()).item() == pytest.approx(25 * hinge, rel=1e-5)


@pytest.mark.parametrize('shape', [GRAM[0], COV[0]])
def test_vicreg_symmetries(shape):
    z1 = randn(*shape, seed=8).float()
    z2 = z1 + 0.3 * randn(*shape, seed=9).float()  # pairs closer than strangers
    a = vicreg_loss(z1, z2).item()
    perm = torch.randperm(shape[0], generator=torch.Generator().manual_seed(0))
    shift = torch.linspace(-3, 3, shape[1])
    assert vicreg_loss(z1[perm], z2[perm]).item() == pytest.approx(a, rel=1e-5)
    assert vicreg_loss(z2, z1).item() == pytest.approx(a, rel=1e-6)
    assert vicreg_loss(z1 + shift, z2 + shift).item() == pytest.approx(a, rel=1e-4)
    # ... but not to permuting one view alone (the pairs are what the MSE is about)
    assert vicreg_loss(z1, z2[perm]).item() != pytest.approx(a, rel=1e-3)


@pytest.mark.parametrize('shape', [GRAM[0], COV[0]])
def test_vicreg_runs_in_float32_under_bf16_autocast(shape):
    z1 = randn(*shape, seed=10, scale=0.5).to(torch.bfloat16)
    z2 = (z1.double() + 0.5 * randn(*shape, seed=11, scale=0.5)).to(torch.bfloat16)
    # the whole loss, and the covariance term alone (the only matmul, a small share of it)
    for kw in (dict(), dict(sim=0.0, var=0.0)):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            got = vicreg_loss(z1, z2, **kw)
        assert got.dtype == torch.float32
        # the same bf16 values, exactly, in float32 and float64; a bf16 matmul is ~1e-3 off
        fp32 = vicreg_loss(z1.float(), z2.float(), **kw)
        assert got.item() == pytest.approx(fp32.item(), rel=1e-5)
        assert got.item() == pytest.approx(reference_vicreg(z1, z2, **kw).item(), rel=1e-5)


# --------------------------------------------------------------------------- SimCLR
SIMCLR_SHAPES = [(8, 16), (16, 64), (12, 8)]


@pytest.mark.parametrize('temperature', [0.1, 0.5])
@pytest.mark.parametrize('shape', SIMCLR_SHAPES)
def test_simclr_matches_float64_reference(shape, temperature):
    z1 = randn(*shape, seed=1)
    z2 = z1 + 0.5 * randn(*shape, seed=2)  # positives more alike than negatives
    got = simclr_loss(z1.float(), z2.float(), temperature)
    assert got.dtype == torch.float32 and got.shape == ()
    assert got.item() == pytest.approx(reference_simclr(z1, z2, temperature).item(), rel=1e-5)


def test_simclr_hand_value_for_orthonormal_images():
    # identical views, different images orthogonal: s_ii+-N = 1/t, every negative 0, so each
    # anchor's loss is log(1 + (2N - 2) exp(-1/t)); a self-similarity left in the denominator
    # would add another exp(1/t) and give about log 2 more
    n, t = 8, 0.2
    z = torch.eye(n, 16) * 3
    want = math.log(1 + (2 * n - 2) * math.exp(-1 / t))
    assert simclr_loss(z, z, t).item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize('temperature', [0.1, 0.5])
@pytest.mark.parametrize('shape', [SIMCLR_SHAPES[0], SIMCLR_SHAPES[2]])
def test_simclr_gradient_matches_autograd_on_reference(shape, temperature):
    z1 = randn(*shape, seed=5)
    z2 = z1 + 0.5 * randn(*shape, seed=6)
    err = grad_error(simclr_loss, reference_simclr, z1, z2, temperature=temperature)
    assert err <= 1e-4, err


@pytest.mark.parametrize('shape', SIMCLR_SHAPES[:2])
def test_simclr_symmetries(shape):
    z1 = randn(*shape, seed=8).float()
    z2 = z1 + 0.5 * randn(*shape, seed=9).float()
    a = simclr_loss(z1, z2).item()
    perm = torch.randperm(shape[0], generator=torch.Generator().manual_seed(0))
    scale = torch.rand(shape[0], 1, generator=torch.Generator().manual_seed(1)) * 10 + 0.1
    assert simclr_loss(z1[perm], z2[perm]).item() == pytest.approx(a, rel=1e-5)
    assert simclr_loss(z2, z1).item() == pytest.approx(a, rel=1e-5)
    assert simclr_loss(z1 * scale, z2 * scale.flip(0)).item() == pytest.approx(a, rel=1e-5)
    # ... but not to permuting one view alone
    assert simclr_loss(z1, z2[perm]).item() != pytest.approx(a, rel=1e-3)


def test_simclr_runs_in_float32_under_bf16_autocast():
    z1 = randn(16, 32, seed=10).to(torch.bfloat16)
    z2 = (z1.double() + 0.5 * randn(16, 32, seed=11)).to(torch.bfloat16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = simclr_loss(z1, z2)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(simclr_loss(z1.float(), z2.float()).item(), rel=1e-5)
    assert got.item() == pytest.approx(reference_simclr(z1, z2).item(), rel=1e-5)
