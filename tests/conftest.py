"""Shared fixtures: a tiny labelled ImageFolder written with PIL, an offline $TORCH_HOME, and
helpers that run the real scripts as processes of their own (one thread, no network, tmp cwd;
forked from a server that has imported torch, forkrun.py)."""
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

import forkrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# the settings every script run in the tests shares: tiny, CPU, offline, in-process loading.
# resnet10 (torchvision's ResNet with one basic block per stage, tested equal to it in
# test_backbone): every code path of resnet18's at half its compute
ARCH = 'resnet10'
TINY = ['--arch', ARCH, '--size', '32', '--cache-size', '40', '--workers', '0',
        '--device', 'cpu', '--offline']


def script_env(torch_home, **extra):
    """One thread (2 shared cores; CPU runs are then also bitwise reproducible), torch hub
    cache in a temporary folder (nothing is ever downloaded), no torchrun variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', TORCH_HOME=str(torch_home),
               PYTHONDONTWRITEBYTECODE='1', PYTHONUNBUFFERED='1')
    env.update(extra)
    return env


def script_path(script):
    return script if os.path.isabs(script) else os.path.join(ROOT, script)


def script_cmd(script, *args):
    return [sys.executable, script_path(script)] + [str(a) for a in args]


# the suite's temporary files at their peak (tests/*: ResNet-18 checkpoints), measured with
# `du` every 5 s through a run on 2026-12-01: 2.4 GB; passing tests leave none (pytest.ini)
NEEDS_GB = 3


def pytest_sessionstart(session):
    free = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
    if free < NEEDS_GB:
        pytest.exit(f'only {free:.1f} GB free in {tempfile.gettempdir()}: the tests write up to '
                    f'{NEEDS_GB} GB there; free some space (old pytest-of-* folders, clones) or '
                    f'point TMPDIR elsewhere', returncode=2)


# the longest files first, so that `make test`'s workers (-n auto --dist loadfile: a file
# whole to one worker, handed out in collection order) do not end on one of them alone;
# seconds from `pytest --durations=0` on 2026-12-02, 2 workers: 41, 38, 38, 37, 33
LONGEST = ['test_makefile_torchrun.py', 'test_makefile.py', 'test_backbone.py',
           'test_parallel.py', 'test_report.py']


def pytest_collection_modifyitems(items):
    rank = {name: k for k, name in enumerate(LONGEST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST)))  # stable


@pytest.fixture(scope='session')
def torch_home(tmp_path_factory):
    return tmp_path_factory.mktemp('torch_home')


@pytest.fixture(scope='session')
def run_script(torch_home):
    """run_script('pretrain_barlow.py', *args, cwd=DIR, timeout=S) -> CompletedProcess (text).
    The script runs in its own process, cwd DIR, OMP_NUM_THREADS=1 and TORCH_HOME=tmp: forked
    from a server that has imported torch (forkrun.py), or with env=..., started by
    sys.executable."""
    def run(script, *args, cwd, timeout=180, env=None):
        if env is None:
            return forkrun.Run(script_path(script), args, cwd, script_env(torch_home)).wait(
                timeout)
        return subprocess.run(script_cmd(script, *args), cwd=str(cwd), capture_output=True,
                              text=True, timeout=timeout, env=env)
    return run


@pytest.fixture(scope='session')
def start_script(torch_home):
    """start_script(script, *args, cwd=DIR, stdout=FILE) -> a Popen (for kill/signal tests):
    its pid, poll, wait, send_signal, kill and returncode, the run forked as run_script's."""
    def start(script, *args, cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
        return forkrun.Popen(script_path(script), args, cwd, script_env(torch_home), stdout,
                             stderr)
    return start


@pytest.fixture(scope='session')
def run_scripts(torch_home):
    """run_scripts([(script, [args]), ...], cwd=DIR) -> [CompletedProcess]: the runs go
    concurrently (the two cores are otherwise idle through each run's imports)."""
    def run(jobs, cwd, timeout=300):
        runs = [forkrun.Run(script_path(s), a, cwd, script_env(torch_home)) for s, a in jobs]
        return [r.wait(timeout) for r in runs]
    return run


@pytest.fixture
def fastpy(tmp_path, torch_home):
    """(fastpy, environment): `make PY=fastpy` (or torchrun --no-python fastpy) runs each
    `$(PY) script args` through forkrun's server, still a process of its own but without
    importing torch again (the whole chain's 20 processes spent 8 s each doing that)."""
    sock = str(tmp_path / 'fork.sock')
    server = forkrun.serve(sock, script_env(torch_home))
    yield f'{ROOT}/tests/fastpy', dict(FORKRUN_SOCKET=sock)
    server.kill()
    server.wait(timeout=60)


def write_imagefolder(root, classes=3, per_class=30, side=40, seed=0):
    """root/c<k>/img<k>_<i>.png: noise tinted per class (so a classifier has something to
    learn), distinct file names across classes."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(os.path.join(root, f'c{c}'), exist_ok=True)
        tint = np.zeros(3)
        tint[c % 3] = 90
        for i in range(per_class):
            a = rng.integers(0, 140, (side, side, 3)) + tint
            Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(
                os.path.join(root, f'c{c}', f'img{c}_{i:02d}.png'))
    return str(root)


@pytest.fixture(scope='session')
def imagefolder(tmp_path_factory):
    """A 3-class ImageFolder, 30 PNG images of 40x40 per class (90 images)."""
    return write_imagefolder(tmp_path_factory.mktemp('data') / 'tiny')
