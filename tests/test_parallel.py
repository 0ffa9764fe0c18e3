"""--parallel seeds under torchrun: each rank runs its own seeds on its own device, without
DDP; the rows equal those of one process running the seeds in turn, and an interrupted
parallel run completes on rerun."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import forkrun
from conftest import ROOT, TINY, script_env

SEEDS = '0-3'


def rows_of(path):
    with open(path) as f:
        return {(r['protocol'], r['seed']): r for r in map(json.loads, f)}


def evaluate(script, data, split, cache, results, nproc, torch_home, extra=(), wait=True,
             fastpy=None, timeout=600):
    """The script over SEEDS in one process (forked, as run_script's runs) or under torchrun
    with nproc ranks: real processes, or with fastpy = (client, env) the launcher and its
    ranks forked from the test's server (conftest.fastpy, tests/torchrun: no import of torch
    per process; a rank killed with its launcher must be a real process, so the interrupted
    run keeps real ones)."""
    torchrun = [fastpy[0], os.path.join(ROOT, 'tests', 'torchrun')] if fastpy else \
        [sys.executable, '-m', 'torch.distributed.run']
    launch = [sys.executable] if nproc == 1 else [
        *torchrun, '--standalone', f'--nproc_per_node={nproc}',
        *(['--no-python', fastpy[0]] if fastpy else [])]
    args = ['--data', data, '--split', split, *TINY, '--cache-dir', cache, '--seeds', SEEDS,
            '--labels-per-class', '3', '--results', results, '--init-name', 'random',
            *(['--parallel', 'seeds'] if nproc > 1 else []), *extra]
    if script == 'finetune.py':
        args += ['--epochs', '1', '--batch-size', '8', '--out', os.path.dirname(results) + '/ft']
    else:
        args += ['--aug-views', '2']
    cmd = launch + [os.path.join(ROOT, script)] + [str(a) for a in args]
    env = script_env(torch_home, **(fastpy[1] if fastpy else {}))
    if not wait:
        return subprocess.Popen(cmd, cwd=os.path.dirname(results), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    if nproc == 1:  # forked as run_script's runs are (torchrun starts its ranks itself)
        return forkrun.Run(cmd[1], cmd[2:], os.path.dirname(results), env).wait(timeout)
    return subprocess.run(cmd, cwd=os.path.dirname(results), env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope='module')
def lesions(tmp_path_factory, imagefolder):
    import common as C
    d = tmp_path_factory.mktemp('par')
    ds = C.read_dataset(imagefolder)
    C.save_split(str(d / 'split.json'), C.make_split(ds, 'random', seed=0))
    return d, imagefolder, str(d / 'split.json')


@pytest.mark.slow
@pytest.mark.parametrize('script', ['finetune.py', 'probe.py'])
def test_parallel_seeds_give_the_rows_of_one_process(lesions, script, torch_home, fastpy):
    d, data, split = lesions
    out = {}
    for nproc in (1, 2):
        os.makedirs(d / f'{script}-{nproc}', exist_ok=True)
        results = str(d / f'{script}-{nproc}' / 'results.jsonl')
        r = evaluate(script, data, split, d / 'cache', results, nproc, torch_home,
                     fastpy=fastpy)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        out[nproc] = rows_of(results)
    assert sorted(out[1]) == sorted(out[2]) and len(out[1]) == 4  # every seed, once
    for key, row in out[1].items():  # bitwise: same metrics, same labels, same steps
        other = out[2][key]
        assert row['metrics'] == other['metrics'] and row['labels'] == other['labels'], key
    text = r.stdout
    assert '[rank 0]' in text and '[rank 1]' in text  # each rank reports its own seeds


def kill_ranks(marker):
    """SIGKILL every process whose command line holds `marker` (torchrun starts its ranks in
    sessions of their own: killing the launcher's group leaves them running)."""
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                if marker.encode() in f.read() and int(pid) != os.getpid():
                    os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass  # gone meanwhile, or not ours to read


@pytest.mark.slow
def test_interrupted_parallel_run_completes_on_rerun(lesions, torch_home, fastpy):
    d, data, split = lesions
    os.makedirs(d / 'interrupted', exist_ok=True)
    results = str(d / 'interrupted' / 'results.jsonl')
    p = evaluate('finetune.py', data, split, d / 'cache', results, 2, torch_home, wait=False)
    t0 = time.time()
    while not (os.path.exists(results) and os.path.getsize(results)):  # a first row landed
        assert p.poll() is None, p.stdout.read()[-2000:]
        assert time.time() - t0 < 300, 'no row after 300 s'
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)  # torchrun, mid-run
    p.wait(timeout=60)
    kill_ranks(results)  # in sessions of their own, they outlive the launcher
    first = rows_of(results)
    assert 1 <= len(first) < 4, 'killed after the end: nothing was tested'
    # the rerun's ranks need not be real processes
    r = evaluate('finetune.py', data, split, d / 'cache', results, 2, torch_home, fastpy=fastpy)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    with open(results) as f:
        lines = [json.loads(line) for line in f]
    assert sorted(row['seed'] for row in lines) == [0, 1, 2, 3]  # each seed exactly once
    # rank 0 says which seeds are skipped (it reads the whole list: print0 prints its lines)
    assert all(f'seed {seed}: already in' in r.stdout for _, seed in first)


