"""tests/paper_cost.py, the arithmetic of `make paper`'s cost: its work is what `make -n paper`
runs, its sums come out as computed by hand, the rate factor it names meets the goal exactly,
and the README's table is its output."""
import inspect
import math
import os
import re
import subprocess

import pytest

import bench_gpu
import common as C
import finetune
import paper_cost
import pretrain_barlow
import probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W = paper_cost.WORK
A = paper_cost.ASSUMED


def flag(line, name):
    m = re.search(rf'{name} (\S+)', line)
    return m.group(1) if m else None


def test_the_work_is_what_make_paper_runs():
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'MAKEFLAGS')}
    r = subprocess.run(['make', '--no-print-directory', '-n', 'paper', 'SKIN=/nowhere/ISIC_2019'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout.replace('\\\n', ' ')
    lines = out.splitlines()
    ft = [l for l in lines if 'finetune.py ' in l]
    pr = [l for l in lines if 'probe.py ' in l]
    bt = [l for l in lines if 'pretrain_barlow.py ' in l]
    # every init fine-tuned with all the labels (no flag), the curve's inits at the later
    # budgets too; every init probed at every budget; one command each
    grid = lambda lines: sorted((flag(l, '--init-name'), float(flag(l, '--label-fraction') or 1))
                                for l in lines)
    first, *later = W['budgets']
    assert grid(ft) == sorted([(i, first) for i in W['inits']] +
                              [(i, f) for f in later for i in W['curve_inits']])
    assert grid(pr) == sorted((i, f) for i in W['inits'] for f in W['budgets'])
    assert set(W['curve_inits']) < set(W['inits'])
    assert not any('--labels-per-class' in l for l in ft + pr)
    seeds = {(flag(l, '--init-name'), flag(l, '--seeds')) for l in ft + pr}
    assert seeds == {(i, f'0-{(W["random_seeds"] if i == "random" else W["seeds"]) - 1}')
                     for i in W['inits']}
    assert {flag(l, '--epochs') for l in ft} == {str(W['epochs'])}
    assert {flag(l, '--aug-views') for l in pr} == {str(W['probe_views'])}
    assert all(flag(l, '--size') == str(W['bt_size']) for l in ft + pr + bt)
    ft_args = finetune.get_args(['--data', 'x', '--init', 'random'])  # the flags make leaves out
    assert not any('--head-epochs' in l or '--tta' in l for l in ft)
    assert (ft_args.head_epochs, ft_args.tta) == (W['head_epochs'], W['tta'])
    assert all(flag(l, '--batch-size') == str(W['ft_batch']) for l in ft)
    # two further runs from the published inits and the skin-only one from random init, all
    # with the skin preset's projector-only epoch and no --monitor-every of their own
    runs = sorted((flag(l, '--init'), int(flag(l, '--epochs'))) for l in bt)
    assert runs == [('barlowtwins', W['further_epochs']), ('random', W['skin_epochs']),
                    ('torchvision', W['further_epochs'])]
    assert all(flag(l, '--preset') == 'skin' and '--head-warmup-epochs' not in l
               and '--monitor-every' not in l and flag(l, '--pool') == W['pool'] for l in bt)
    assert {flag(l, '--batch-size') for l in bt} == {str(W['bt_batch'])}
    assert {flag(l, '--lr') for l in bt} == {'auto'}  # the range test, as the paper
    assert inspect.signature(C.lr_range_test).parameters['steps'].default == \
        W['range_test_steps']
    assert pretrain_barlow.PRESETS['skin']['head_warmup_epochs'] == W['projector_epochs']
    assert probe.get_args(['--data', 'x', '--init', 'random']).aug_views == 16
    # the kNN monitor's references, and the benchmark's shapes the rates are taken at
    monitor = inspect.signature(pretrain_barlow.knn_monitor).parameters
    assert monitor['per_class'].default == W['knn_per_class']
    full = bench_gpu.CONFIGS['full']
    assert (full['size'], full['ft_size'], full['tta'], full['classes']) == \
        (W['bench_size'], W['bt_size'], W['tta'], W['classes'])
    assert full['probe'] == (W['labelled'], W['probe_views'], W['val'], W['test'])


def test_the_sums_at_rates_chosen_to_give_round_numbers():
    """At ft = 41 x 2,496 img/s a seed of all the labels trains in 1 s (2,554 images are 39
    full batches of 64: the loader drops the last partial one); at tta = 18,633 its test
    passes take 1 s. Each other piece is written out by hand here."""
    ft, tta = 41 * 2496, 18633.0
    bt = 2432 / (224 / 256) ** 2  # a second for an epoch of the train part (19 batches of 128)
    rows = {p: (one, eight) for p, _, one, eight in
            paper_cost.pieces(ft, tta, bt, fit_s=0.5, ddp_efficiency=0.25, gpus=8)}
    close = lambda got, want: math.isclose(got, want, rel_tol=1e-9)
    # all the labels: 5 inits x 35 seeds + random init's 5; on 8 GPUs 35 seeds are 5 rounds
    # and random init's 5 one
    one, eight = rows['fine-tuning, all the labels']
    assert close(one, (5 * 35 + 5) * 2.0) and close(eight, (5 * 5 + 1) * 2.0)
    one, eight = rows['fine-tuning, 0.5 of the labels']  # supervised and barlow only
    assert close(one, 2 * 35 * (41 * 1216 / ft + 1)) and close(eight, 2 * 5 * (41 * 1216 / ft + 1))
    forward = 3 * tta  # single-view passes a second
    one, eight = rows['probe: features (once an init, on every rank)']
    assert close(one, 6 * (2554 * 17 + 2070 + 18633) / forward) and close(eight, one)
    # every init probed at both budgets, half the labels in half the time
    assert rows['probe: seeds (fits, kNN)'] == (180 * 1.5 * 0.5, 26 * 1.5 * 0.5)
    measured = {p: (one, eight) for p, _, one, eight in paper_cost.pieces(
        ft, tta, bt, fit_s={1.0: 0.5, 0.5: 0.4}, ddp_efficiency=0.25, gpus=8)}
    assert measured['probe: seeds (fits, kNN)'] == (180 * 0.9, 26 * 0.9)
    # the whole grid, every init 35 times at both budgets
    full = {p: (one, eight) for p, _, one, eight in paper_cost.pieces(
        ft, tta, bt, fit_s=0.5, ddp_efficiency=0.25, gpus=8,
        work=dict(W, curve_inits=W['inits'], random_seeds=35))}
    assert full['fine-tuning, all the labels'] == (6 * 35 * 2.0, 6 * 5 * 2.0)
    one, eight = full['fine-tuning, 0.5 of the labels']
    assert close(one, 6 * 35 * (41 * 1216 / ft + 1)) and close(eight, 6 * 5 * (41 * 1216 / ft + 1))
    assert full['probe: seeds (fits, kNN)'] == (6 * 35 * 1.5 * 0.5, 6 * 5 * 1.5 * 0.5)
    knn = 8 * 25 + 2070  # the monitor's references and the val part
    one, eight = rows['further Barlow Twins']  # 1 + 100 epochs, every 2nd monitored: 51 passes
    test = 100 * 128 / 2432  # the lr range test: 100 steps of 128 pairs, in epochs' seconds
    assert close(one, 2 * (101 + test) + 2 * 51 * knn / forward)
    assert close(eight, 2 * (101 + test) / (8 * 0.25) + 2 * 51 * knn / forward)
    one, eight = rows['Barlow Twins on skin only']  # 1 + 1,000 epochs, every 20th: 51 passes
    assert close(one, 1001 + test + 51 * knn / forward)
    assert close(eight, (1001 + test) / 2 + 51 * knn / forward)
    assert pretrain_barlow.monitor_every(1000, 2554) == 20
    assert pretrain_barlow.monitor_every(100, 2554) == 2
    assert pretrain_barlow.monitor_every(6, 2554) == 1
    assert pretrain_barlow.monitor_every(100, 1_281_167) == 25


def test_the_monitor_default_keeps_to_its_pass_counts():
    """At most 50 passes in a run's epochs on a small pool (every epoch up to 50), at most 4
    on a big one, besides the one before the first step; every epoch of a short run."""
    for epochs in range(1, 2001):
        small, big = (epochs // pretrain_barlow.monitor_every(epochs, pool)
                      for pool in (4496, 20_000))
        assert small == min(epochs, small) and small <= 50 and big <= 4
        assert small == epochs if epochs <= 50 else small >= 25  # never fewer than half
        assert paper_cost.monitor_passes(epochs, 1, 4496) <= 52


@pytest.mark.parametrize('gpus,column', [(1, 2), (8, 3)])
def test_the_factor_it_names_meets_the_goal_exactly(gpus, column):
    rows = paper_cost.pieces(A['ft'], A['tta'], A['bt'], A['fit_s'], A['ddp_efficiency'], 8)
    k = paper_cost.needed(rows, paper_cost.GOALS[gpus], column)
    assert k > 1  # the assumed rates miss both goals
    faster = paper_cost.pieces(k * A['ft'], k * A['tta'], k * A['bt'], A['fit_s'],
                               A['ddp_efficiency'], 8)
    assert math.isclose(sum(r[column] for r in faster), paper_cost.GOALS[gpus], rel_tol=1e-9)
    assert paper_cost.needed(rows, 1.0, column) is None  # under the fits' own time: never


def test_the_readme_table_is_its_output(capsys):
    paper_cost.main([])  # what `python tests/paper_cost.py` prints
    out = capsys.readouterr().out
    assert out.startswith('Rates (assumed') and '| **make paper** |' in out
    readme = open(os.path.join(ROOT, 'README.md')).read()
    assert out.strip() in readme, 'README: paste `python tests/paper_cost.py` again'


def test_bench_gpu_computes_it_from_what_it_measured():
    lines = bench_gpu.paper_cost_lines(dict(ft=2500.0, tta=2500.0, bt=2500.0), tiny=False)
    assert lines[0].startswith('Rates (measured above): fine-tuning 2,500 img/s')
    table = paper_cost.table(2500.0, 2500.0, 2500.0, A['fit_s'], A['ddp_efficiency'])
    start = table.index('')  # after the rates
    assert lines[start:] == table[start:]
    assert bench_gpu.paper_cost_lines(dict(ft=1.0, tta=None, bt=None, fit_s=2.0),
                                      tiny=False) == ['not computed: no tta, bt rate was measured']
    measured = ' '.join(bench_gpu.paper_cost_lines(dict(ft=1.0, tta=1.0, bt=1.0, fit_s=0.25),
                                                   tiny=False))
    assert 'one probe seed 0.25 s (measured)' in measured
    assert '| probe: seeds (fits, kNN) | 360 seeds: 180 x (0.25 + 0.125 s, measured)' in measured
    assert 'one probe seed 1 s (assumed)' in ' '.join(
        bench_gpu.paper_cost_lines(dict(ft=1.0, tta=1.0, bt=1.0, fit_s=None), tiny=False))
    assert bench_gpu.paper_cost_lines(dict(ft=1.0, tta=1.0, bt=1.0), tiny=True)[0] == \
        '(tiny shapes: the arithmetic only, not what make paper costs)'


def test_labels_as_make_paper_takes_them(capsys):
    paper_cost.main(['--labels', 'all'])  # make paper PAPER_LABELS=all
    out = capsys.readouterr().out
    assert '| fine-tuning, all the labels |' in out and '0.5 of the labels' not in out
    assert '| probe: seeds (fits, kNN) | 180 seeds:' in out
    paper_cost.main(['--curve-inits', 'random', 'skinBT', '--random-seeds', '35'])
    out = capsys.readouterr().out
    assert '| fine-tuning, 0.5 of the labels | 70 seeds of 2 inits x' in out
    assert '| fine-tuning, all the labels | 210 seeds of 6 inits x' in out
    for bad in (['--random-seeds', '0'], ['--gpus', '1'], ['--curve-inits', 'imagenet']):
        with pytest.raises(SystemExit) as e:
            paper_cost.main(bad)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert '--random-seeds: 0: give a whole number, 1 or more' in err
    assert '--gpus: 1: give a whole number, 2 or more' in err
    assert "--curve-inits: invalid choice: 'imagenet'" in err
    for bad in (['2'], ['half'], ['0.0'], ['1'], ['1.5']):
        with pytest.raises(SystemExit) as e:
            paper_cost.main(['--labels', *bad])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert '--labels half: give all or a fraction of each class such as 0.5' in err
    assert '--labels 1: give all' in err  # `1` is one image per class to the Makefile
