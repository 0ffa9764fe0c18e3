"""Barlow Twins loss, projector, LARS, make_optimizer and the lr schedules, each against an
independent reference written out here (float64 formulas, hand-computed values)."""
import math

import pytest
import torch
import torch.nn as nn

import common
from common import LARS, UserError, barlow_loss, lr_factor, make_optimizer, make_projector, \
    phase_lr

LAMBD = 0.0051


# --------------------------------------------------------------------------- loss
def reference_loss(z1, z2, lambd=LAMBD, eps=1e-5):
    """The formula, in float64: per-view batch norm without affine (biased variance, eps
    inside the sqrt), C = z1n^T z2n / N, sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2."""
    z1, z2 = z1.double(), z2.double()
    n, d = z1.shape

    def norm(z):
        mu = z.sum(0) / n
        var = ((z - mu) ** 2).sum(0) / n
        return (z - mu) / torch.sqrt(var + eps)

    c = norm(z1).T @ norm(z2) / n
    eye = torch.eye(d, dtype=torch.bool)
    return ((1 - c[eye]) ** 2).sum() + lambd * (c[~eye] ** 2).sum()


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + 0.3


# barlow_loss computes ||C||^2 from (N, N) Gram matrices when 2 N^2 < N D, from C itself
# otherwise: every loss test runs shapes on both sides of that line.
GRAM, CROSS = [(8, 64), (4, 24)], [(16, 32), (12, 8)]


def test_shapes_cover_both_paths():
    assert all(2 * n * n < n * d for n, d in GRAM)
    assert not any(2 * n * n < n * d for n, d in CROSS)


# scale 0.01: per-feature variance ~1e-4, so eps 1e-5 moves the loss by 0.4-2.4%, far above
# rel 1e-5, and a missing or misplaced eps fails; scale 1: the plain case (an unbiased
# variance, N-1, changes every normalised value by sqrt(N/(N-1)) and fails too)
@pytest.mark.parametrize('scale', [1.0, 0.01])
@pytest.mark.parametrize('shape', GRAM + CROSS)
def test_loss_matches_float64_reference(shape, scale):
    z1, z2 = randn(*shape, seed=1, scale=scale), randn(*shape, seed=2, scale=scale)
    ref = reference_loss(z1, z2)
    got = barlow_loss(z1.float(), z2.float(), LAMBD)
    assert got.dtype == torch.float32 and got.shape == ()
    # float32 sums over B and D^2 terms: relative error ~1e-6; 1e-5 leaves margin
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize('shape', [GRAM[0], CROSS[1]])
def test_loss_lambda_weights_off_diagonal(shape):
    z1, z2 = randn(*shape, seed=3), randn(*shape, seed=4)
    for lambd in (0.0, 1 / 8192, 0.5):
        assert barlow_loss(z1.float(), z2.float(), lambd).item() == pytest.approx(
            reference_loss(z1, z2, lambd).item(), rel=1e-5)


@pytest.mark.parametrize('shape', [(6, 64), (16, 24)])  # Gram path, (D, D) path
def test_loss_gradient_matches_autograd_on_reference(shape):
    z1, z2 = randn(*shape, seed=5), randn(*shape, seed=6)
    a = z1.clone().requires_grad_(True)
    reference_loss(a, z2).backward()
    b = z1.float().requires_grad_(True)
    barlow_loss(b, z2.float(), LAMBD).backward()
    err = (b.grad.double() - a.grad).abs().max().item()
    # float32 backward through the normalisation: ~1e-6 of the largest entry
    assert err <= 1e-4 * a.grad.abs().max().item(), err


