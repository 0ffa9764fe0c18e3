"""Seeing a pretraining run learn: the loss's parts, the collapse signals (RankMe, feature
spread), the kNN monitor on the target task, and what a run writes to its log."""
import json

import pytest
import torch

import common as C
import pretrain_barlow
from conftest import ARCH, TINY


# --------------------------------------------------------------------------- collapse signals
def low_rank(k, n=256, d=64, noise=1e-4, seed=0):
    """(n, d) features of rank k with k equal singular values (10), plus noise whose 63
    singular values (~2.4e-3 each) RankMe's L1 mass counts too."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return (10 * u @ v.T + noise * torch.randn(n, d, generator=g, dtype=torch.float64)).float()


@pytest.mark.parametrize('k', [1, 4, 16])
def test_effective_rank_of_a_rank_k_matrix_is_about_k(k):
    rank = C.feature_stats(low_rank(k))['rankme']
    assert k <= rank < 1.15 * k + 0.3, rank


def test_effective_rank_by_hand_and_of_constant_features():
    # singular values 3 and 1: p = (3/4, 1/4), exp(-(3/4 ln 3/4 + 1/4 ln 1/4)) = 1.7548
    h = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    assert C.feature_stats(h, eps=0)['rankme'] == pytest.approx(1.7547654, abs=1e-5)
    for h in (torch.ones(32, 64), torch.zeros(32, 64), torch.full((8, 16), -2.5)):
        s = C.feature_stats(h)
        assert s['rankme'] == pytest.approx(1.0, abs=1e-3) and s['feat_std'] == 0.0


def test_feature_spread_against_the_formula():
    h = torch.randn(100, 32, generator=torch.Generator().manual_seed(1))
    n = h / h.norm(dim=1, keepdim=True)
    ref = n.double().std(0, unbiased=True).mean().item()  # the std over the batch, per dim
    assert C.feature_stats(h)['feat_std'] == pytest.approx(ref, rel=1e-5)


def test_collapse_warning_once_after_three_low_logs(capsys):
    watch = pretrain_barlow.collapse_watch(width=512)  # warns below rank 5.12
    healthy = {'features': torch.randn(64, 64)}
    collapsed = {'features': torch.ones(64, 64)}
    for stats in (collapsed, collapsed, healthy, collapsed, collapsed):
        watch(stats)
    assert 'collapsing' not in capsys.readouterr().out  # never three in a row
    for _ in range(5):
        figures = watch(collapsed)
    out = capsys.readouterr().out
    assert out.count('collapsing') == 1 and 'lower --lr' in out
    assert figures['rankme'] < 1.01 and watch({}) == {}


# --------------------------------------------------------------------------- loss parts
@pytest.mark.parametrize('n, d', [(8, 64), (64, 8)])  # the Gram path and the (D, D) path
def test_loss_parts_add_up_to_the_loss(n, d):
    g = torch.Generator().manual_seed(n)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    loss, parts = C.barlow_loss(z1, z2, lambd=0.02, parts=True)
    assert torch.equal(loss, C.barlow_loss(z1, z2, lambd=0.02))  # the same number
    assert (parts['loss_inv'] + parts['loss_red']).item() == pytest.approx(loss.item(), rel=1e-6)
    # float64 reference of each term
    zn = [(z - z.double().mean(0)) / z.double().std(0, unbiased=False) for z in (z1, z2)]
    c = zn[0].T @ zn[1] / n
    inv = ((1 - c.diagonal()) ** 2).sum()
    red = 0.02 * (c.pow(2).sum() - c.diagonal().pow(2).sum())
    assert parts['loss_inv'].item() == pytest.approx(inv.item(), rel=1e-4)
    assert parts['loss_red'].item() == pytest.approx(red.item(), rel=1e-4)
    assert parts['inv_per_dim'].item() == pytest.approx(inv.item() / d, rel=1e-4)
    assert parts['red_per_dim'].item() == pytest.approx(red.item() / d, rel=1e-4)
    z1.requires_grad_()
    loss, parts = C.barlow_loss(z1, z2, lambd=0.02, parts=True)
    assert loss.requires_grad and not parts['loss_inv'].requires_grad  # parts: for the log


def test_ssl_model_stats_carry_features_and_parts():
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6))
    m = C.BarlowTwins(backbone, 6, '16-8', lambd=0.01)
    y1, y2 = torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)
    torch.manual_seed(0)
    loss, stats = m(y1, y2, stats=True)
    assert loss.requires_grad and stats['features'].shape == (5, 6)
    assert not stats['features'].requires_grad
    assert {'loss_inv', 'loss_red', 'inv_per_dim', 'red_per_dim'} <= set(stats)


# --------------------------------------------------------------------------- kNN
def test_knn_predict_against_a_brute_force_vote():
    g = torch.Generator().manual_seed(2)
    tx, ty, x = torch.randn(30, 5, generator=g), torch.randint(0, 3, (30,), generator=g), \
        torch.randn(7, 5, generator=g)
    probs = C.knn_predict(tx, ty, x, 3, k=4, t=0.1)
    for i in range(7):
        sims = [(float(x[i] @ tx[j] / (x[i].norm() * tx[j].norm())), int(ty[j]))
                for j in range(30)]
        votes = [0.0] * 3
        for s, c in sorted(sims, reverse=True)[:4]:
            votes[c] += torch.exp(torch.tensor(s / 0.1, dtype=torch.float64)).item()
        ref = [v / sum(votes) for v in votes]
        assert probs[i].tolist() == pytest.approx(ref, rel=1e-4)
    # half-precision features vote in fp32: exp(1 / 0.07) = 1.6e6 overflows fp16 to NaN
    half = C.knn_predict(tx.half(), ty, x.half(), 3, k=4)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    torch.testing.assert_close(half, C.knn_predict(tx.half().float(), ty, x.half().float(), 3,
                                                   k=4))


@pytest.fixture(scope='module')
def skin(tmp_path_factory):
    """A tiny synthetic skin set, its split and cache."""
    from test_synthetic import run as synth
    d = tmp_path_factory.mktemp('mon')
    synth('--out', d, '--only', 'skin', '--size', '32', '--skin-count', '120', '--workers', '1')
    ds = C.read_dataset(str(d / 'skin'))
    split = C.make_split(ds, 'random', seed=0)
    C.save_split(str(d / 'split.json'), split)
    cache = C.build_cache(ds, 40, str(d / 'cache'), workers=0, verbose=False)
    return d, ds, split, cache


def test_monitor_knn_equals_the_probe_knn_on_the_same_features(skin):
    d, ds, split, cache = skin
    rt = C.setup_runtime('cpu', 'fp32')
    torch.manual_seed(0)
    backbone, _ = C.make_backbone(ARCH)
    got = pretrain_barlow.knn_monitor(rt, backbone, ds, cache, split, 32)(3)
    # the probe's path: probe.py's eval-view features (C.predict), then its kNN
    ref = C.labelled_subset(ds, split['train'], seed=0, per_class=25)
    backbone.eval()
    feats = [C.predict(rt, backbone, cache, C.cache_positions(cache, ids), 64,
                       C.preset_params('eval', size=32)) for ids in (ref, split['val'])]
    (fr, yr), (fv, yv) = feats
    classes = len(cache['classes'])
    want = C.classification_metrics(C.knn_predict(fr, yr, fv, classes), yv, classes)
    assert got['knn_bal_acc'] == pytest.approx(want['balanced_accuracy'], abs=1e-9)


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_a_run_with_split_logs_the_monitor_at_its_epochs(skin, run_script, tmp_path):
    d, _, _, _ = skin
    base = ['--data', d / 'skin', *TINY, '--batch-size', '16', '--projector', '32-32',
            '--epochs', '3', '--log-every', '2', '--cache-dir', d / 'cache']
    r = run_script('pretrain_barlow.py', *base, '--split', d / 'split.json',
                   '--monitor-every', '2', '--out', tmp_path / 'with', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    log = read_log(tmp_path / 'with' / 'log.jsonl')
    knn = [(rec['epoch'], rec['knn_bal_acc']) for rec in log if 'knn_bal_acc' in rec]
    assert [e for e, _ in knn] == [0, 2] and all(0 <= v <= 1 for _, v in knn)
    assert r.stdout.count('kNN on the val part') == 2
    steps = [rec for rec in log if 'loss' in rec]
    assert steps and all({'loss_inv', 'loss_red', 'inv_per_dim', 'red_per_dim', 'rankme',
                          'feat_std'} <= set(rec) for rec in steps)
    assert all(rec['loss'] == pytest.approx(rec['loss_inv'] + rec['loss_red'], rel=1e-5)
               for rec in steps)
    r = run_script('pretrain_barlow.py', *base, '--out', tmp_path / 'without', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not any('knn_bal_acc' in rec for rec in read_log(tmp_path / 'without' / 'log.jsonl'))
    assert 'kNN' not in r.stdout and 'monitor' not in r.stdout


def test_a_source_run_is_watched_on_another_datasets_split(skin, imagefolder, run_script,
                                                          tmp_path):
    """--monitor-data/--monitor-split: pretraining on one set (the source), the kNN scored on
    another set's val part (the target task) at its epochs; one flag alone is refused."""
    d, _, _, _ = skin
    base = ['--data', imagefolder, *TINY, '--batch-size', '16', '--projector', '32-32',
            '--epochs', '2', '--cache-dir', d / 'cache']
    r = run_script('pretrain_barlow.py', *base, '--monitor-data', d / 'skin', '--monitor-split',
                   d / 'split.json', '--out', tmp_path / 'src', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    log = read_log(tmp_path / 'src' / 'log.jsonl')
    assert [rec['epoch'] for rec in log if 'knn_bal_acc' in rec] == [0, 1, 2]
    r = run_script('pretrain_barlow.py', *base, '--out', tmp_path / 'plain', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    watched, plain = [C.load_checkpoint(str(tmp_path / run / 'backbone.pt'))
                      for run in ('src', 'plain')]
    assert all(torch.equal(watched[k], plain[k]) for k in plain)  # watching changes nothing
    for argv in (['--monitor-data', str(d / 'skin')], ['--monitor-split', 'x.json']):
        with pytest.raises(SystemExit) as e:
            pretrain_barlow.get_args(['--data', 'x', *argv])
        assert e.value.code == 2
