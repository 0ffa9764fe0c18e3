"""Evaluation details the script tests leave out: finetune.py's --lr auto (the range test),
--class-weights and a run folder whose checkpoint belongs to another model; probe.py's
logistic regression (its written-out gradient) against autograd and hand-computed optima."""

import numpy as np
import pytest
import torch

from conftest import TINY


def test_lr_auto_and_class_weights(run_script, imagefolder, tmp_path):
    r = run_script('finetune.py', '--data', imagefolder, *TINY, '--protocol', 'random',
                   '--labels-per-class', '6', '--seeds', '0', '--epochs', '1', '--batch-size', '8',
                   '--lr', 'auto', '--class-weights', '--tta', '2', '--out', tmp_path / 'ft',
                   '--results', tmp_path / 'r.jsonl', '--cache-dir', tmp_path / 'c', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'lr range test chose' in r.stdout
    chosen = float(r.stdout.split('lr range test chose ')[1].split()[0])
    assert 1e-7 < chosen < 10 * 256 / 8  # inside the swept range, per 256 images


def test_pretraining_lr_auto_is_chosen_once_and_kept(run_script, imagefolder, tmp_path):
    """pretrain_barlow.py --lr auto (make paper's, as the paper chose its lr): the range test
    before the first step, its choice in lr.json and meta.json, and a resumed run keeps it."""
    import json
    out = tmp_path / 'bt'
    common = ['--data', imagefolder, *TINY, '--batch-size', '8', '--projector', '32-32',
              '--optimizer', 'adamw', '--lr', 'auto', '--cache-dir', tmp_path / 'c', '--out', out]
    r = run_script('pretrain_barlow.py', *common, '--max-steps', '2', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    chosen = float(r.stdout.split('lr range test chose ')[1].split()[0])
    assert 1e-7 * 256 / 8 / 10 <= chosen < 10 * 256 / 8  # inside the swept range, per 256
    assert json.loads((out / 'lr.json').read_text())['lr'] == pytest.approx(chosen, rel=1e-2)
    r = run_script('pretrain_barlow.py', *common, '--max-steps', '3', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'lr range test' not in r.stdout and 'resumed' in r.stdout
    assert 'as the range test chose for this run' in r.stdout
    meta = json.loads((out / 'meta.json').read_text())
    assert meta['lr'] == meta['lr_biases'] == json.loads((out / 'lr.json').read_text())['lr']
    (out / 'ckpt.pt').unlink()  # a fresh run in the folder: its lr.json may be another's
    r = run_script('pretrain_barlow.py', *common, '--max-steps', '1', cwd=tmp_path)
    assert r.returncode == 0 and 'lr range test chose' in r.stdout, r.stderr


def test_resume_into_another_model_is_refused(run_script, imagefolder, tmp_path):
    out = tmp_path / 'bt'
    common = ['--data', imagefolder, *TINY, '--batch-size', '8', '--max-steps', '2',
              '--cache-dir', tmp_path / 'c', '--out', out]
    assert run_script('pretrain_barlow.py', *common, '--projector', '32-32',
                      cwd=tmp_path).returncode == 0
    state = torch.load(out / 'ckpt.pt', weights_only=True)
    assert state['step'] == 2
    r = run_script('pretrain_barlow.py', *common, '--projector', '64-64', cwd=tmp_path)
    assert r.returncode == 2
    assert 'made with projector 32-32 (this run: projector 64-64)' in r.stderr
    assert 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert torch.load(out / 'ckpt.pt', weights_only=True)['step'] == 2  # left as it was
    # another optimizer (its state would not fit: a KeyError at the first step) or schedule
    for flags, said in ((['--optimizer', 'adamw'], 'made with optimizer LARS (this run: '
                                                   'optimizer AdamW)'),
                        (['--schedule', 'onecycle'], 'made with schedule cosine (this run: '
                                                     'schedule onecycle)')):
        r = run_script('pretrain_barlow.py', *common, '--projector', '32-32', *flags,
                       cwd=tmp_path)
        assert r.returncode == 2 and said in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    # another precision resumes (the error of a non-finite loss advises it): the fp32 run's
    # scaler state is empty, fp16's starts afresh (before: a traceback)
    r = run_script('pretrain_barlow.py', *common, '--max-steps', '3', '--projector', '32-32',
                   '--precision', 'fp16', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'resumed' in r.stdout and torch.load(out / 'ckpt.pt', weights_only=True)['step'] == 3


def test_backbone_pretrained_without_the_test_part_held_out_is_refused(tmp_path):
    """check_held_out walks the lineage meta.json records (every pretraining run behind the
    weights, each held out in all its segments or not at all); a meta.json of the older kind
    (the last segment's held_out only) proves nothing about a run on this dataset."""
    import json
    import common as C
    import pytest
    ds = {'root': str(tmp_path / 'skin')}
    split = {'test': ['a', 'b']}
    sha = C.split_sha(split)
    run = tmp_path / 'run'
    run.mkdir()
    sd = {'w': torch.arange(4.0)}
    torch.save(sd, run / 'backbone.pt')
    here, elsewhere = [ds['root']], [str(tmp_path / 'elsewhere')]
    entry = lambda held_out, roots: dict(script='pretrain_barlow', out='x', held_out=held_out,
                                         roots=roots)
    cases = [([entry(sha, here)], True), ([entry(None, here)], False),
             ([entry('other', here)], False), ([entry(None, elsewhere)], True),
             ([entry(None, here), entry(sha, here)], False),  # continued from a leaky init
             ([entry(None, [ds['root'] + '/extra'])], False),  # a folder inside the dataset
             # held out on another test part of the same size: split_sha names the ids
             ([entry(C.split_sha({'test': ['a', 'c']}), here)], False)]
    metas = [(dict(lineage=lineage), ok) for lineage, ok in cases]
    metas += [({'data_root': ds['root'], 'held_out': sha}, False),
              ({'data_root': elsewhere[0], 'held_out': None}, True)]
    for meta, ok in metas:
        meta['backbone_sha'] = C.state_fingerprint(sd)
        (run / 'meta.json').write_text(json.dumps(meta))
        for init in (str(run / 'backbone.pt'), str(run)):  # a file or its run folder
            if ok:
                C.check_held_out(init, ds, split)
            else:
                with pytest.raises(C.UserError, match='same --split'):
                    C.check_held_out(init, ds, split)
    (run / 'meta.json').write_text(json.dumps(dict(metas[0][0], backbone_sha='stale')))
    with pytest.raises(C.UserError, match='describes other weights'):
        C.check_held_out(str(run), ds, split)


# --------------------------------------------------------------------------- probe.py's fit
def test_logreg_reaches_the_optimum_of_the_written_loss():
    """fit_logreg computes its gradient by hand; at the point it returns, autograd's gradient
    of mean cross-entropy + l2 ||W||^2 (float64, written out here) must vanish."""
    import torch.nn.functional as F
    import probe
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 6, generator=g, dtype=torch.float64) + 0.5
    y = torch.randint(0, 4, (90,), generator=g)
    for l2 in (1e-3, 0.1):
        w, b = probe.fit_logreg(x, y, 4, l2, max_iter=300)
        w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        loss = -F.log_softmax(x @ w + b, 1)[torch.arange(90), y].mean() + l2 * (w * w).sum()
        loss.backward()
        # L-BFGS stops at tolerance_grad 1e-6; a wrong gradient (a missing 1/n, a penalty
        # on the bias, a factor 2) leaves entries of 1e-2 or more
        assert w.grad.abs().max() < 1e-5 and b.grad.abs().max() < 1e-5, (l2, w.grad, b.grad)


def test_probe_row_carries_the_val_score_of_its_chosen_l2():
    """A probe row's val_balanced_accuracy is the val part's score at the L2 it chose (what
    --aug-views and other budgets are chosen by): the best val score over the grid, each L2
    fitted here again along the same warm-started path, never the test part's; with one L2
    there is no choice and no val score."""
    import argparse
    import common as C
    import probe
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(4, 16, generator=g) * 1.2
    def part(n):
        y = torch.arange(n) % 4
        return {'x': centres[y] + torch.randn(n, 16, generator=g) * 2.0, 'y': y}
    train, held = part(40), part(60)
    train['ids'] = [f'i{k}' for k in range(40)]
    feats = {'train': train, 'val': held, 'test': part(60)}
    args = argparse.Namespace(l2=(1e-3, 1e-1, 10.0), max_iter=30, knn_k=5, size=16)
    row = probe.run_seed(args, {'seed': 0}, train['ids'], feats, 4)
    x = train['x'] - train['x'].mean(0)
    scores, wb = [], None
    for l2 in sorted(args.l2, reverse=True):
        wb = probe.fit_logreg(x, train['y'], 4, l2, args.max_iter, wb)
        probs = torch.softmax((held['x'] - train['x'].mean(0)) @ wb[0] + wb[1], 1)
        scores.append(C.classification_metrics(probs, held['y'], 4)['balanced_accuracy'])
    assert row['val_balanced_accuracy'] == pytest.approx(max(scores), abs=1e-6)
    assert len(set(round(s, 6) for s in scores)) > 1             # the grid makes a choice
    assert row['val_balanced_accuracy'] != pytest.approx(row['metrics']['balanced_accuracy'])
    one = probe.run_seed(argparse.Namespace(**dict(vars(args), l2=(1e-3,))), {'seed': 0},
                         train['ids'], feats, 4)
    assert 'val_balanced_accuracy' not in one


def test_logreg_bias_is_not_penalised():
    """With a huge L2 the weights vanish and the bias alone fits the class frequencies:
    softmax(b) = (1/6, 2/6, 3/6), so b1 - b0 = log 2 and b2 - b0 = log 3."""
    import math
    import probe
    x = torch.randn(60, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.tensor([0] * 10 + [1] * 20 + [2] * 30)
    w, b = probe.fit_logreg(x, y, 3, 1e4, max_iter=200)
    assert w.abs().max() < 1e-4
    assert (b[1] - b[0]).item() == pytest.approx(math.log(2), abs=1e-5)
    assert (b[2] - b[0]).item() == pytest.approx(math.log(3), abs=1e-5)


def test_probe_fits_in_full_fp32_and_restore_the_tf32_flag(monkeypatch):
    """fit_probe turns CUDA's TF32 matrix products off for its fits and puts the flag back,
    also when a fit raises; it returns W, b on the CPU (here the device is the CPU too)."""
    import probe
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g), torch.arange(40) % 3
    val = (torch.randn(12, 6, generator=g), torch.arange(12) % 3)
    flags, fit, seen = torch.backends.cuda.matmul, probe.fit_logreg, []

    def spy(*a, **k):
        seen.append(flags.allow_tf32)
        return fit(*a, **k)
    saved = flags.allow_tf32
    try:
        for before in (True, False):
            flags.allow_tf32 = before
            monkeypatch.setattr(probe, 'fit_logreg', spy)
            w, b, l2, score = probe.fit_probe(x, y, 3, (1e-3, 1e-2), 20, val)
            assert flags.allow_tf32 is before and w.device.type == 'cpu' and 0 <= score <= 1
            monkeypatch.setattr(probe, 'fit_logreg', lambda *a, **k: 1 / 0)
            with pytest.raises(ZeroDivisionError):
                probe.fit_probe(x, y, 3, (1e-3,), 20)
            assert flags.allow_tf32 is before
        assert seen == [False] * 4  # two fits a call, never with TF32
    finally:
        flags.allow_tf32 = saved


class Batches:
    """A loader of `n` one-image batches a pass, with the sampler's set_epoch."""
    def __init__(self, n):
        self.n, self.sampler = n, type('S', (), {'set_epoch': lambda self, e: None})()

    def __iter__(self):
        return iter([(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.zeros(1))] * self.n)


@pytest.mark.parametrize('k', [30, 61])
def test_lr_range_test_against_a_loss_written_out(k):
    """A loss that falls as 1/(step+1), then jumps to 100 at step k: the smoothed loss is
    least at step k-1 and passes 4x that at step k, so the answer is the lr of step k-1 over
    10, 1e-7 x 1e8^((k-1)/99) / 10; weights, optimizer state and torch's RNG are as before."""
    import common as C
    rt = C.setup_runtime('cpu', 'fp32')
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(net.parameters(), lr=0.5)
    net(torch.ones(2, 3)).sum().backward()
    opt.step()  # some state to keep
    before = ({k2: v.clone() for k2, v in net.state_dict().items()},
              {k2: v.clone() for k2, v in opt.state[net.weight].items()}, torch.get_rng_state())
    seen = []

    def step_fn(x, y, gen):
        step = len(seen)
        seen.append(opt.param_groups[0]['lr'])
        torch.rand(5)  # draws from torch's generator, as a loader's workers do
        value = 1.0 / (step + 1) if step < k else 100.0
        return net(torch.ones(1, 3)).sum() * 0 + value
    lr = C.lr_range_test(rt, net, net, Batches(7), step_fn, opt, seed=0)
    assert lr == pytest.approx(1e-7 * 1e8 ** ((k - 1) / 99) / 10, rel=1e-12)
    assert len(seen) == k + 1 and seen[0] == pytest.approx(1e-7, rel=1e-12)
    assert all(torch.equal(v, before[0][k2]) for k2, v in net.state_dict().items())
    assert all(torch.equal(v, before[1][k2]) for k2, v in opt.state[net.weight].items())
    assert torch.equal(torch.get_rng_state(), before[2]) and opt.param_groups[0]['lr'] == 0.5


def test_class_weights_and_label_smoothing_against_the_loss_written_out():
    """finetune.py --class-weights: n / (classes x n_c) (15, 10, 5 labels: 2/3, 1, 2; a class
    without labels n / classes), and the step's loss is the weighted or smoothed cross-entropy
    written out in float64: sum_i w_yi sum_k q_ik (-log p_ik) / sum_i w_yi, with q = (1 - e)
    onehot + e / K. Before, no test could tell the weights from none."""
    import common as C
    import finetune
    w = finetune.class_weights([0] * 15 + [1] * 10 + [2] * 5, 3)
    assert w.tolist() == pytest.approx([30 / 45, 1.0, 2.0], rel=1e-6)
    assert finetune.class_weights([0, 0, 1], 3).tolist() == pytest.approx([0.5, 1.0, 1.0])
    rt = C.setup_runtime('cpu', 'fp32')
    backbone, width = C.make_backbone('resnet10')
    view = C.preset_params('eval', size=16)[0]
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    # the scripts' uses: fine-tuning's weights, supervised pretraining's smoothing (together,
    # torch weighs the smoothing term by each class k's weight: never used here)
    for weight, eps in ((None, 0.0), (w, 0.0), (None, 0.1)):
        model, raw, step_fn = C.classifier_task(rt, backbone, width, 3, view, eps, weight)
        raw.eval()  # BN in eval mode: the same logits twice
        loss = step_fn(x, y, torch.Generator())
        logp = torch.log_softmax(raw(C.augment(x, view, torch.Generator())).double(), 1)
        q = (1 - eps) * torch.nn.functional.one_hot(y, 3).double() + eps / 3
        wy = torch.ones(6, dtype=torch.float64) if weight is None else weight.double()[y]
        want = (wy * (q * -logp).sum(1)).sum() / wy.sum()
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_test_time_augmentation_is_the_mean_softmax_over_every_view(imagefolder, tmp_path):
    """predict(softmax=True) in batches of 4 equals the mean over the views of the softmax,
    computed at once over all the images with the same drawn parameters."""
    import common as C
    ds = C.read_dataset(imagefolder)
    cache = C.build_cache(ds, 16, str(tmp_path / 'c'), workers=0, verbose=False)
    rt = C.setup_runtime('cpu', 'fp32')
    torch.manual_seed(0)
    fn = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
    views = [C.preset_params('eval', size=16)[0]] + [C.preset_params('finetune_skin',
                                                                      size=16)[0]] * 2
    positions = list(range(10))
    x = C._as_float(torch.from_numpy(np.load(cache['file'])[positions]).permute(0, 3, 1, 2))
    drawn = [C.draw_params(v, 10, 16, 16, torch.Generator().manual_seed(k))
             for k, v in enumerate(views)]
    with torch.no_grad():
        got, labels = C.predict(rt, fn, cache, positions, 4, views, softmax=True, drawn=drawn)
        each = [torch.softmax(fn(C.apply_params(x, v, d)), 1) for v, d in zip(views, drawn)]
    assert torch.allclose(got, torch.stack(each).mean(0), atol=1e-6)
    assert not torch.allclose(got, each[-1], atol=1e-3)  # the views differ: all of them count
    assert labels.tolist() == [cache['labels'][k] for k in positions]