def hadamard(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_loss_near_zero_for_identical_whitened_embeddings():
    # Columns 1.. of a 16x16 Sylvester Hadamard matrix are +-1, zero mean, mean square 1 and
    # mutually orthogonal: already batch-normalised with identity covariance. Any affine
    # rescaling per feature (a*z + b) normalises back to them, so C = I / (1 + eps) and the
    # loss is D * (eps / (1 + eps))^2 ~ 1.5e-9 (C's off-diagonals are exact zeros).
    z = hadamard(16)[:, 1:]  # (B=16, D=15)
    assert torch.equal(z.T @ z / 16, torch.eye(15, dtype=torch.float64))
    z = z * torch.linspace(0.5, 3, 15, dtype=torch.float64) + torch.arange(15.0).double()
    ref = reference_loss(z, z).item()
    assert ref < 1e-8
    got = barlow_loss(z.float(), z.float(), LAMBD).item()
    assert got < 1e-6, got
    # the negative control: z2 = -z1 anti-correlates every feature, C = -I, loss = 4 D
    assert barlow_loss(z.float(), -z.float(), LAMBD).item() == pytest.approx(60, rel=1e-4)


def test_loss_of_correlated_identical_views_is_the_off_diagonal_term():
    z = randn(16, 8, seed=7)
    z[:, 1] = z[:, 0] + 0.1 * z[:, 1]  # features 0 and 1 strongly correlated
    got = barlow_loss(z.float(), z.float(), LAMBD).item()
    assert got == pytest.approx(reference_loss(z, z).item(), rel=1e-5)
    assert got > LAMBD * 2 * 0.9 ** 2  # C_01 = C_10 > 0.9 cannot vanish


@pytest.mark.parametrize('shape', [GRAM[0], CROSS[0]])
def test_loss_invariant_to_joint_permutation_of_the_batch(shape):
    z1, z2 = randn(*shape, seed=8).float(), randn(*shape, seed=9).float()
    perm = torch.randperm(shape[0], generator=torch.Generator().manual_seed(0))
    a, b = barlow_loss(z1, z2, LAMBD), barlow_loss(z1[perm], z2[perm], LAMBD)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    # ... but not to permuting one view alone (the pairs are what the loss is about)
    assert barlow_loss(z1, z2[perm], LAMBD).item() != pytest.approx(a.item(), rel=1e-3)


@pytest.mark.parametrize('shape', [GRAM[0], CROSS[0]])
def test_loss_runs_in_float32_under_bf16_autocast(shape):
    z1 = randn(*shape, seed=10).to(torch.bfloat16)
    z2 = (z1.double() + 0.5 * randn(*shape, seed=11)).to(torch.bfloat16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = barlow_loss(z1, z2, LAMBD)
    assert got.dtype == torch.float32
    fp32 = barlow_loss(z1.float(), z2.float(), LAMBD)
    ref = reference_loss(z1, z2)  # the same bf16 values, exactly, in float64
    # a bf16 matmul or normalisation would be off by ~1e-2 relative
    assert got.item() == pytest.approx(fp32.item(), rel=1e-5)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_barlow_twins_module_shares_backbone_and_projector_across_views():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
    m = common.BarlowTwins(backbone, 6, '16-8', lambd=0.01)
    y1, y2 = torch.randn(8, 3, 2, 2), torch.randn(8, 3, 2, 2)
    m.train()
    got = m(y1, y2)
    z1, z2 = m.projector(backbone(y1)), m.projector(backbone(y2))
    assert got.item() == pytest.approx(reference_loss(z1.detach(), z2.detach(), 0.01).item(),
                                       rel=1e-5)


# --------------------------------------------------------------------------- projector
def test_projector_structure():
    p = make_projector(16, '64-32')
    kinds = [type(m) for m in p]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (p[0].in_features, p[0].out_features) == (16, 64)
    assert (p[3].in_features, p[3].out_features) == (64, 32)
    assert p[0].bias is None and p[3].bias is None
    assert p[1].num_features == 64
    assert p(torch.randn(4, 16)).shape == (4, 32)
    three = make_projector(8, '32-32-16')
    assert [type(m) for m in three] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert [m.out_features for m in three if isinstance(m, nn.Linear)] == [32, 32, 16]
    one = make_projector(8, '4')
    assert len(one) == 1 and one[0].out_features == 4 and one[0].bias is None


@pytest.mark.parametrize('spec', ['64-x', '', '64--32', '0-8'])
def test_projector_refuses_bad_spec(spec):
    with pytest.raises(UserError, match='--projector'):
        make_projector(16, spec)


# --------------------------------------------------------------------------- LARS, optimiser
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)  # weight (4, 3): LARS-adapted; bias (4,): plain SGD
        self.bn = nn.BatchNorm1d(4)
        self.frozen = nn.Linear(4, 2)
        self.frozen.weight.requires_grad_(False)


def test_make_optimizer_groups():
    torch.manual_seed(0)
    m = Tiny()
    opt = make_optimizer({'backbone': m}, 'lars', lr=0.2, lr_biases=0.0048,
                         weight_decay=1e-6, batch_size=512)
    assert isinstance(opt, LARS)
    groups = {(g['role'], g['kind']): g for g in opt.param_groups}
    assert set(groups) == {('backbone', 'weights'), ('backbone', 'biases')}
    w, b = groups['backbone', 'weights'], groups['backbone', 'biases']
    ids = lambda ps: {id(p) for p in ps}
    assert ids(w['params']) == {id(m.lin.weight)}  # the frozen weight is left out
    assert ids(b['params']) == {id(m.lin.bias), id(m.bn.weight), id(m.bn.bias),
                                id(m.frozen.bias)}
    assert all(p.ndim == 1 for p in b['params'])
    assert w['weight_decay'] == 1e-6 and b['weight_decay'] == 0.0
    assert w['peak_lr'] == pytest.approx(0.2 * 512 / 256)
    assert b['peak_lr'] == pytest.approx(0.0048 * 512 / 256)
    opt2 = make_optimizer({'backbone': m.lin, 'head': m.bn}, 'adamw', 1e-3, 1e-3, 0.0, 64)
    assert {(g['role'], g['kind']) for g in opt2.param_groups} == {
        ('backbone', 'weights'), ('backbone', 'biases'), ('head', 'biases')}
    assert all(g['peak_lr'] == pytest.approx(1e-3 / 4) for g in opt2.param_groups)
    with pytest.raises(UserError, match='--optimizer'):
        make_optimizer({'backbone': m}, 'adam', 1, 1, 0, 256)


def reference_lars(w, grads, lr, wd, eta=0.001, momentum=0.9, adapt=True):
    """Facebook's LARS written out in float64 over a sequence of gradients: for a weight
    matrix d = g + wd w, d *= eta ||w|| / ||d||; for a 1-d parameter d = g (no wd, no
    adaptation); mu = momentum mu + d; w -= lr mu. Returns the weights after each step."""
    w, mu, out = w.double().clone(), torch.zeros_like(w, dtype=torch.float64), []
    for g in grads:
        d = g.double()
        if adapt:
            d = d + wd * w
            d = d * (eta * w.norm() / d.norm())
        mu = momentum * mu + d
        w = w - lr * mu
        out.append(w.clone())
    return out


def test_lars_steps_match_reference():
    torch.manual_seed(0)
    m = Tiny()
    # a large weight decay so the wd term visibly changes the direction and the norm of d
    opt = make_optimizer({'backbone': m}, 'lars', lr=0.2, lr_biases=0.0048,
                         weight_decay=0.5, batch_size=512)
    for g in opt.param_groups:
        g['lr'] = g['peak_lr']
    w0, b0 = m.lin.weight.detach().clone(), m.lin.bias.detach().clone()
    gen = torch.Generator().manual_seed(1)
    gw = [torch.randn(4, 3, generator=gen) for _ in range(3)]
    gb = [torch.randn(4, generator=gen) for _ in range(3)]
    ref_w = reference_lars(w0, gw, lr=0.4, wd=0.5)
    ref_b = reference_lars(b0, gb, lr=0.0096, wd=0.5, adapt=False)
    for k in range(3):  # three steps: the momentum buffer carries over
        opt.zero_grad()
        m.lin.weight.grad, m.lin.bias.grad = gw[k].clone(), gb[k].clone()
        opt.step()
        # compare the updates (~1e-4; the weights barely move at eta 1e-3): the float32
        # weights (|w| < 0.6, ulp 6e-8) carry a rounding of one ulp per step, so 3e-7
        # absolute; a wrong wd, trust ratio or momentum changes them by > 1e-6
        dw, rw = (m.lin.weight.detach() - w0).double(), ref_w[k] - w0.double()
        db, rb = (m.lin.bias.detach() - b0).double(), ref_b[k] - b0.double()
        assert torch.allclose(dw, rw, rtol=1e-4, atol=3e-7), (k, dw, rw)
        assert torch.allclose(db, rb, rtol=1e-4, atol=3e-7), (k, db, rb)
    # parameters without a gradient are not touched
    assert m.bn.weight.grad is None and torch.equal(m.bn.weight, torch.ones(4))


def test_lars_zero_weight_skips_adaptation():
    p = nn.Parameter(torch.zeros(2, 2))
    opt = LARS([p], lr=0.1, weight_decay=0.0, momentum=0.9)
    p.grad = torch.ones(2, 2)
    opt.step()  # ||w|| = 0: trust ratio 1, plain momentum SGD
    assert torch.allclose(p.detach(), torch.full((2, 2), -0.1))


# --------------------------------------------------------------------------- schedules
def test_cosine_schedule_hand_values():
    total, warmup, final = 110, 10, 0.001
    f = lambda s: lr_factor(s, total, warmup, 'cosine', final)
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5)  # linear warmup from 0
    assert f(10) == pytest.approx(1.0)
    # step 35: t = 25/100 = 1/4, 0.001 + 0.999 * (1 + cos(pi/4)) / 2 = 0.8536998372
    assert f(35) == pytest.approx(0.8536998372, abs=1e-9)
    # step 60: t = 1/2, 0.001 + 0.999 / 2 = 0.5005
    assert f(60) == pytest.approx(0.5005, abs=1e-12)
    assert f(110) == pytest.approx(final, abs=1e-12)
    assert f(500) == pytest.approx(final, abs=1e-12)  # past the end it stays at final
    assert lr_factor(60, 110, 10, 'cosine', 0.0) == pytest.approx(0.5)


