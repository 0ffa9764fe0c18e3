"""Bad inputs and faults as a new user meets them: flags out of range, output paths that
cannot be written, malformed text inputs, dataset layouts that used to fall through, damaged
derived files, torn result lines, failed appends, and the routes by which test images could
reach pretraining. Each case ends in one `error: ...` line with exit status 2 and nothing
half-written, or in a named note, never in a traceback or a silent guess. The scripts'
main() runs in-process on a 20-image ImageFolder of 16 px images (resnet10, one step);
report.py runs as a subprocess (its guard lives under __main__)."""
import contextlib
import errno
import io
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common as C
import forkrun
from conftest import ROOT, script_env, write_imagefolder

T16 = ['--arch', 'resnet10', '--size', '16', '--cache-size', '16', '--workers', '0',
       '--device', 'cpu', '--offline']
PRE = ['--projector', '16-16', '--batch-size', '4', '--max-steps', '1']
FT = ['--labels-per-class', '3', '--seeds', '0', '--epochs', '1', '--head-epochs', '0',
      '--batch-size', '4', '--lr', '1e-3', '--tta', '1', '--max-steps', '1']
PROBE = ['--labels-per-class', '3', '--seeds', '0', '--aug-views', '1', '--max-iter', '5']


def run(module, *argv, cwd):
    """`python MODULE.py argv` in-process, through main_guard: (exit status, stdout, stderr).
    module 'common' runs the `python common.py ...` tool."""
    out, err = io.StringIO(), io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    here, argv = os.getcwd(), [str(a) for a in argv]
    fn = (lambda: C._cli(argv)) if module == 'common' else __import__(module).main
    old_argv, sys.argv = sys.argv, [module + '.py'] + argv
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                C.main_guard(fn)
                code = 0
            except SystemExit as e:
                code = e.code
    finally:
        os.chdir(here)
        sys.argv = old_argv
        for s, h in handlers.items():  # fit installs its stop handlers
            signal.signal(s, h)
    return code, out.getvalue(), err.getvalue()


def refused(result, *words):
    """Exit status 2 and exactly one line on stderr, `error: ...`, holding every word."""
    code, out, err = result
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith('error: '), (code, err[-2000:])
    assert all(str(w) in lines[0] for w in words), (words, lines[0])
    return lines[0]


def ok(result):
    code, out, err = result
    assert code == 0 and 'Traceback' not in err, err[-3000:]
    return out, err


