"""Every script end to end, as subprocesses with tiny settings on the fixture ImageFolder:
supervised pretraining -> Barlow Twins on the split's pool (last block only) -> fine-tuning and
linear probe over two seeds; reruns (same seed, same row; finished seeds skipped) and the
refusals (test images in --extra-data, a checkpoint of another architecture, bad flags)."""
import hashlib
import json
import os
import shutil
import signal
import sys

import pytest
import torch

import common
from conftest import ARCH, TINY


def sha(path):
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def work(tmp_path_factory, imagefolder):
    """The split, made once with `common.py split` (in-process: the same _cli function)."""
    d = tmp_path_factory.mktemp('scripts')
    common._cli(['split', '--data', imagefolder, '--protocol', 'random',
                 '--out', str(d / 'split.json')])
    return d


@pytest.fixture(scope='module')
def sup(work, imagefolder, run_script):
    """On the split's train part: the backbones evaluated below descend from it, and
    finetune.py refuses one whose lineage ever trained on the test images."""
    r = run_script('pretrain_supervised.py', '--data', imagefolder, '--split',
                   work / 'split.json', *TINY, '--batch-size', '8', '--max-steps', '4',
                   '--cache-dir', work / 'cache', '--out', work / 'sup', cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope='module')
def bt(work, imagefolder, sup, run_script):
    """Barlow Twins on the split's pretrain pool from the supervised backbone, BT_ variant."""
    r = run_script('pretrain_barlow.py', '--data', imagefolder, '--split', work / 'split.json',
                   *TINY, '--init', work / 'sup' / 'backbone.pt', '--train-blocks', 'last',
                   '--projector', '32-32', '--batch-size', '8', '--max-steps', '3',
                   '--optimizer', 'adamw', '--lr', '0.1', '--lr-biases', '0.1',
                   '--warmup-epochs', '0', '--cache-dir', work / 'cache', '--out', work / 'bt',
                   cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def eval_args(script, work, imagefolder, results, cache='cache', *extra):
    args = ['--data', imagefolder, '--split', work / 'split.json', *TINY,
            '--init', work / 'bt' / 'backbone.pt', '--init-name', 'bt',
            '--labels-per-class', '8', '--seeds', '0-1', '--results', results,
            '--cache-dir', work / cache]
    if script == 'finetune.py':
        args += ['--epochs', '1', '--head-epochs', '1', '--batch-size', '8', '--lr', '1e-3',
                 '--tta', '2', '--out', work / 'ft']
    else:
        args += ['--batch-size', '16', '--max-iter', '20', '--knn-k', '5']
    return (script, [*args, *extra])


@pytest.fixture(scope='module')
def evals(work, imagefolder, bt, run_scripts):
    """First finetune.py and probe.py runs (seeds 0-1, results A) next to the run with a
    resnet18 checkpoint given to --arch resnet50; then reruns into results B, which already
    holds seed 0's row from A, with a fresh cache folder: seed 0 must be skipped and seed 1
    must reproduce A's row."""
    before = (sha(work / 'bt' / 'backbone.pt'), os.stat(work / 'bt' / 'backbone.pt').st_mtime_ns)
    first = run_scripts([
        eval_args('finetune.py', work, imagefolder, work / 'ft-A.jsonl'),
        eval_args('probe.py', work, imagefolder, work / 'probe-A.jsonl'),
        ('finetune.py', ['--data', imagefolder, '--split', work / 'split.json', *TINY,
                         '--arch', 'resnet50', '--init', work / 'sup' / 'backbone.pt',
                         '--seeds', '0', '--results', work / 'x.jsonl', '--lr', '1e-3',
                         '--cache-dir', work / 'cache', '--out', work / 'ft50']),
    ], cwd=work)
    for r in first[:2]:
        assert r.returncode == 0, r.stderr[-3000:]
    for kind in ('ft', 'probe'):
        with open(work / f'{kind}-A.jsonl') as f, open(work / f'{kind}-B.jsonl', 'w') as g:
            g.write(f.readline())
    second = run_scripts([
        eval_args('finetune.py', work, imagefolder, work / 'ft-B.jsonl', 'cache2'),
        eval_args('probe.py', work, imagefolder, work / 'probe-B.jsonl', 'cache2'),
    ], cwd=work)
    for r in second:
        assert r.returncode == 0, r.stderr[-3000:]
    after = (sha(work / 'bt' / 'backbone.pt'), os.stat(work / 'bt' / 'backbone.pt').st_mtime_ns)
    return dict(ft=first[0], probe=first[1], arch=first[2], ft2=second[0], probe2=second[1],
                backbone_before=before, backbone_after=after)


# --------------------------------------------------------------------------- pretraining
def test_pretrain_supervised(work, sup):
    assert 'val top-1' in sup.stdout
    sd = torch.load(work / 'sup' / 'backbone.pt', weights_only=True)
    assert not [k for k in sd if k.startswith('fc.')]
    m, _ = common.make_backbone(ARCH)
    m.load_state_dict(sd)  # strict: exactly the backbone of --arch
    meta = json.loads((work / 'sup' / 'meta.json').read_text())
    assert 0 <= meta['val']['top1'] <= meta['val']['top5'] <= 1
    assert meta['classes'] == ['c0', 'c1', 'c2']


def test_pretrain_supervised_validates_at_each_epoch_end(work, imagefolder, run_script):
    """Two whole epochs: the loop's epoch hook runs (its record names its epoch itself)."""
    r = run_script('pretrain_supervised.py', '--data', imagefolder, '--split',
                   work / 'split.json', *TINY, '--batch-size', '8', '--epochs', '2',
                   '--cache-dir', work / 'cache', '--out', work / 'sup-epochs', cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(work / 'sup-epochs' / 'log.jsonl') as f:
        epochs = [rec for rec in map(json.loads, f) if 'top1' in rec]
    assert [rec['epoch'] for rec in epochs] == [1, 2]
    assert r.stdout.count('val top-1') == 2


def is_conv(k):
    return k.endswith('.weight') and ('conv' in k or 'downsample.0' in k)


def test_pretrain_barlow_on_split_pool_trains_only_the_last_block(work, bt):
    split = json.loads((work / 'split.json').read_text())
    assert f'pool: {len(split["pretrain"])} images' in bt.stdout  # the split's pool, no test
    init = torch.load(work / 'sup' / 'backbone.pt', weights_only=True)
    out = torch.load(work / 'bt' / 'backbone.pt', weights_only=True)
    assert init.keys() == out.keys()
    convs = [k for k in init if is_conv(k)]
    block = max(int(k.split('.')[1]) for k in init if k.startswith('layer4.'))
    last = [k for k in convs if k.startswith(f'layer4.{block}.')]
    # resnet10's one block of layer4 has its downsampling conv; resnet18's last has none
    assert (len(last), len(convs)) == {'resnet10': (3, 12), 'resnet18': (2, 20)}[ARCH]
    frozen_changed = [k for k in convs if k not in last and not torch.equal(init[k], out[k])]
    assert not frozen_changed
    assert all(not torch.equal(init[k], out[k]) for k in last)
    # BN stays trainable everywhere (fastai's freeze, the paper's BT_ setting)
    assert not torch.equal(init['layer1.0.bn1.weight'], out['layer1.0.bn1.weight'])
    meta = json.loads((work / 'bt' / 'meta.json').read_text())
    assert meta['init'] == str(work / 'sup' / 'backbone.pt')


def run_main(module, argv, monkeypatch, capsys, cwd):
    """Run a script's main() in-process as `python SCRIPT.py argv` would, through main_guard;
    returns (exit status, stdout, stderr)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, 'argv', [module + '.py'] + [str(a) for a in argv])
    mod = __import__(module)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as e:
            common.main_guard(mod.main)
            raise SystemExit(0)  # main returned: it did not refuse
    finally:  # a run that got as far as common.fit installed its stop handlers
        for s, h in handlers.items():
            signal.signal(s, h)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.parametrize('layout', ['same', 'flat'])
def test_pretrain_barlow_refuses_extra_data_with_test_images(work, imagefolder, layout,
                                                             monkeypatch, capsys, tmp_path):
    split = json.loads((work / 'split.json').read_text())
    leaked = split['test'][:3]
    extra = tmp_path / 'extra'
    for i in leaked:
        dst = extra / (i if layout == 'same' else os.path.basename(i))
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(imagefolder, i), dst)
    shutil.copy(os.path.join(imagefolder, split['train'][0]), extra / 'unrelated.png')
    code, out, err = run_main('pretrain_barlow', [
        '--data', imagefolder, '--split', work / 'split.json', *TINY, '--projector', '32-32',
        '--batch-size', '8', '--max-steps', '1', '--extra-data', extra,
        '--cache-dir', tmp_path / 'cache', '--out', tmp_path / 'run'], monkeypatch, capsys,
        tmp_path)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert all(os.path.splitext(os.path.basename(i))[0] in lines[0] for i in leaked), err
    assert 'unrelated' not in lines[0]
    assert not (tmp_path / 'run').exists() and not (tmp_path / 'cache').exists()


def test_pretrain_barlow_pool_train_is_the_split_train_part(work, imagefolder, monkeypatch,
                                                          capsys, tmp_path):
    """--pool train pretrains on the split's labelled train part alone (the paper's BT_ rows),
    says so and records it; a resume with the other pool is refused, and so is the flag
    without a split."""
    split = json.loads((work / 'split.json').read_text())
    assert len(split['train']) < len(split['pretrain'])  # the val part is in the default pool
    argv = ['--data', imagefolder, *TINY, '--projector', '32-32', '--batch-size', '8',
            '--max-steps', '1', '--cache-dir', work / 'cache', '--out', tmp_path / 'run']
    code, out, err = run_main('pretrain_barlow', argv + ['--split', work / 'split.json',
                                                        '--pool', 'train'],
                              monkeypatch, capsys, tmp_path)
    assert code == 0, err
    assert f'pool: {len(split["train"])} images (the train part),' in out
    meta = json.loads((tmp_path / 'run' / 'meta.json').read_text())
    assert (meta['pool'], meta['pool_images']) == ('train', len(split['train']))
    ckpt = tmp_path / 'run' / 'ckpt.pt'
    before = sha(ckpt)
    code, out, err = run_main('pretrain_barlow', argv + ['--split', work / 'split.json'],
                              monkeypatch, capsys, tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert 'pool train' in err and 'pool all' in err, err
    assert sha(ckpt) == before
    code, out, err = run_main('pretrain_barlow', argv + ['--pool', 'train'], monkeypatch, capsys,
                              tmp_path)
    assert code == 2 and '--pool train needs --split' in err, err


# --------------------------------------------------------------------------- evaluation
METRICS = {'accuracy', 'balanced_accuracy', 'macro_f1', 'weighted_f1', 'auroc',
           'per_class_recall', 'confusion_matrix', 'n'}


def check_rows(path, protocol, work):
    got = rows(path)
    split = json.loads((work / 'split.json').read_text())
    assert [r['seed'] for r in got] == [0, 1]
    for r in got:
        assert r['protocol'] == protocol and r['init'] == 'bt' and r['labels'] == 24
        assert set(r['metrics']) >= METRICS
        assert r['metrics']['n'] == len(split['test'])
        assert 0 <= r['metrics']['accuracy'] <= 1
    return got


def same_result(a, b, keys):
    assert a['seed'] == b['seed']
    for k in keys:
        assert a[k] == b[k], k


@pytest.mark.slow
def test_finetune_two_seeds_rerun_and_skip(work, evals):
    a = check_rows(work / 'ft-A.jsonl', 'finetune', work)
    assert not (work / 'ft' / 'bt-seed0').exists()  # per-seed checkpoints are cleaned up
    b = rows(work / 'ft-B.jsonl')
    assert 'seed 0: already in' in evals['ft2'].stdout
    assert [r['seed'] for r in b] == [0, 1]
    # CPU: the same seed gives the same row (fresh cache, fresh process)
    same_result(b[1], a[1], ['metrics', 'labels', 'steps', 'lr', 'backbone_sha'])


@pytest.mark.slow
def test_probe_two_seeds_rerun_skip_and_frozen_file(work, evals):
    a = check_rows(work / 'probe-A.jsonl', 'probe', work)
    b = rows(work / 'probe-B.jsonl')
    assert 'seed 0: already in' in evals['probe2'].stdout
    assert [r['seed'] for r in b] == [0, 1]
    same_result(b[1], a[1], ['metrics', 'knn_accuracy', 'l2', 'labels', 'backbone_sha'])
    assert evals['backbone_after'] == evals['backbone_before']  # bytes and mtime
    # A extracted the train images of seeds 0 and 1, B those of seed 1 alone; an image's
    # augmented views must not depend on which others were extracted with it
    (fa,), (fb,) = [list((work / c).glob('features-*.pt')) for c in ('cache', 'cache2')]
    ta, tb = [torch.load(f, weights_only=True)['train'] for f in (fa, fb)]
    assert set(tb['ids']) < set(ta['ids'])
    pos = [ta['ids'].index(i) for i in tb['ids']]
    assert tb['x_aug'].shape[0] == ta['x_aug'].shape[0] > 0
    assert torch.allclose(tb['x_aug'], ta['x_aug'][:, pos], rtol=1e-4, atol=1e-5)
    assert torch.allclose(tb['x'], ta['x'][pos], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_probe_grows_its_feature_cache(work, evals, imagefolder, run_script):
    """Seeds 2-3 after seeds 0-1 with the same cache folder: the one features file gains
    the new labelled images only; what it held stays as it was."""
    (path,) = list((work / 'cache').glob('features-*.pt'))
    old = torch.load(path, weights_only=True)['train']
    script, args = eval_args('probe.py', work, imagefolder, work / 'probe-C.jsonl')
    args[args.index('0-1')] = '2-3'
    r = run_script(script, *args, cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((work / 'cache').glob('features-*.pt')) == [path]
    new = torch.load(path, weights_only=True)['train']
    n = len(old['ids'])
    assert new['ids'][:n] == old['ids'] and len(new['ids']) > n
    assert torch.equal(new['x'][:n], old['x']) and torch.equal(new['x_aug'][:, :n], old['x_aug'])
    assert [row['seed'] for row in rows(work / 'probe-C.jsonl')] == [2, 3]


@pytest.mark.slow
def test_probe_several_budgets_in_one_run(work, evals, imagefolder, run_script):
    """--labels-per-class 4 8: one process, one row per (budget, seed); the 8-label rows are
    those of the single-budget run, and a rerun skips all four."""
    out = work / 'probe-D.jsonl'
    script, args = eval_args('probe.py', work, imagefolder, out, 'cache-D')
    i = args.index('--labels-per-class') + 1
    args[i:i + 1] = ['4', '8']
    for _ in range(2):
        r = run_script(script, *args, cwd=work)
        assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('already in') == 4
    got = {(row['labels_rule'], row['seed']): row for row in rows(out)}
    assert sorted(got) == [('per_class=4', 0), ('per_class=4', 1),
                           ('per_class=8', 0), ('per_class=8', 1)]
    assert all(got['per_class=4', s]['labels'] < got['per_class=8', s]['labels'] for s in (0, 1))
    for a in rows(work / 'probe-A.jsonl'):
        same_result(got['per_class=8', a['seed']], a, ['metrics', 'knn_accuracy', 'l2', 'labels'])


@pytest.mark.slow
def test_finetune_refuses_checkpoint_of_another_arch(evals, work):
    r = evals['arch']
    assert r.returncode == 2, r.stderr[-3000:]
    assert 'Traceback' not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f'--arch {ARCH}' in lines[0], r.stderr
    assert not os.path.exists(work / 'x.jsonl')


# --------------------------------------------------------------------------- bad flags
SCRIPTS = ['pretrain_barlow', 'pretrain_supervised', 'finetune', 'probe']


BAD_VALUES = [(s, f, v) for s in SCRIPTS for f, v in [('--batch-size', '0'), ('--size', '4'),
                                                       ('--workers', '-1')]]
BAD_VALUES += [(s, f, v) for s in SCRIPTS[:3] for f, v in [
    ('--epochs', '0'), ('--lr', 'nan'), ('--lr', '-1'), ('--log-every', '0'),
    ('--ckpt-minutes', 'inf'), ('--max-steps', '-2')]]
BAD_VALUES += [('finetune', '--seeds', '3-x'), ('probe', '--seeds', '-1'),
               ('probe', '--label-fraction', '1.5'), ('pretrain_barlow', '--lambd', '-0.1'),
               ('pretrain_supervised', '--label-smoothing', '2')]


@pytest.mark.parametrize('script, flag, value', BAD_VALUES)
def test_bad_flag_values(script, flag, value, capsys):
    mod = __import__(script)
    with pytest.raises(SystemExit) as e:
        mod.get_args(['--data', 'x', '--out', 'y', flag, value] if script != 'probe' else
                     ['--data', 'x', flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    errors = [l for l in err.splitlines() if 'error' in l]
    assert len(errors) == 1 and f'argument {flag}: {value}:' in errors[0], err


# every script takes only the flags it uses: one it would ignore is an argparse error
UNUSED = [('probe', f) for f in ('--epochs 3', '--lr 0.1', '--max-steps 5', '--out x',
                                  '--compile', '--log-every 2', '--ckpt-every 2',
                                  '--ckpt-minutes 1', '--seed 1')]
UNUSED += [('finetune', '--seed 1'), ('pretrain_barlow', '--seeds 0-3'),
           ('pretrain_supervised', '--labels-per-class 5')]


@pytest.mark.parametrize('script, flag', UNUSED)
def test_flags_a_script_does_not_use_are_errors(script, flag, capsys):
    mod = __import__(script)
    with pytest.raises(SystemExit) as e:
        mod.get_args(['--data', 'x', *flag.split()])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert 'unrecognized arguments' in err and flag.split()[0] in err, err


def test_default_workers_fit_the_machine(monkeypatch):
    import common as C
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    assert C.default_workers() == max(0, min(8, cores - 1))
    monkeypatch.setenv('LOCAL_WORLD_SIZE', str(cores))  # one rank per core: no room left
    assert C.default_workers() == 0


@pytest.mark.parametrize('script', SCRIPTS)
def test_missing_data_folder(script, tmp_path, monkeypatch, capsys):
    missing = tmp_path / 'no-such-data'
    out_flag = [] if script == 'probe' else ['--out', tmp_path / 'run']
    code, out, err = run_main(script, ['--data', missing, *TINY, *out_flag,
                                       '--cache-dir', tmp_path / 'cache'],
                              monkeypatch, capsys, tmp_path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and '--data' in lines[0], err
    assert not (tmp_path / 'run').exists() and not (tmp_path / 'cache').exists()