def test_onecycle_schedule_hand_values():
    total, warmup = 100, 20
    f = lambda s: lr_factor(s, total, warmup, 'onecycle')
    assert f(0) == pytest.approx(1 / 25)
    assert f(10) == pytest.approx(0.52)  # 1 - 0.96 * (1 + cos(pi/2)) / 2
    assert f(20) == pytest.approx(1.0)   # the peak, at the end of warmup
    up = [f(s) for s in range(21)]
    assert all(a < b for a, b in zip(up, up[1:]))
    assert max(f(s) for s in range(total + 1)) == pytest.approx(1.0)
    assert f(60) == pytest.approx((1 + 1e-5) / 2)  # halfway down
    assert f(100) == pytest.approx(1e-5)
    assert lr_factor(7, 100, 20, 'constant') == 1.0
    with pytest.raises(UserError, match='--schedule'):
        lr_factor(0, 10, 1, 'linear')


def test_the_skin_presets_warmup_is_a_quarter_of_the_run(capsys):
    """--preset skin warms up over a quarter of --epochs (fit_one_cycle's pct_start, as
    finetune.py), so a short further-pretraining run reaches its peak lr: a fixed 25 epochs
    left a 2-epoch run at 5.5% of it. An explicit --warmup-epochs wins; one as long as the run
    says so in one line."""
    import pretrain_barlow
    g, spe = dict(role='backbone', kind='weights', peak_lr=1.0), 31  # steps per epoch
    for epochs in (2, 100, 1000):
        args = pretrain_barlow.get_args(['--data', 'x', '--preset', 'skin', '--epochs',
                                         str(epochs)])
        assert args.warmup_epochs is None and args.head_warmup_epochs == 1
        total, lr = pretrain_barlow.schedule(args.epochs, spe, args.schedule,
                                             args.warmup_epochs, args.head_warmup_epochs)
        assert total == spe + epochs * spe  # the projector-only epoch first
        lrs = [lr(s, g) for s in range(total + 1)]
        peak = spe + int(0.25 * epochs * spe)
        assert lrs[peak] == pytest.approx(1.0) and max(lrs) == lrs[peak]
        assert lrs[spe] == pytest.approx(1 / 25) and lrs[total] == pytest.approx(1e-5)
    assert capsys.readouterr().out == ''
    args = pretrain_barlow.get_args(['--data', 'x', '--preset', 'skin', '--epochs', '2',
                                     '--warmup-epochs', '25'])
    total, lr = pretrain_barlow.schedule(args.epochs, spe, args.schedule, args.warmup_epochs,
                                         args.head_warmup_epochs)
    assert max(lr(s, g) for s in range(total + 1)) == pytest.approx(0.0551, abs=1e-4)
    assert capsys.readouterr().out == ("note: --warmup-epochs 25 is not shorter than the run's "
                                       "2 epochs: the lr never reaches its peak; give a "
                                       "shorter warmup\n")