def run_report(*argv, cwd):
    """report.py in a process of its own, forked from the fork server (forkrun.py)."""
    return forkrun.Run(os.path.join(ROOT, 'report.py'), argv, str(cwd),
                       script_env(os.path.join(cwd, 'torch_home'))).wait(60)


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """One thread for the in-process runs, as conftest gives the subprocess ones: two busy
    threads on 2 shared cores make each tiny step 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """data/: 2 classes x 10 PNGs of 16 px; split.json (random: 4 test, 2 val, 14 train)."""
    d = tmp_path_factory.mktemp('bad')
    write_imagefolder(d / 'data', classes=2, per_class=10, side=16)
    ok(run('common', 'split', '--data', d / 'data', '--out', d / 'split.json', cwd=d))
    return d


def data_args(tiny, split=True):
    return ['--data', tiny / 'data', *(['--split', tiny / 'split.json'] if split else []), *T16]


def pretrain(tiny, out, *extra, split=True, cwd=None):
    return run('pretrain_barlow', *data_args(tiny, split), *PRE, '--cache-dir',
               tiny / 'cache', '--out', out, *extra, cwd=cwd or tiny)


def finetune(tiny, init, results, out, *extra, data=None):
    args = data_args(tiny) if data is None else ['--data', data, '--split', tiny / 'split.json',
                                                 *T16]
    return run('finetune', *args, *FT, '--init', init, '--cache-dir', tiny / 'cache',
               '--out', out, '--results', results, *extra, cwd=tiny)


def rows(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def split_of(tiny):
    return json.loads((tiny / 'split.json').read_text())


# --------------------------------------------------------------------------- flags
# values argparse let through before (a traceback or a hang later), or caught only after the
# cache was built; each is now refused by the flag's type, before any work
FLAGS = [
    ('pretrain_barlow', '--batch-size', '1'),      # BatchNorm: ValueError at the first step
    ('pretrain_supervised', '--batch-size', '1'),
    ('finetune', '--batch-size', '1'),
    ('pretrain_barlow', '--size', '100000'),       # a 30 TB cache
    ('probe', '--cache-size', '5000'),
    ('finetune', '--workers', '100000'),
    ('pretrain_barlow', '--seed', '99999999999999999999'),  # torch.manual_seed overflow
    ('finetune', '--seeds', '0-20000'),            # a list of 20001 seeds built and run
    ('probe', '--seeds', '4294967296'),
    ('pretrain_barlow', '--projector', '64-0'),    # refused only after the cache was built
    ('pretrain_barlow', '--projector', '64-x'),
    ('pretrain_supervised', '--label-smoothing', '1'),  # a uniform target: nothing to learn
    ('pretrain_barlow', '--warmup-epochs', '1e308'),  # OverflowError: int(inf) steps
    ('finetune', '--head-epochs', '1e308'),
    ('pretrain_supervised', '--weight-decay', '1e308'),  # RuntimeError: float overflow
    ('pretrain_barlow', '--lr', '1e308'),
    ('probe', '--l2', '1e308'),                    # a non-finite fit, then a ValueError
    ('probe', '--aug-views', '100000'),            # (V, n, D) features: out of memory
]


@pytest.mark.parametrize('script, flag, value', FLAGS)
def test_flag_out_of_range_is_an_argparse_error(script, flag, value, capsys):
    mod = __import__(script)
    with pytest.raises(SystemExit) as e:
        mod.get_args(['--data', 'x', flag, value] + ([] if script == 'probe' else ['--out', 'y']))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if 'error' in line]
    assert e.value.code == 2 and 'Traceback' not in err
    assert len(errors) == 1 and f'argument {flag}: {value}:' in errors[0], err


def test_batch_per_rank_is_checked_before_the_cache(tiny, tmp_path, monkeypatch):
    """--batch-size 2 over 2 ranks leaves 1 per rank: refused before any cache is built."""
    monkeypatch.setattr(C, 'dist_info', lambda: (0, 0, 2))
    monkeypatch.setattr(C.dist, 'init_process_group', lambda *a, **k: None)
    line = refused(run('pretrain_barlow', *data_args(tiny), '--projector', '16-16',
                       '--batch-size', '2', '--cache-dir', tmp_path / 'c', '--out',
                       tmp_path / 'o', cwd=tmp_path), '--batch-size 2', 'per rank')
    assert 'BatchNorm' in line and not (tmp_path / 'c').exists()


def test_a_finetuning_batch_that_does_not_divide_over_the_ranks(tiny, tmp_path, monkeypatch):
    """Before: --batch-size 64 on 3 ranks trained 21 a rank, 63 a step, its lr scaled for 64."""
    monkeypatch.setattr(C, 'dist_info', lambda: (0, 0, 3))
    monkeypatch.setattr(C.dist, 'init_process_group', lambda *a, **k: None)
    refused(run('finetune', *data_args(tiny), *FT, '--batch-size', '64', '--init', 'random',
                '--cache-dir', tmp_path / 'c', '--out', tmp_path / 'o', '--results',
                tmp_path / 'r.jsonl', cwd=tmp_path), '--batch-size 64 does not divide by 3')
    assert not (tmp_path / 'c').exists()


@pytest.mark.parametrize('flag', ['--monitor-data', '--monitor-split'])
def test_missing_monitor_input_is_refused_before_any_work(tiny, tmp_path, flag):
    given = {'--monitor-data': tiny / 'data', '--monitor-split': tiny / 'split.json',
             flag: tmp_path / 'nowhere'}
    refused(run('pretrain_barlow', *data_args(tiny, split=False), '--projector', '16-16',
                *[a for kv in given.items() for a in kv], '--cache-dir', tmp_path / 'c',
                '--out', tmp_path / 'o', cwd=tmp_path), flag, 'nowhere')
    assert not (tmp_path / 'c').exists() and not (tmp_path / 'o' / 'ckpt.pt').exists()


# --------------------------------------------------------------------------- output paths
def make_path(tmp_path, layout):
    """A path that cannot be used as an output: 'file' (a file stands there), 'under' (below
    a file), 'dir' (a folder where a file is expected), 'loop' (a symlink to itself)."""
    (tmp_path / 'afile').write_text('x')
    if layout == 'file':
        return tmp_path / 'afile'
    if layout == 'under':
        return tmp_path / 'afile' / 'sub'
    if layout == 'dir':
        (tmp_path / 'adir').mkdir()
        return tmp_path / 'adir'
    if layout == 'empty':  # --out '' wrote the run into the working folder
        return ''
    os.symlink(tmp_path / 'loop', tmp_path / 'loop')
    return tmp_path / 'loop'


OUTPUTS = [  # (script, flag, layout): before, a traceback at the first write, after training
    ('pretrain_barlow', '--out', 'file'), ('pretrain_barlow', '--out', 'under'),
    ('pretrain_barlow', '--out', 'loop'), ('pretrain_barlow', '--cache-dir', 'file'),
    ('pretrain_supervised', '--out', 'file'), ('pretrain_supervised', '--cache-dir', 'under'),
    ('finetune', '--out', 'file'), ('finetune', '--results', 'dir'),
    ('finetune', '--results', 'under'), ('finetune', '--results', 'loop'),
    ('finetune', '--cache-dir', 'file'), ('probe', '--results', 'dir'),
    ('probe', '--cache-dir', 'file'), ('common-cache', '--cache-dir', 'file'),
    ('common-split', '--out', 'dir'), ('pretrain_barlow', '--out', 'empty'),
    ('finetune', '--cache-dir', 'empty'), ('probe', '--results', 'empty'),
    ('finetune', '--save-model', 'file'),  # before: found in the way after training the seed
]


@pytest.mark.parametrize('script, flag, layout', OUTPUTS)
def test_unwritable_output_is_refused_at_start_up(tiny, tmp_path, script, flag, layout):
    bad = make_path(tmp_path, layout)
    paths = {'--out': tmp_path / 'run', '--cache-dir': tmp_path / 'cache',
             '--results': tmp_path / 'r.jsonl', flag: bad}
    before = sorted(os.listdir(tmp_path))
    if script.startswith('common'):
        cmd = script.split('-')[1]
        args = ['--data', tiny / 'data', flag, bad] + (['--cache-size', '16'] if cmd == 'cache'
                                                       else [])
        result = run('common', cmd, *args, cwd=tmp_path)
    else:
        args = [*data_args(tiny), '--init', 'random', '--cache-dir', paths['--cache-dir']]
        args += {'pretrain_barlow': [*PRE, '--out', paths['--out']],
                 'pretrain_supervised': ['--batch-size', '4', '--max-steps', '1', '--out',
                                         paths['--out']],
                 'finetune': [*FT, '--out', paths['--out'], '--results', paths['--results']],
                 'probe': [*PROBE, '--results', paths['--results']]}[script]
        if flag not in ('--out', '--cache-dir', '--results'):  # an optional output
            args += [flag, bad]
        result = run(script, *args, cwd=tmp_path)
    refused(result, flag, bad)
    assert sorted(os.listdir(tmp_path)) == before  # nothing trained, cached or written


@pytest.mark.parametrize('layout', ['file', 'under'])
def test_report_out_that_cannot_be_written(tmp_path, layout):
    bad = make_path(tmp_path, layout)
    row = dict(init='a', protocol='probe', seed=0, metrics={'accuracy': 0.5,
               'balanced_accuracy': 0.5, 'macro_f1': 0.5, 'auroc': 0.5})
    (tmp_path / 'r.jsonl').write_text(json.dumps(row) + '\n')
    r = run_report('--results', 'r.jsonl', '--out', bad, '--runs', tmp_path / 'none',
                   cwd=tmp_path)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(bad) in r.stderr, r.stderr


# --------------------------------------------------------------------------- one line, no traceback
@pytest.mark.parametrize('exc, words', [
    (PermissionError(errno.EACCES, 'Permission denied', '/data/x'), ['/data/x', 'permission']),
    (OSError(errno.EROFS, 'Read-only file system', '/mnt/ro/ckpt.pt'), ['/mnt/ro', 'read-only']),
    (OSError(errno.ENOSPC, 'No space left on device', '/runs/a'), ['/runs/a', 'disk is full']),
    (OSError(errno.ELOOP, 'Too many levels of symbolic links', '/l'), ['/l', 'symlink loop']),
    (NotADirectoryError(errno.ENOTDIR, 'Not a directory', '/f/x'), ['/f/x', 'a file stands']),
    (UnicodeDecodeError('utf-8', b'\xff', 0, 1, 'invalid start byte'), ['not UTF-8']),
])
def test_main_guard_turns_expected_faults_into_one_line(exc, words, capsys):
    def fail():
        raise exc
    with pytest.raises(SystemExit) as e:
        C.main_guard(fail)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith('error: ') and all(w in err for w in words), err


def test_a_batch_too_big_for_the_gpu_is_one_line(capsys):
    """torch's out-of-memory error (raised here as a GPU would: a RuntimeError subclass) keeps
    its sizes and says what to change."""
    def fail():
        raise torch.OutOfMemoryError(
            'CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of '
            '139.81 GiB of which 1.05 GiB is free. Including non-PyTorch memory, this process '
            'has 138.70 GiB memory in use.\nSee documentation for Memory Management')
    with pytest.raises(SystemExit) as e:
        C.main_guard(fail)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith('error: out of GPU memory (CUDA out of memory. Tried to allocate '
                          '2.00 GiB. GPU 0 has a total capacity of 139.81 GiB of which 1.05 '
                          'GiB is free); lower --batch-size'), err
    assert 'torchrun' in err and 'Including' not in err


def test_ctrl_c_outside_training_is_one_line(capsys):
    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        C.main_guard(interrupted)
    assert e.value.code == 130 and capsys.readouterr().err == 'interrupted\n'


def test_main_guard_keeps_the_traceback_of_a_bug():
    with pytest.raises(ZeroDivisionError):
        C.main_guard(lambda: 1 / 0)


def write_isic2019(root, csv_bytes):
    (root / 'ISIC_2019_Training_Input').mkdir(parents=True)
    (root / 'ISIC_2019_Training_GroundTruth.csv').write_bytes(csv_bytes)


@pytest.mark.parametrize('case', ['split-folder', 'split-binary', 'csv-binary', 'csv-latin1'])
def test_text_inputs_that_cannot_be_decoded(tiny, tmp_path, case):
    """Before: UnicodeDecodeError / IsADirectoryError tracebacks."""
    if case.startswith('split'):
        bad = tmp_path / 'split.json'
        bad.mkdir() if case == 'split-folder' else bad.write_bytes(b'\x89PNG\r\n\x1a\n\xff\xfe')
        result = run('probe', *data_args(tiny, split=False), '--split', bad, *PROBE,
                     '--cache-dir', tmp_path / 'c', '--results', tmp_path / 'r.jsonl',
                     cwd=tmp_path)
    else:
        head = 'image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\n'
        body = (b'\xff\xfe\x00\x01' * 8) if case == 'csv-binary' else \
            'ISIC_caf\xe9,1,0,0,0,0,0,0,0,0\n'.encode('latin-1')
        write_isic2019(tmp_path / 'isic', head.encode() + body)
        bad = tmp_path / 'isic' / 'ISIC_2019_Training_GroundTruth.csv'
        result = run('common', 'split', '--data', tmp_path / 'isic', '--out',
                     tmp_path / 's.json', cwd=tmp_path)
    refused(result, bad)


@pytest.mark.parametrize('content, words', [
    (b'\x00\x01\xff\xfe garbage\n', [':1:', 'not valid JSON']),   # before: a traceback
    (b'[1, 2, 3]\n', [':1:', 'expected a JSON object']),          # before: silently skipped
    (b'{"init": "x", "seed": 0}\n', [':1:', 'missing key(s) protocol, metrics']),
])
def test_results_lines_that_are_not_rows(tiny, tmp_path, content, words):
    (tmp_path / 'r.jsonl').write_bytes(content)
    refused(run('probe', *data_args(tiny), *PROBE, '--init', 'random', '--cache-dir',
                tmp_path / 'c', '--results', tmp_path / 'r.jsonl', cwd=tmp_path),
            tmp_path / 'r.jsonl', *words)
    assert not (tmp_path / 'c').exists()  # refused before any feature was extracted


def test_report_results_is_a_folder(tmp_path):
    (tmp_path / 'r.jsonl').mkdir()
    r = run_report('--results', 'r.jsonl', '--out', 'out', cwd=tmp_path)
    assert r.returncode == 2 and 'is a folder' in r.stderr and 'Traceback' not in r.stderr


# --------------------------------------------------------------------------- dataset layouts
def test_imagefolder_with_an_empty_class_is_not_read_as_unlabelled(tiny, tmp_path):
    """Before: `common.py split` said 'train: unlabelled 16' and exited 0."""
    shutil.copytree(tiny / 'data', tmp_path / 'd')
    (tmp_path / 'd' / 'c2').mkdir()
    line = refused(run('common', 'split', '--data', tmp_path / 'd', '--out', tmp_path / 's.json',
                       cwd=tmp_path), 'c2', 'hold no images', '--format folder')
    assert not (tmp_path / 's.json').exists(), line
    ds = C.read_dataset(str(tmp_path / 'd'), 'folder')  # the way to read it unlabelled
    assert set(ds['labels']) == {-1} and len(ds['ids']) == 20


def test_imagefolder_with_images_only_in_subfolders_of_its_classes(tmp_path):
    """Before: class/<sub>/*.png (no image directly in a class folder) read as unlabelled."""
    for c in ('a', 'b'):
        (tmp_path / 'd' / c / 'batch1').mkdir(parents=True)
        for i in range(2):
            Image.new('RGB', (8, 8), (i * 9, 0, 0)).save(tmp_path / 'd' / c / 'batch1' / f'{i}.png')
    ds = C.read_dataset(str(tmp_path / 'd'))
    assert ds['format'] == 'imagefolder' and ds['classes'] == ['a', 'b']
    assert ds['labels'] == [0, 0, 1, 1]


def test_split_that_leaves_train_empty(tiny, tmp_path):
    """Before: `common.py split --test-fraction 0.99 --val-fraction 0.99` wrote a split with
    every image in test and exited 0; each later script failed in its own words."""
    refused(run('common', 'split', '--data', tiny / 'data', '--test-fraction', '0.99',
                '--val-fraction', '0.99', '--out', tmp_path / 's.json', cwd=tmp_path),
            'no image in train')
    assert not (tmp_path / 's.json').exists()


def test_paper_split_that_leaves_a_class_untested(tiny, tmp_path):
    """Before: at --per-class 500, ISIC 2019's DF and VASC went wholly to train and the test
    metrics quietly left them out."""
    split = lambda *a: run('common', 'split', '--data', tiny / 'data', '--protocol', 'paper',
                           *a, '--out', tmp_path / 's.json', cwd=tmp_path)
    refused(split('--per-class', '10'), 'leaves no test image of c0 (10 images), c1 (10 images)',
            '--per-class paper')
    refused(split('--per-class', 'paper'), 'MEL', 'not among the classes', 'c0 c1')
    assert not (tmp_path / 's.json').exists()
    out, _ = ok(split('--per-class', 'c0=6,c1=3'))
    assert 'train: c0 6 c1 3' in out
    assert json.loads((tmp_path / 's.json').read_text())['how']['per_class'] == {'c0': 6, 'c1': 3}


@pytest.mark.parametrize('script', ['finetune', 'probe'])
def test_evaluation_on_a_split_without_test_images(tiny, tmp_path, script):
    """Before: finetune.py trained the seed, then torch.cat([]) raised a ValueError."""
    ok(run('common', 'split', '--data', tiny / 'data', '--test-fraction', '0', '--out',
           tmp_path / 's.json', cwd=tmp_path))
    args = (FT + ['--out', tmp_path / 'ft']) if script == 'finetune' else PROBE
    refused(run(script, '--data', tiny / 'data', '--split', tmp_path / 's.json', *T16, *args,
                '--init', 'random', '--cache-dir', tmp_path / 'c', '--results',
                tmp_path / 'r.jsonl', cwd=tmp_path), 'no test images')
    assert not (tmp_path / 'c').exists() and not (tmp_path / 'ft').exists()


def test_pool_of_unreadable_images_only(tmp_path):
    """--skip-bad on a folder whose images are all unreadable: before, 'lower --batch-size'."""
    (tmp_path / 'bad').mkdir()
    for i in range(3):
        (tmp_path / 'bad' / f'x{i}.png').write_bytes(b'not a png')
    refused(run('pretrain_barlow', '--data', tmp_path / 'bad', *T16, *PRE, '--skip-bad',
                '--cache-dir', tmp_path / 'c', '--out', tmp_path / 'bt', cwd=tmp_path),
            'no images to load', '--skip-bad')


def test_supervised_pretraining_refuses_one_class(tiny, tmp_path):
    """Before: trained to loss 0 and said done."""
    (tmp_path / 'one').mkdir()
    shutil.copytree(tiny / 'data' / 'c0', tmp_path / 'one' / 'c0')
    refused(run('pretrain_supervised', '--data', tmp_path / 'one', *T16, '--batch-size', '4',
                '--max-steps', '1', '--cache-dir', tmp_path / 'c', '--out', tmp_path / 'o',
                cwd=tmp_path), 'at least 2', '1 class(es) (c0)')
    assert not (tmp_path / 'o').exists() and not (tmp_path / 'c').exists()


def test_labels_per_class_above_what_a_class_has(tiny, tmp_path):
    """The train part holds 7 images per class; asking 9 used to give 7 without a word."""
    args = [*data_args(tiny), '--labels-per-class', '9', '--seeds', '0', '--init', 'random',
            '--cache-dir', tiny / 'cache', '--results', tmp_path / 'r.jsonl']
    out, _ = ok(run('probe', *args, '--aug-views', '1', '--max-iter', '5', cwd=tmp_path))
    assert 'note: --labels-per-class 9: the train part holds fewer for c0 (7), c1 (7)' in out
    (row,) = rows(tmp_path / 'r.jsonl')
    assert row['labels_short'] == {'c0': 7, 'c1': 7}
    assert row['labels_by_class'] == {'c0': 7, 'c1': 7}


# --------------------------------------------------------------------------- derived files
def built_cache(tiny, tmp_path):
    ds = C.read_dataset(str(tiny / 'data'))
    cache = C.build_cache(ds, 16, str(tmp_path / 'c'), workers=0, verbose=False)
    return ds, cache, cache['file'][:-4]


@pytest.mark.parametrize('damage', ['json-truncated', 'json-list', 'npy-truncated',
                                    'npy-other-shape'])
def test_damaged_cache_is_rebuilt_with_a_note(tiny, tmp_path, damage, capsys):
    """Before: 'not valid JSON; delete it' on every run, or a traceback from the memmap."""
    ds, cache, stem = built_cache(tiny, tmp_path)
    good = np.load(cache['file']).copy()
    if damage == 'json-truncated':
        text = open(stem + '.json').read()
        open(stem + '.json', 'w').write(text[:len(text) // 2])
    elif damage == 'json-list':
        open(stem + '.json', 'w').write('[]')
    elif damage == 'npy-truncated':
        os.truncate(cache['file'], os.path.getsize(cache['file']) - 100)
    else:
        np.save(cache['file'], good[:5])
    capsys.readouterr()
    again = C.build_cache(ds, 16, str(tmp_path / 'c'), workers=0, verbose=False)
    assert 'rebuilding the cache' in capsys.readouterr().out
    assert np.array_equal(np.load(again['file']), good) and again['ids'] == cache['ids']


def dead_pid():
    p = subprocess.Popen([sys.executable, '-c', 'pass'])
    p.wait()
    return p.pid


def test_temporary_files_of_a_killed_write_are_removed(tiny, tmp_path):
    """A SIGKILL during the cache build or a checkpoint save leaves its temporary file: the
    next write of that file removes it; a live process's temporary file is left alone."""
    ds = C.read_dataset(str(tiny / 'data'))
    stem = C._cache_stem(ds, 16, str(tmp_path / 'c'))
    os.makedirs(tmp_path / 'c')
    dead, live = dead_pid(), os.getppid()
    stale = [f'{stem}.{C._HOST}-{dead}.tmp.npy', f'{stem}.{C._HOST}-{dead}.tmp2.npy']
    kept = [f'{stem}.{C._HOST}-{live}.tmp.npy', f'{stem}.otherhost-{dead}.tmp.npy']
    for f in stale + kept:
        open(f, 'wb').write(b'\0' * 1000)
    C.build_cache(ds, 16, str(tmp_path / 'c'), workers=0, verbose=False)
    assert not any(os.path.exists(f) for f in stale) and all(os.path.exists(f) for f in kept)
    ckpt = tmp_path / 'run' / 'ckpt.pt'
    os.makedirs(ckpt.parent)
    stale = f'{ckpt}.{C._HOST}-{dead}.tmp'
    open(stale, 'wb').write(b'half a checkpoint')
    C.torch_save({'step': 1}, ckpt)
    assert sorted(os.listdir(ckpt.parent)) == ['ckpt.pt']


def test_a_checkpoint_is_on_disk_before_it_replaces_the_last_one(tmp_path, monkeypatch):
    """atomic_write syncs the new file's bytes before the rename (a machine that crashes
    right after it must not find an empty ckpt.pt where the last good one was), then the
    folder; a folder that cannot be synced is not an error."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(('fsync', os.path.isdir(f'/proc/self/fd/{fd}'),
                       os.path.getsize(f'/proc/self/fd/{fd}')))
        if events[-1][1]:
            raise OSError(22, 'Invalid argument')  # as some network filesystems answer
        real_fsync(fd)
    monkeypatch.setattr(os, 'fsync', fsync)
    monkeypatch.setattr(os, 'replace', lambda a, b: (events.append(('replace',)),
                                                     real_replace(a, b)))
    C.torch_save({'w': torch.ones(100)}, tmp_path / 'ckpt.pt')
    assert [e[:2] for e in events] == [('fsync', False), ('replace',), ('fsync', True)]
    assert events[0][2] == os.path.getsize(tmp_path / 'ckpt.pt') > 400  # all of it, synced
    assert torch.equal(torch.load(tmp_path / 'ckpt.pt', weights_only=True)['w'], torch.ones(100))


def test_writes_never_follow_a_link_planted_at_their_names(tmp_path):
    """The temporary name of a write is predictable (path.HOST-PID.tmp) and a run folder's
    .lock is truncated and rewritten: a symbolic link planted at either must not send those
    bytes to its target. The write goes to a new file; the lock is refused in one line."""
    victim = tmp_path / 'victim'
    victim.write_text('precious\n')
    path = tmp_path / 'meta.json'
    os.symlink(victim, C.tmp_name(str(path)))
    C.write_json(path, {'a': 1})
    assert victim.read_text() == 'precious\n'
    assert not path.is_symlink() and json.loads(path.read_text()) == {'a': 1}
    assert sorted(os.listdir(tmp_path)) == ['meta.json', 'victim']
    run = tmp_path / 'run'
    run.mkdir()
    os.symlink(victim, run / '.lock')
    with pytest.raises(C.UserError, match=f'--out {run}: its .lock is a symbolic link; remove '
                                          f'it'):
        C.claim(str(run))
    assert victim.read_text() == 'precious\n'


def test_unreadable_probe_features_are_extracted_again(tiny, tmp_path):
    """Before: 'not a readable PyTorch checkpoint' on every later run of that backbone."""
    args = [*data_args(tiny), *PROBE, '--init', 'random', '--cache-dir', tmp_path / 'c']
    ok(run('probe', *args, '--results', tmp_path / 'a.jsonl', cwd=tmp_path))
    (feat,) = (tmp_path / 'c').glob('features-*.pt')
    feat.write_bytes(b'PK\x03\x04 a torn zip')
    out, _ = ok(run('probe', *args, '--results', tmp_path / 'b.jsonl', cwd=tmp_path))
    assert 'extracting the features again' in out
    assert rows(tmp_path / 'a.jsonl')[0]['metrics'] == rows(tmp_path / 'b.jsonl')[0]['metrics']


# --------------------------------------------------------------------------- result rows
def _hold(folder, ready):
    C.claim(folder)
    ready.send(os.getpid())
    signal.pause()


def test_a_run_folder_is_used_by_one_process_at_a_time(tmp_path):
    """Two copies of one command used to train into one --out together, mixing their
    checkpoints; the lock of a killed holder goes with it."""
    parent, child = multiprocessing.Pipe()
    holder = multiprocessing.get_context('fork').Process(target=_hold, args=(str(tmp_path),
                                                                                child))
    holder.start()
    pid = parent.recv()
    with pytest.raises(C.UserError, match=f'--out {tmp_path} is in use by process {pid} '):
        C.claim(str(tmp_path))
    os.kill(pid, signal.SIGKILL)
    holder.join()
    C.claim(str(tmp_path))
    C.claim(str(tmp_path))  # again in the same process: still ours


def test_append_after_a_torn_line_starts_a_new_line(tmp_path):
    path = tmp_path / 'r.jsonl'
    path.write_text('{"init": "a", "seed": 0}\n{"init": "b", "se')  # a killed writer
    C.append_jsonl(str(path), {'init': 'c'})
    lines = path.read_text().splitlines()
    assert lines[1] == '{"init": "b", "se' and json.loads(lines[2]) == {'init': 'c'}


def test_append_that_the_disk_cuts_short_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(C.os, 'write', lambda fd, data: len(data) // 2)
    with pytest.raises(OSError) as e:
        C.append_jsonl(str(tmp_path / 'r.jsonl'), {'init': 'c'})
    assert e.value.errno == errno.ENOSPC


def test_a_synced_append_is_on_disk_when_it_returns(tmp_path, monkeypatch):
    path, synced = tmp_path / 'r.jsonl', []
    monkeypatch.setattr(C.os, 'fsync', lambda fd: synced.append(os.fstat(fd).st_size))
    C.append_jsonl(str(path), {'init': 'a'})  # a log line: not synced
    assert synced == []
    C.append_jsonl(str(path), {'init': 'b'}, sync=True)  # a result row: after its write
    assert synced == [path.stat().st_size] and len(rows(path)) == 2


def _append_rows(args):
    path, writer = args
    for i in range(100):
        C.append_jsonl(path, {'writer': writer, 'i': i, 'pad': 'x' * 300})


def test_concurrent_writers_keep_every_line_whole(tmp_path):
    path = str(tmp_path / 'r.jsonl')
    with multiprocessing.get_context('fork').Pool(4) as pool:
        pool.map(_append_rows, [(path, w) for w in range(4)])
    got = rows(path)
    assert len(got) == 400 and {(r['writer'], r['i']) for r in got} == \
        {(w, i) for w in range(4) for i in range(100)}


def test_torn_last_line_is_named_and_the_seed_row_gets_its_own_line(tiny, tmp_path):
    """Before: the row was glued onto the torn line, unreadable, and the seed ran again."""
    res = tmp_path / 'r.jsonl'
    res.write_text('{"init": "random", "protocol": "probe", "seed": 0, "metr')
    args = [*data_args(tiny), *PROBE, '--init', 'random', '--cache-dir', tiny / 'cache',
            '--results', res]
    _, err = ok(run('probe', *args, cwd=tmp_path))
    assert f'warning: {res}:1: an incomplete line' in err
    torn, *after = res.read_text().splitlines()
    assert torn.endswith('"metr') and [json.loads(x)['seed'] for x in after] == [0]
    out, err = ok(run('probe', *args, cwd=tmp_path))  # now done: skipped, the tear named again
    assert 'seed 0: already in' in out and f'{res}:1:' in err
    r = run_report('--results', res, '--out', tmp_path / 'rep', '--runs', tmp_path / 'x',
                   cwd=tmp_path)
    assert r.returncode == 0 and f'warning: {res}:1: an incomplete line' in r.stderr, r.stderr


@pytest.mark.parametrize('where', ['last', 'middle'])
def test_report_names_a_torn_line_and_refuses_garbage(tmp_path, where):
    row = json.dumps(dict(init='a', protocol='probe', seed=0, metrics={
        'accuracy': .5, 'balanced_accuracy': .5, 'macro_f1': .5, 'auroc': .5}))
    torn = row[:25]
    text = row + '\n' + (torn if where == 'last' else torn + '\n' + row.replace('"seed": 0',
                                                                              '"seed": 1'))
    (tmp_path / 'r.jsonl').write_text(text)
    r = run_report('--results', 'r.jsonl', '--out', 'out', '--runs', 'x', cwd=tmp_path)
    assert r.returncode == 0 and 'warning: r.jsonl:2: an incomplete line' in r.stderr, r.stderr
    runs = 1 if where == 'last' else 2  # the torn line is no run a rerun replaced
    assert f'{runs} lines, {runs} runs' in (tmp_path / 'out' / 'summary.md').read_text()
    (tmp_path / 'g.jsonl').write_text(row + '\nnot json at all\n' + row + '\n')
    r = run_report('--results', 'g.jsonl', '--out', 'out2', '--runs', 'x', cwd=tmp_path)
    assert r.returncode == 2 and 'g.jsonl:2: not valid JSON' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / 'out2').exists()


def test_a_row_from_an_older_version_is_named(tmp_path, capsys):
    (tmp_path / 'r.jsonl').write_text(json.dumps(dict(init='a', protocol='probe', seed=0,
                                                      metrics={})) + '\n')
    assert C.done_keys(str(tmp_path / 'r.jsonl')) == set()
    assert f'{tmp_path / "r.jsonl"}:1: a row without' in capsys.readouterr().err


def test_failed_append_keeps_the_trained_seed(tiny, tmp_path, monkeypatch):
    """Before: the seed's run folder was deleted first, so a failing append (a full disk, a
    results path gone bad mid-run) lost the compute, the checkpoint and the row."""
    res = tmp_path / 'r.jsonl'

    def full_disk(path, row):
        raise OSError(errno.ENOSPC, 'No space left on device', path)
    real = C.append_jsonl
    with monkeypatch.context() as m:  # the results file only: log.jsonl still gets its lines
        m.setattr(C, 'append_jsonl', lambda path, row, **kw: full_disk(path, row)
                  if str(path) == str(res) else real(path, row, **kw))
        refused(finetune(tiny, 'random', res, tmp_path / 'ft'), res, 'disk is full')
    (seed_dir,) = (tmp_path / 'ft').iterdir()
    assert (seed_dir / 'ckpt.pt').exists()
    out, _ = ok(finetune(tiny, 'random', res, tmp_path / 'ft'))
    assert 'resumed' in out and 'at step 1' in out  # evaluated again, not trained again
    assert not (tmp_path / 'ft' / seed_dir.name).exists()
    ok(finetune(tiny, 'random', tmp_path / 'clean.jsonl', tmp_path / 'ft2'))
    (a,), (b,) = rows(res), rows(tmp_path / 'clean.jsonl')
    assert a['metrics'] == b['metrics'] and a['steps'] == b['steps'] == 1
    assert a['labels_by_class'] == {'c0': 3, 'c1': 3} and a['labels_short'] == {}


def test_no_row_for_a_run_without_optimisation_steps(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(C, 'fit', lambda *a, **k: 0)
    refused(finetune(tiny, 'random', tmp_path / 'r.jsonl', tmp_path / 'ft'), '0 optimisation')
    assert not (tmp_path / 'r.jsonl').exists()


# --------------------------------------------------------------------------- test images
def test_resume_with_the_split_after_a_start_without_is_refused(tiny, tmp_path):
    """Pretrain without --split, stop before the hand-off, rerun the same --out with --split:
    before the pool was recorded, it resumed and meta.json called the result held out."""
    ok(pretrain(tiny, tmp_path / 'bt', split=False))
    for f in ('backbone.pt', 'meta.json'):  # as if stopped before the hand-off
        os.remove(tmp_path / 'bt' / f)
    line = refused(pretrain(tiny, tmp_path / 'bt', '--max-steps', '2'), 'held_out None',
                   'use another --out')
    assert 'split_file_sha1 None' in line and 'pool_images 20' in line
    assert torch.load(tmp_path / 'bt' / 'ckpt.pt', weights_only=True)['step'] == 1
    assert not (tmp_path / 'bt' / 'backbone.pt').exists()




@pytest.fixture(scope='module')
def leaky(tiny):
    """A run pretrained on the whole dataset (no --split), and a held-out run on the
    split's pool continued from it: the second's own segment held the test images out."""
    ok(pretrain(tiny, tiny / 'bt-all', split=False))
    ok(pretrain(tiny, tiny / 'bt-held'))
    ok(pretrain(tiny, tiny / 'bt-chain', '--init', tiny / 'bt-all' / 'backbone.pt'))
    return tiny


def test_resume_with_another_init_is_refused(leaky, tmp_path):
    ok(pretrain(leaky, tmp_path / 'a'))
    os.remove(tmp_path / 'a' / 'backbone.pt')
    refused(pretrain(leaky, tmp_path / 'a', '--init', leaky / 'bt-held' / 'backbone.pt',
                     '--max-steps', '2'), 'init_sha', 'use another --out')


def test_held_out_run_is_accepted(leaky, tmp_path):
    ok(finetune(leaky, leaky / 'bt-held', tmp_path / 'r.jsonl', tmp_path / 'ft'))
    assert len(rows(tmp_path / 'r.jsonl')) == 1


def test_continued_from_a_leaky_init_is_refused(leaky, tmp_path):
    """Before: check_held_out read only the last run's meta.json, which said held out."""
    meta = json.loads((leaky / 'bt-chain' / 'meta.json').read_text())
    assert [r['held_out'] for r in meta['lineage']] == [None, C.split_sha(split_of(leaky))]
    for script in ('finetune', 'probe'):
        args = (FT + ['--out', tmp_path / 'ft']) if script == 'finetune' else PROBE
        refused(run(script, *data_args(leaky), *args, '--init', leaky / 'bt-chain',
                    '--cache-dir', leaky / 'cache', '--results', tmp_path / 'r.jsonl',
                    cwd=tmp_path), leaky / 'bt-all', 'same --split')
    assert not (tmp_path / 'r.jsonl').exists()


def test_dataset_reached_through_a_symlink_is_the_same_dataset(leaky, tmp_path):
    """Before: the roots were compared as spelt, so a symlinked path passed."""
    os.symlink(leaky / 'data', tmp_path / 'link')
    refused(finetune(leaky, leaky / 'bt-all', tmp_path / 'r.jsonl', tmp_path / 'ft',
                     data=tmp_path / 'link'), 'same --split')


def test_extra_folder_inside_the_dataset_counts_as_the_dataset(leaky, tmp_path):
    """Pretraining on other data with a class folder of this dataset as --extra-data (no
    split): before, data_root differed and the backbone was accepted."""
    write_imagefolder(tmp_path / 'other', classes=1, per_class=8, side=16, seed=5)
    ok(run('pretrain_barlow', '--data', tmp_path / 'other', *T16, *PRE, '--extra-data',
           leaky / 'data' / 'c0', '--cache-dir', tmp_path / 'c', '--out', tmp_path / 'bt',
           cwd=tmp_path))
    refused(finetune(leaky, tmp_path / 'bt', tmp_path / 'r.jsonl', tmp_path / 'ft'),
            'same --split')


def test_extra_folder_already_in_the_pool_is_refused(tiny, tmp_path):
    """Before: --extra-data DATA beside --data DATA (no split) put every image in twice."""
    refused(pretrain(tiny, tmp_path / 'bt', '--extra-data', tiny / 'data' / 'c1', '--cache-dir',
                     tmp_path / 'c', split=False), '10 image(s) are already in')
    assert not (tmp_path / 'c').exists()


def test_checkpoint_of_an_unfinished_run_as_init(leaky, tmp_path):
    """ckpt.pt of a run that never handed off has no meta.json: before, it passed as a
    foreign checkpoint, whatever it had been trained on."""
    ok(pretrain(leaky, tmp_path / 'bt', split=False))
    os.remove(tmp_path / 'bt' / 'meta.json')
    refused(finetune(leaky, tmp_path / 'bt' / 'ckpt.pt', tmp_path / 'r.jsonl', tmp_path / 'ft'),
            'unfinished run')


def test_meta_json_of_other_weights_is_not_trusted(leaky, tmp_path):
    """backbone.pt replaced by other weights beside the old meta.json (held out): before,
    the meta.json was believed."""
    shutil.copytree(leaky / 'bt-held', tmp_path / 'run')
    shutil.copy(leaky / 'bt-all' / 'backbone.pt', tmp_path / 'run' / 'backbone.pt')
    refused(finetune(leaky, tmp_path / 'run', tmp_path / 'r.jsonl', tmp_path / 'ft'),
            'describes other weights')


def test_meta_json_without_a_lineage_proves_nothing(leaky, tmp_path):
    """A meta.json of the older kind (held_out of the last segment only) on this dataset."""
    shutil.copytree(leaky / 'bt-held', tmp_path / 'run')
    meta = json.loads((tmp_path / 'run' / 'meta.json').read_text())
    del meta['lineage']
    (tmp_path / 'run' / 'meta.json').write_text(json.dumps(meta))
    ds = C.read_dataset(str(leaky / 'data'))
    with pytest.raises(C.UserError, match='did not record'):
        C.check_held_out(str(tmp_path / 'run'), ds, split_of(leaky))


def copy_pixels(src, dst, fmt):
    with Image.open(src) as im:
        im.convert('RGB').save(dst, fmt)


@pytest.mark.parametrize('copy', ['renamed', 'bmp'])
def test_extra_data_with_a_copy_of_a_test_image(leaky, tmp_path, copy):
    """Before: only names were compared, so a renamed or re-encoded copy entered the pool.
    A renamed copy is caught by its bytes before the cache is built, a losslessly
    re-encoded one by its pixels once cached."""
    test_id = split_of(leaky)['test'][0]
    extra = tmp_path / 'extra'
    extra.mkdir()
    rng = np.random.default_rng(9)
    for i in range(3):  # names unlike any test image's
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(extra / f'x{i}.png')
    if copy == 'renamed':
        shutil.copy(leaky / 'data' / test_id, extra / 'holiday.png')
    else:
        copy_pixels(leaky / 'data' / test_id, extra / 'holiday.bmp', 'BMP')
    line = refused(pretrain(leaky, tmp_path / 'bt', '--extra-data', extra, '--cache-dir',
                            tmp_path / 'c'), 'holiday', 'test images')
    assert ('file bytes' in line) == (copy == 'renamed')
    assert (tmp_path / 'c').exists() == (copy == 'bmp') and not (tmp_path / 'bt').exists()


def test_pool_image_with_the_pixels_of_a_test_image(leaky, tmp_path):
    """A dataset holding one image twice, once on each side of the split."""
    shutil.copytree(leaky / 'data', tmp_path / 'data')
    split = split_of(leaky)
    test_id, pool_id = split['test'][0], split['pretrain'][0]
    copy_pixels(tmp_path / 'data' / test_id, tmp_path / 'data' / pool_id, 'PNG')
    refused(run('pretrain_barlow', '--data', tmp_path / 'data', '--split', leaky / 'split.json',
                *T16, *PRE, '--cache-dir', tmp_path / 'c', '--out', tmp_path / 'bt',
                cwd=tmp_path), pool_id, 'pixels of test images')
