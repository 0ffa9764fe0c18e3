"""The comparison objectives (VICReg, SimCLR), common.OBJECTIVES and common.SSLModel, each loss
against an independent float64 reference written out here from the formula, plus the
invariances the losses must have and DDP equivalence under torchrun."""
import inspect
import math
import os

import pytest
import torch
import torch.nn as nn

import common
from common import OBJECTIVES, SSLModel, UserError, barlow_loss, simclr_loss, vicreg_loss


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


def test_simclr_without_a_process_group_ignores_torchruns_rank(monkeypatch):
    """A rank of torchrun's with no process group (--parallel seeds: one runtime a rank):
    the loss is the one-process loss, as Barlow Twins' and VICReg's are."""
    z1 = randn(8, 16, seed=1)
    z2 = z1 + 0.5 * randn(8, 16, seed=2)
    want = reference_simclr(z1, z2, 0.1).item()
    monkeypatch.setenv('RANK', '1')
    monkeypatch.setenv('WORLD_SIZE', '2')
    assert simclr_loss(z1.float(), z2.float(), 0.1).item() == pytest.approx(want, rel=1e-5)


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


# --------------------------------------------------------------------------- OBJECTIVES, SSLModel
def test_objectives_table():
    assert set(OBJECTIVES) == {'barlow', 'vicreg', 'simclr'}
    assert OBJECTIVES['barlow'][0] is barlow_loss
    assert OBJECTIVES['vicreg'][0] is vicreg_loss and OBJECTIVES['simclr'][0] is simclr_loss
    for name, (fn, settings, about) in OBJECTIVES.items():
        params = inspect.signature(fn).parameters
        # the table's defaults are the function's own (the published recipes)
        assert all(params[k].default == v for k, v in settings.items()), name
        assert isinstance(about, str) and about and '\n' not in about
    assert OBJECTIVES['vicreg'][1] == dict(sim=25.0, var=25.0, cov=1.0)


def tiny(objective, projector='16-8', **settings):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
    return SSLModel(backbone, 6, projector, objective, **settings)


@pytest.mark.parametrize('objective', list(OBJECTIVES))
def test_ssl_model_projects_both_views_and_applies_its_loss(objective):
    m = tiny(objective)
    y1, y2 = torch.randn(8, 3, 2, 2), torch.randn(8, 3, 2, 2)
    m.train()
    got = m(y1, y2)
    fn, settings, _ = OBJECTIVES[objective]
    z1, z2 = m.projector(m.backbone(y1)), m.projector(m.backbone(y2))
    assert got.item() == pytest.approx(fn(z1, z2, **settings).item(), rel=1e-6)
    got.backward()
    assert all(p.grad is not None for p in m.parameters())


def test_ssl_model_settings_override_defaults():
    m = tiny('simclr', temperature=0.5)
    assert m.settings == dict(temperature=0.5)
    y1, y2 = torch.randn(8, 3, 2, 2), torch.randn(8, 3, 2, 2)
    m.train()
    z1, z2 = m.projector(m.backbone(y1)), m.projector(m.backbone(y2))
    assert m(y1, y2).item() == pytest.approx(simclr_loss(z1, z2, 0.5).item(), rel=1e-6)
    assert tiny('vicreg', eps=1e-2).settings == dict(sim=25.0, var=25.0, cov=1.0, eps=1e-2)


def test_ssl_model_barlow_equals_barlow_twins_module():
    bt = common.BarlowTwins(nn.Sequential(nn.Flatten(), nn.Linear(12, 6)), 6, '16-8', 0.01)
    m = tiny('barlow', lambd=0.01)
    m.load_state_dict(bt.state_dict())  # same keys: backbone.*, projector.*
    y1, y2 = torch.randn(8, 3, 2, 2), torch.randn(8, 3, 2, 2)
    assert m(y1, y2).item() == pytest.approx(bt(y1, y2).item(), rel=1e-6)


def test_ssl_model_refuses_unknown_objective_and_setting():
    with pytest.raises(UserError, match='barlow | vicreg | simclr'):
        tiny('byol')
    with pytest.raises(TypeError):
        tiny('vicreg', lambd=0.1)  # at construction, not at the first step


# --------------------------------------------------------------------------- DDP equivalence
DDP_CASES = [('barlow', '64-64'), ('barlow', '64-8'),  # the Barlow Twins loss's Gram and
             ('vicreg', '64-64'), ('simclr', '64-64')]    # (D, D) paths, each objective


