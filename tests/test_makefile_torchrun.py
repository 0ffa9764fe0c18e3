"""The Makefile chain under torchrun, two CPU processes a step: every kind of step (supervised
and Barlow Twins pretraining, further Barlow Twins from an init, fine-tuning and the probe one
seed a rank) for a subset of the inits, two steps at a time (JOBS=2: each launch's own
imports overlap the other's work). Its own file, so that it runs beside the whole-chain
smoke run of test_makefile.py, each on a core."""
import os
import shutil

import pytest

from test_makefile import check_chain, make, tiny


@pytest.mark.slow
def test_whole_chain_under_torchrun(tmp_path, fastpy):
    if shutil.which('make') is None:
        pytest.skip('no make')
    inits = ('supervised', 'barlow+skinBT')  # barlow+skinBT needs the source Barlow Twins run
    # torchrun's own launcher starts each step's ranks; it and they are forked processes
    # (conftest.fastpy, tests/torchrun)
    fast, env = fastpy
    torchrun = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'torchrun')
    run = f'RUN={fast} {torchrun} --standalone --nproc_per_node=2 --no-python {fast}'
    r = make(*tiny(tmp_path, nproc=2), f'INITS={" ".join(inits)}', run, 'JOBS=2', **env)
    assert 'torchrun --standalone --nproc_per_node=2' in r.stdout
    assert r.stdout.count('torchrun --standalone') == 7    # 3 pretraining runs, 2 x 2 evaluations
    check_chain(tmp_path, r, inits, pretrained=('supervised', 'barlow', 'barlow+skinBT'))
