"""The Makefile chain: the commands `make -n` prints for overridden variables, and a smoke run
of the whole study with tiny settings (under torchrun: test_makefile_torchrun.py)."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make(*args, timeout=600, **extra_env):
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    env.update(OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **extra_env)
    return subprocess.run(['make', '--no-print-directory', *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


ALL_INITS = 'INITS=random supervised barlow supervised+skinBT barlow+skinBT skinBT'


def test_dry_run_with_published_weights_and_torchrun():
    r = make('-n', 'all', ALL_INITS, 'SKIN=/somewhere/ISIC_2019', 'SUP_INIT=torchvision', 'PROBE_LABELS=',
             'BT_INIT=barlowtwins', 'NPROC=2', 'ARCH=resnet50', 'SIZE=256', 'SEEDS=0-4',
             'PROTOCOL=paper', 'PER_CLASS=500',
             'OUT=/tmp/never', 'RESULTS=/tmp/never-results', 'SPLIT=/tmp/never-split.json')
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert 'make_synthetic.py' not in out                  # a dataset was given
    assert 'pretrain_supervised.py' not in out             # published weights instead
    assert 'runs/barlow/' not in out and '/tmp/never/barlow/' not in out
    assert 'common.py split --data /somewhere/ISIC_2019 --protocol paper --per-class 500' \
        in out
    ft = [l for l in out.splitlines() if 'finetune.py' in l]
    assert len(ft) == 6                                    # one command per init
    # each command is timed (t0=...; CMD && ...): the command itself follows the first '; '
    assert all(l.split('; ', 1)[1].startswith('.venv/bin/torchrun --standalone --nproc_per_node=2')
               for l in ft)
    assert all('--parallel seeds' in l for l in ft)         # one seed per rank, no DDP
    assert all('--arch resnet50' in l and '--size 256' in l and '--seeds 0-4' in l for l in ft)
    inits = {l.split('--init-name ')[1].split()[0]: l.split('--init ')[1].split()[0] for l in ft}
    assert inits == {'random': 'random', 'supervised': 'torchvision', 'barlow': 'barlowtwins',
                     'supervised+skinBT': '/tmp/never/supervised+skinBT/backbone.pt',
                     'barlow+skinBT': '/tmp/never/barlow+skinBT/backbone.pt',
                     'skinBT': '/tmp/never/skinBT/backbone.pt'}
    bt = [l for l in out.splitlines() if 'pretrain_barlow.py' in l]
    assert len(bt) == 3 and any('--init torchvision' in l for l in out.split('pretrain_barlow'))
    assert len([l for l in out.splitlines() if 'probe.py' in l]) == 6
    assert 'report.py --results /tmp/never-results/results.jsonl' in out


def test_dry_run_default_pretrains_on_the_synthetic_source():
    r = make('-n', 'all', 'OUT=/tmp/never', 'RESULTS=/tmp/never-results', 'DATA=/tmp/never-data')
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert 'make_synthetic.py --out /tmp/never-data --only source' in out
    assert 'make_synthetic.py --out /tmp/never-data --only skin' in out
    assert 'pretrain_supervised.py' in out and '--data /tmp/never-data/source' in out
    assert '.venv/bin/torchrun' not in out
    # the paper's four inits: no random init, no skin-only Barlow Twins
    ft = [l.split('--init-name ')[1].split()[0] for l in out.splitlines() if 'finetune.py' in l]
    assert ft == ['supervised', 'barlow', 'supervised+skinBT', 'barlow+skinBT']
    assert 'runs/skinBT' not in out.replace('/tmp/never', 'runs')


def test_dry_run_runs_jobs_at_once_with_their_share_of_the_cores():
    """`make all` runs JOBS steps at once (or make's own -jN), each told to use an even share
    of the cores; a thread count set in the environment is kept; other targets run one step
    at a time on every core; under torchrun (NPROC > 1) one step at a time."""
    env = {k: v for k, v in os.environ.items() if k not in ('OMP_NUM_THREADS', 'MAKEFLAGS')}

    def dry(*args, target='all', **extra):
        r = subprocess.run(['make', '--no-print-directory', '-n', target, 'OUT=/tmp/never',
                            'RESULTS=/tmp/never-results', 'DATA=/tmp/never-data', *args],
                           cwd=ROOT, env=dict(env, **extra), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def steps(out):
        return [l for l in out.splitlines() if 'finetune.py' in l or 'pretrain_' in l]
    for args, jobs, threads in ((['CORES=2'], '-j2', 1), (['CORES=8'], '-j2', 4),
                                (['CORES=2', 'JOBS=1'], '-j1', 2), (['CORES=3', 'JOBS=4'], '-j4', 1),
                                (['CORES=6', '-j3'], '', 2),    # make's own -j: no -jJOBS
                                (['CORES=6', '-j'], '', 1),
                                (['CORES=6', 'THREADS=5'], '-j2', 5)):
        out = dry(*args)
        head = out.split('report')[0]  # the settings written, then the sub-make
        sub = ' '.join(head[head.index('make --no-print'):].replace('\\', ' ').split())
        assert head.startswith('mkdir -p /tmp/never && printf')
        assert sub == f'make --no-print-directory {jobs} THREADS={threads}'.replace('  ', ' '), \
            (args, sub)
        assert steps(out) and all(f'; OMP_NUM_THREADS={threads} .venv/bin/python ' in l
                                  for l in steps(out)), args
    out = dry('CORES=2', OMP_NUM_THREADS='3')
    assert 'OMP_NUM_THREADS=' not in out and '; .venv/bin/python finetune.py' in out
    out = dry('CORES=2', target='eval')                        # one step at a time: all cores
    assert steps(out) and 'OMP_NUM_THREADS=' not in out
    out = dry('NPROC=2')
    assert ' -j1 ' in out and 'OMP_NUM_THREADS=' not in out


def test_dry_run_probe_budgets_share_one_process_per_kind():
    """The probe's counts per class go in one command per init (the features are extracted
    once), fractions in another; fine-tuning gets one command per budget."""
    r = make('-n', 'all', 'LABELS=5 0.5', 'PROBE_LABELS=3 7', 'OUT=/tmp/never',
             'RESULTS=/tmp/never-results', 'DATA=/tmp/never-data')
    assert r.returncode == 0, r.stderr
    probe = [l for l in r.stdout.splitlines() if 'probe.py' in l]
    assert len(probe) == 8                                 # 4 inits x (counts, fractions)
    counts = [l for l in probe if '--labels-per-class' in l]
    assert len(counts) == 4 and all(
        sorted(l.split('--labels-per-class ')[1].split(' --')[0].split()) == ['3', '5', '7']
        for l in counts)
    assert all('--label-fraction 0.5 --aug-views 8 --init' in l for l in probe if l not in counts)
    ft = [l for l in r.stdout.splitlines() if 'finetune.py' in l]
    assert len(ft) == 8 and sum('--labels-per-class 5 ' in l for l in ft) == 4


def test_dry_run_curve_inits_and_random_seeds_narrow_the_grid():
    """CURVE_INITS: only they are fine-tuned at the budgets after the first; every init is
    probed at every budget. RANDOM_SEEDS: random init's seeds, in its commands and its done
    markers (a change of them runs it again)."""
    r = make('-n', 'all', ALL_INITS, 'LABELS=all 0.5', 'PROBE_LABELS=', 'SEEDS=0-3',
             'RANDOM_SEEDS=0-1', 'CURVE_INITS=supervised skinBT', 'OUT=/tmp/never',
             'RESULTS=/tmp/never-results', 'DATA=/tmp/never-data')
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    grid = lambda script: sorted(
        (l.split('--init-name ')[1].split()[0], '--label-fraction 0.5' in l,
         l.split('--seeds ')[1].split()[0]) for l in lines if script in l)
    seeds = lambda i: '0-1' if i == 'random' else '0-3'
    assert grid('finetune.py') == sorted([(i, False, seeds(i)) for i in INITS] +
                                         [('supervised', True, '0-3'), ('skinBT', True, '0-3')])
    assert grid('probe.py') == sorted((i, h, seeds(i)) for i in INITS for h in (False, True))
    assert all(l.count('--seeds') == 1 for l in lines if 'finetune.py' in l or 'probe.py' in l)
    assert '==> fine-tune random, all labels, seeds 0-1' in r.stdout
    touched = [l.split()[-1] for l in lines if l.startswith('mkdir -p /tmp/never-results/.done')]
    assert sum(t.endswith('-s0-1') for t in touched) == 3  # random: fine-tuning, 2 probes
    assert sum(t.endswith('-s0-3') for t in touched) == len(touched) - 3 == 5 * 3 + 2


def tiny(tmp, nproc=1):
    return ['all', ALL_INITS, f'DATA={tmp}/data', f'OUT={tmp}/runs', f'RESULTS={tmp}/results',
            f'CACHE_DIR={tmp}/cache', f'SPLIT={tmp}/split.json', f'NPROC={nproc}',
            'DEVICE=cpu', 'MAX_STEPS=2', 'SEEDS=0', 'LABELS=2', 'PROBE_LABELS=1', 'PER_CLASS=4',
            'FT_EPOCHS=1',
            'BATCH=8', 'BT_BATCH=8', 'FT_BATCH=8', 'PROJECTOR=32-32', 'SIZE=16',
            'CACHE_SIZE=20',
            'SYN_FLAGS=--size 24 --source-per-class 4 --skin-count 96 --workers 1']


INITS = ('random', 'supervised', 'barlow', 'supervised+skinBT', 'barlow+skinBT', 'skinBT')


def check_chain(tmp, r, inits=INITS, pretrained=INITS[1:]):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for init in pretrained:
        assert os.path.exists(f'{tmp}/runs/{init}/backbone.pt'), init
    rows = [json.loads(l) for l in open(f'{tmp}/results/results.jsonl')]
    got = {(r['init'], r['protocol']) for r in rows}
    assert got == {(i, p) for i in inits for p in ('finetune', 'probe')}
    table = open(f'{tmp}/results/summary.md').read()
    for init in inits:
        assert f'| {init} |' in table
    # a progress line per step: data (2), split, pretraining runs, 2 per init, the report
    assert r.stdout.count('==> ') >= 4 + len(pretrained) + 2 * len(inits)
    budgets = {(r['init'], r['labels_rule']) for r in rows if r['protocol'] == 'probe'}
    assert len(budgets) == 2 * len(inits)                  # the probe at 2 budgets: a curve
    assert 'wall time of each step' in r.stdout and '==> total:' in r.stdout


def test_whole_chain_smoke(tmp_path, fastpy):
    fast, env = fastpy
    py = [f'PY={fast}']
    r = make('-j2', *tiny(tmp_path), *py, **env)
    assert 'tests/fastpy pretrain_barlow.py' in r.stdout
    check_chain(tmp_path, r)
    again = make(*tiny(tmp_path), *py, **env)              # everything is up to date
    assert again.returncode == 0 and 'pretrain_' not in again.stdout  # no script ran again
    assert '==> fine-tune' not in again.stdout and '==> linear probe' not in again.stdout
    os.remove(f'{tmp_path}/runs/skinBT/backbone.pt')       # a missing step is redone alone
    again = make(*tiny(tmp_path), *py, **env)
    assert again.returncode == 0
    assert again.stdout.count('pretrain_barlow.py') == 1
    assert 'pretrain_supervised.py' not in again.stdout


def test_dry_run_ablation_gives_each_share_the_whole_pools_steps():
    r = make('-n', 'ablation', 'POOL_FRACTIONS=0.1 0.25 1.0', 'SKINBT_EPOCHS=2',
             'OUT=/tmp/never', 'RESULTS=/tmp/never-results', 'DATA=/tmp/never-data')
    assert r.returncode == 0, r.stderr
    runs = [l for l in r.stdout.splitlines() if '--pool-fraction' in l]
    got = [(l.split('--epochs ')[1].split()[0], l.split('--pool-fraction ')[1].split()[0])
           for l in runs]
    assert got == [('20', '0.1'), ('8', '0.25'), ('2', '1.0')]


def test_jobs_that_is_not_a_positive_number_is_refused_in_one_line():
    for jobs in ('0', 'two'):
        r = make('all', f'JOBS={jobs}', 'OUT=/tmp/never', 'RESULTS=/tmp/never-results',
                 'DATA=/tmp/never-data')
        assert r.returncode == 2, r.stdout + r.stderr
        assert f'JOBS={jobs}: give the number of steps to run at once' in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and 'make_synthetic' not in r.stdout


def test_a_rerun_with_other_settings_is_refused_in_one_line(tmp_path):
    """Before: `make all SIZE=48` after `make all` reused the 32 px runs, skipped every seed as
    done and printed the old table; ARCH=resnet18 failed in a script's words."""
    where = [f'OUT={tmp_path}/runs', f'RESULTS={tmp_path}/results', f'SKIN={tmp_path}/none',
             f'SPLIT={tmp_path}/split.json', 'SUP_INIT=torchvision', 'BT_INIT=barlowtwins']
    first = make('all', *where)  # writes OUT/.settings, then stops at the missing dataset
    assert first.returncode != 0 and (tmp_path / 'runs' / '.settings').exists(), first.stderr
    assert 'SIZE=32' in (tmp_path / 'runs' / '.settings').read_text().splitlines()
    again = make('all', *where)  # the same settings: on to the same failure, not refused
    assert 'other settings' not in again.stderr and f'{tmp_path}/none' in again.stderr
    r = make('all', *where, 'SIZE=48', 'FT_EPOCHS=2')
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f'{tmp_path}/runs holds runs made with other settings (now SIZE=48 FT_EPOCHS=2); ' \
           f'make clean first, or give these their own OUT=... RESULTS=...' in r.stderr
    assert not (tmp_path / 'split.json').exists()
    for target in ('ablation', 'budgets'):  # they build on make all's runs: the same check
        r = make(target, *where, 'SIZE=48')
        assert r.returncode == 2 and 'holds runs made with other settings (now SIZE=48)' in \
            r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