@pytest.fixture(scope='module')
def ddp_steps(tmp_path_factory, torch_home):
    """One torchrun launch (two gloo ranks) takes the DDP step of every case: the folder of
    their ddp-*.pt files, or the failed run. The launcher and its ranks are forked from a
    server that has imported torch (conftest.fastpy's, tests/torchrun)."""
    import subprocess

    import forkrun
    from conftest import ROOT, script_env
    out = tmp_path_factory.mktemp('ddp')
    sock, fast = str(out / 'fork.sock'), os.path.join(ROOT, 'tests', 'fastpy')
    server = forkrun.serve(sock, script_env(torch_home))
    cmd = [fast, os.path.join(ROOT, 'tests', 'torchrun'), '--standalone', '--nproc_per_node=2',
           '--no-python', fast, os.path.join(ROOT, 'tests', 'ddp_step.py'), str(out),
           *[f'{p}:{o}' for o, p in DDP_CASES]]
    try:
        r = subprocess.run(cmd, cwd=str(out), capture_output=True, text=True, timeout=300,
                           env=script_env(torch_home, FORKRUN_SOCKET=sock))
    finally:
        server.kill()
        server.wait(timeout=60)
    return out, r


@pytest.mark.slow
@pytest.mark.parametrize('objective, projector', DDP_CASES)
def test_ddp_step_equals_single_process_step(ddp_steps, objective, projector):
    """For each objective through SSLModel: two gloo ranks, each on half of a fixed global
    batch, vs one process on the whole of it. Without SyncBatchNorm on CPU each rank's
    BatchNorm layers normalise its own half, so the reference embeds each half separately,
    concatenates, and applies the loss to the whole batch in one process; the loss's gathers
    and sums across ranks must make the DDP gradients equal these (Facebook's Barlow Twins
    code gets them scaled by 1/world_size: the check below catches that)."""
    import sys

    from conftest import ROOT
    sys.path.insert(0, os.path.join(ROOT, 'tests'))
    import ddp_step as D

    out, r = ddp_steps
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    ddp = torch.load(D.result_file(out, projector, objective), weights_only=True)

    model = D.build_model(projector, objective)
    model.train()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    y1, y2 = D.global_views()
    half = D.GLOBAL_BATCH // 2
    embed = lambda y: torch.cat([model.projector(model.backbone(y[:half])),
                                 model.projector(model.backbone(y[half:]))])
    loss = model.loss_fn(embed(y1), embed(y2), **model.settings)
    opt = D.optimizer_for(model)
    opt.zero_grad()
    loss.backward()
    ref_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    ref_params = {n: p.detach().clone() for n, p in model.named_parameters()}

    # the tolerance of test_barlow.py's DDP test, for the same reason: float32 sums split
    # over two ranks round differently from one process's, ~1e-6 of a tensor's largest entry;
    # normwise 1e-4 * max |ref| + 1e-7 is 100x above that and far below a factor 2 (1/world)
    close = lambda a, b: (a - b).abs().max().item() <= 1e-4 * b.abs().max().item() + 1e-7
    # every rank holds the global loss, not its own half's
    assert ddp['losses'][0].item() == ddp['losses'][1].item()
    assert ddp['loss'].item() == pytest.approx(loss.item(), rel=1e-5)
    assert set(ddp['grads']) == set(ref_grads) == set(ddp['params'])
    bad = [n for n in ref_grads if not close(ddp['grads'][n], ref_grads[n])]
    assert not bad, f'gradients differ: {bad[:5]}'
    # an update is read back as (p + step) - p in float32: two steps a rounding apart can
    # land one ulp of p apart (1.2e-7 at |p| ~ 1, against steps ~1e-4 of 1-d parameters at
    # lr 1.5e-4), so the update check also allows 2 ulps of the parameter's largest entry
    ulp = lambda n: 2 * torch.finfo(torch.float32).eps * initial[n].abs().max().item()
    bad = [n for n in ref_params if (ddp['params'][n] - ref_params[n]).abs().max().item() >
           1e-4 * (ref_params[n] - initial[n]).abs().max().item() + 1e-7 + ulp(n)]
    assert not bad, f'updates differ: {bad[:5]}'
    # sharp enough to catch gradients scaled by 1/world_size (or by world_size)
    assert all(g.abs().max() > 1e-6 for g in ref_grads.values())  # every parameter learns
    for factor in (0.5, 2.0):
        assert not [n for n in ref_grads if close(ddp['grads'][n], factor * ref_grads[n])]
    # ... and a reference that ignores per-rank BatchNorm (whole-batch statistics) differs
    model2 = D.build_model(projector, objective)
    model2.train()
    whole = lambda y: model2.projector(model2.backbone(y))
    model2.loss_fn(whole(y1), whole(y2), **model2.settings).backward()
    assert any(not close(ddp['grads'][n], p.grad) for n, p in model2.named_parameters())