def test_phase_lr_freezes_backbone_weights_during_head_steps():
    groups = [dict(role=r, kind=k, peak_lr=2.0) for r in ('backbone', 'head')
              for k in ('weights', 'biases')]
    total, warmup, head = 100, 20, 8
    for step in range(head):
        lrs = {(g['role'], g['kind']): phase_lr(step, g, total, warmup, 'onecycle', head)
               for g in groups}
        assert lrs['backbone', 'weights'] == 0.0
        # head steps run their own one-cycle over head steps with head // 4 warmup
        expect = 2.0 * lr_factor(step, head, head // 4, 'onecycle')
        for key in (('backbone', 'biases'), ('head', 'weights'), ('head', 'biases')):
            assert lrs[key] == pytest.approx(expect) and lrs[key] > 0
    # then every group follows the main schedule, restarted at the end of the head phase
    for g in groups:
        assert phase_lr(head, g, total, warmup, 'onecycle', head) == pytest.approx(2.0 / 25)
        assert phase_lr(head + warmup, g, total, warmup, 'onecycle', head) == \
            pytest.approx(2.0)
        assert phase_lr(total, g, total, warmup, 'onecycle', head) == pytest.approx(2e-5)
    # no head phase: the plain schedule from step 0
    g = groups[0]
    assert phase_lr(0, g, total, warmup, 'cosine') == 0.0
    assert phase_lr(10, g, total, warmup, 'cosine') == pytest.approx(1.0)
    assert math.isclose(phase_lr(20, g, total, warmup, 'cosine'), 2.0)