@pytest.mark.slow
def test_a_rank_whose_seeds_are_done_still_builds_the_cache(lesions, torch_home, fastpy):
    """Before: rank 0, its seed in the results already, returned before building the cache
    (another --cache-dir here; a deleted or stale cache alike), and rank 1 waited for it
    forever."""
    d, data, split = lesions
    os.makedirs(d / 'done0', exist_ok=True)
    results = str(d / 'done0' / 'results.jsonl')
    seeds = lambda s: ['--seeds', s]
    r = evaluate('probe.py', data, split, d / 'done0' / 'c1', results, 1, torch_home,
                 extra=seeds('0'), fastpy=fastpy)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = evaluate('probe.py', data, split, d / 'done0' / 'c2', results, 2, torch_home,
                 extra=seeds('0-1'), fastpy=fastpy, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert sorted(seed for _, seed in rows_of(results)) == [0, 1]


RANKS = '''import sys, time
sys.path.insert(0, sys.argv[2])
import common as C


def run(row):
    if row['seed'] == 1:
        raise RuntimeError('seed 1 fails')
    if row['seed'] == 2:  # rank 0's second seed runs on after rank 1 is done
        time.sleep(4)
    return dict(row, metrics={})


def main():
    rt = C.setup_runtime('cpu', 'fp32', parallel_seeds=True)
    rows = [dict(seed=s) for s in C.seeds_of(rt, range(4))]
    C.run_seeds(rt, rows, run, sys.argv[1], lambda row: f'seed {row["seed"]} done')
    C.teardown(rt)


C.main_guard(main)
'''


@pytest.mark.slow
def test_a_failed_seed_leaves_the_other_ranks_their_seeds(tmp_path, torch_home, fastpy):
    """Before: rank 1 exited with status 2 once its seeds were run, and torchrun stopped
    rank 0 in the middle of seed 2."""
    (tmp_path / 'ranks.py').write_text(RANKS)
    results = tmp_path / 'r.jsonl'
    r = subprocess.run([fastpy[0], os.path.join(ROOT, 'tests', 'torchrun'), '--standalone',
                        '--nproc_per_node=2', '--no-python', fastpy[0], str(tmp_path / 'ranks.py'),
                        str(results), ROOT], cwd=tmp_path, capture_output=True, text=True,
                       env=script_env(torch_home, **fastpy[1]), timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and 'error: rank 1, seed 1: RuntimeError: seed 1 fails' in out, out
    assert 'rank 1: seed(s) 1 failed (reasons above)' in out
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(row['seed'] for row in rows) == [0, 2, 3]


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """torch.cuda says two GPUs are there (no GPU here); set_device calls are recorded, and
    the backend flags setup_runtime sets for CUDA are put back afterwards."""
    import torch
    used = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'set_device', used.append)
    flags = [(torch.backends.cuda.matmul, 'allow_tf32'), (torch.backends.cudnn, 'allow_tf32'),
             (torch.backends.cudnn, 'benchmark')]
    saved = [getattr(o, name) for o, name in flags]
    yield used
    for (o, name), value in zip(flags, saved):
        setattr(o, name, value)


def test_more_seed_processes_than_gpus_share_them_and_ddp_refuses(monkeypatch, two_fake_gpus):
    """--parallel seeds with more processes than GPUs: local rank r runs on GPU r mod the
    count. Under DDP a rank without a GPU of its own is one clear error, before any process
    group."""
    import torch

    import common as C
    monkeypatch.setenv('WORLD_SIZE', '5')
    for local in range(5):
        monkeypatch.setenv('RANK', str(local))
        monkeypatch.setenv('LOCAL_RANK', str(local))
        rt = C.setup_runtime('cuda', 'bf16', parallel_seeds=True)
        assert rt.device == torch.device(f'cuda:{local % 2}') and rt.world == 1
        assert (rt.seed_rank, rt.seed_ranks) == (local, 5)
    assert two_fake_gpus == [torch.device(f'cuda:{k % 2}') for k in range(5)]
    # TF32 for convolutions only: the matrix products meant to be fp32 (the Barlow Twins
    # cross-correlation and loss, the probe's fits) stay full fp32
    assert torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setenv('LOCAL_RANK', '2')
    with pytest.raises(C.UserError, match=r'local rank 2, but 2 GPU\(s\) are visible: start at '
                                          r'most that many processes a node'):
        C.setup_runtime('cuda', 'bf16')
    assert not torch.distributed.is_initialized()
