"""report.py: the t distribution, Welch and permutation tests against closed forms and hand
cases, then the script end to end as a subprocess on a results file written here."""
import csv
import io
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import forkrun
from conftest import script_env

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import report  # noqa: E402


# --------------------------------------------------------------------------- t distribution
@pytest.mark.parametrize('t', [-7.0, -1.5, -0.2, 0.0, 0.3, 1.0, 2.5, 12.0])
def test_t_cdf_closed_forms(t):
    assert report.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    assert report.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    # df = 3: 1/2 + (t/sqrt3 / (1 + t^2/3) + atan(t/sqrt3)) / pi
    u = t / math.sqrt(3)
    assert report.t_cdf(t, 3) == pytest.approx(0.5 + (u / (1 + u * u) + math.atan(u)) / math.pi,
                                               abs=1e-12)


def test_t_cdf_near_zero_keeps_t():
    # df/(df+t^2) rounds to 1 for |t| < 1e-8; the cdf must still move: 0.5 + atan(t)/pi
    for t in (1e-10, -3e-9, 1e-7):
        assert report.t_cdf(t, 1) - 0.5 == pytest.approx(math.atan(t) / math.pi, rel=1e-6, abs=0)


@pytest.mark.parametrize('q, df, p', [
    (2.228138851964938, 10, 0.975),   # table: t_{0.975, 10} = 2.228
    (2.015048372669157, 5, 0.95),     # table: t_{0.95, 5} = 2.015
    (12.70620473617471, 1, 0.975),    # table: t_{0.975, 1} = 12.706
    (2.749995653567230, 30, 0.995),   # table: t_{0.995, 30} = 2.750
    (1.959963984540054, 1e7, 0.975),  # df -> infinity: the normal 97.5% point
])
def test_t_cdf_tabulated_critical_values(q, df, p):
    assert report.t_cdf(q, df) == pytest.approx(p, abs=1e-6)
    assert report.t_cdf(-q, df) == pytest.approx(1 - p, abs=1e-6)


def test_t_sf_keeps_tiny_tails_against_mpmath():
    """Far tails with many degrees of freedom (t^2 < df): computed as 1 - I they cancelled to
    0 below about 1e-16 (t = 25, df = 10,000 gave 0.0); the reference is mpmath's incomplete
    beta at 50 digits."""
    mpmath = pytest.importorskip('mpmath')
    mpmath.mp.dps = 50
    for t, df in ((8, 1e4), (25, 1e4), (6, 68), (3, 1e6), (0.5, 1e4), (1e-3, 1e4)):
        x = mpmath.mpf(df) / (df + mpmath.mpf(t) ** 2)
        ref = float(mpmath.betainc(mpmath.mpf(df) / 2, 0.5, 0, x, regularized=True) / 2)
        assert report.t_sf(t, df) == pytest.approx(ref, rel=1e-9, abs=0), (t, df)
        assert report.t_sf(-t, df) == pytest.approx(1 - ref, rel=1e-9)


def test_t_cdf_non_integer_df_against_numerical_integration():
    # Welch df are not integers: integrate the t density with Simpson's rule from 0 to t
    df, t, n = 7.3, 1.7, 2000
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    pdf = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)
    h = t / n
    simpson = h / 3 * sum((1 if k in (0, n) else 4 if k % 2 else 2) * pdf(k * h)
                          for k in range(n + 1))
    assert report.t_cdf(t, df) == pytest.approx(0.5 + simpson, abs=1e-10)


# --------------------------------------------------------------------------- Welch
def test_welch_df2_closed_form():
    # a = [1, 3]: mean 2, var 2; b = [0, 2]: mean 1, var 2. se = sqrt(2/2 + 2/2) = sqrt 2,
    # t = 1/sqrt2, df = (1+1)^2 / (1^2/1 + 1^2/1) = 2; p = 1 - cdf_2(t) = 1/2 - 1/(2 sqrt5)
    assert report.welch_p([1, 3], [0, 2]) == pytest.approx(0.5 - 1 / (2 * math.sqrt(5)), abs=1e-12)


def test_welch_df1_closed_form():
    # a = [10, 12]: mean 11, var 2; b = [9, 9]: var 0. se = 1, t = 2, df = 1^2 / (1^2/1) = 1;
    # p = 1/2 - atan(2)/pi
    assert report.welch_p([10, 12], [9, 9]) == pytest.approx(0.5 - math.atan(2) / math.pi,
                                                             abs=1e-12)


def test_welch_general_case_and_symmetry():
    a, b = [0.71, 0.69, 0.72, 0.70, 0.73], [0.66, 0.69, 0.64, 0.67]
    va, vb = statistics.variance(a) / 5, statistics.variance(b) / 4
    t = (statistics.mean(a) - statistics.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 4 + vb ** 2 / 3)
    assert report.welch_p(a, b) == pytest.approx(1 - report.t_cdf(t, df), abs=1e-12)
    assert report.welch_p(a, b) + report.welch_p(b, a) == pytest.approx(1.0, abs=1e-12)
    assert report.welch_p([1, 1], [0, 0]) == 0.0 and report.welch_p([0, 0], [0, 0]) == 1.0


# --------------------------------------------------------------------------- permutation
def test_permutation_exact_hand_cases():
    # C(6,3) = 20 relabellings; only {3,4,5} reaches the observed sum 12 -> 1/20
    assert report.permutation_p([3, 4, 5], [0, 1, 2]) == pytest.approx(1 / 20)
    assert report.permutation_p([0, 1, 2], [3, 4, 5]) == pytest.approx(1.0)  # every sum >= 3
    # ties: pool [1, 2, 0, 1], C(4,2) = 6 subsets with sums 3,1,2,2,3,1; observed 3 -> 2/6
    assert report.permutation_p([1, 2], [0, 1]) == pytest.approx(1 / 3)
    assert report.permutation_p([0.7] * 3, [0.7] * 3) == pytest.approx(1.0)
    # pool [.1, .2, .3, 0]: sums .3 .4 .1 .5 .2 .3; observed .1 + .2 = 0.30000000000000004,
    # and .3 + 0 = 0.3 must still count as a tie: 4/6 (3/6 without the tolerance)
    assert report.permutation_p([0.1, 0.2], [0.3, 0.0]) == pytest.approx(4 / 6)


def test_permutation_monte_carlo_branch():
    # C(20, 10) = 184756 > 20000 relabellings: Monte Carlo, seeded, (count+1)/(iters+1)
    rng = np.random.default_rng(1)
    a = list(rng.normal(0.3, 1, 10))
    b = list(rng.normal(0.0, 1, 10))
    p = report.permutation_p(a, b)
    assert p == report.permutation_p(a, b)  # fixed seed: reproducible
    x = np.array(a + b)  # exact answer by brute force over all subsets
    sums = x[np.array(list(itertools.combinations(range(20), 10)))].sum(1)
    exact = (sums >= sum(a) - 1e-9).mean()
    assert 0.005 < exact < 0.3
    assert abs(p - exact) < 4 * math.sqrt(exact * (1 - exact) / 20000)
    assert report.permutation_p(list(range(10, 20)), list(range(10))) == pytest.approx(1 / 20001)


# --------------------------------------------------------------------------- t quantile, intervals
@pytest.mark.parametrize('q, df, p', [
    (3.182446305284263, 3, 0.975),    # table: t_{0.975, 3} = 3.182
    (2.228138851964938, 10, 0.975),
    (12.70620473617471, 1, 0.975),
    (2.015048372669157, 5, 0.95),
    (2.749995653567230, 30, 0.995),
])
def test_t_ppf_inverts_the_table(q, df, p):
    assert report.t_ppf(p, df) == pytest.approx(q, abs=1e-9)
    assert report.t_ppf(1 - p, df) == pytest.approx(-q, abs=1e-9)
    assert report.t_ppf(0.5, df) == pytest.approx(0.0, abs=1e-12)


def test_t_interval_hand_values():
    # [1, 2, 3, 4]: mean 2.5, s^2 = (2.25 + .25 + .25 + 2.25) / 3 = 5/3, se = sqrt(5/3) / 2,
    # half-width = t_{0.975,3} * se = 3.182446305284263 * 0.6454972243679028
    lo, hi = report.t_interval([1, 2, 3, 4])
    h = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert (lo, hi) == (pytest.approx(2.5 - h, abs=1e-9), pytest.approx(2.5 + h, abs=1e-9))
    assert h == pytest.approx(2.0542603, abs=1e-6)
    # n = 2, [0.6, 0.7]: s = 0.1 / sqrt 2, se = 0.05, t_{0.975,1} = 12.706
    lo, hi = report.t_interval([0.6, 0.7])
    assert hi - lo == pytest.approx(2 * 12.70620473617471 * 0.05, abs=1e-9)
    assert report.t_interval([0.5]) is None and report.t_interval([]) is None
    assert report.t_interval([0.3, 0.3, 0.3]) == (pytest.approx(0.3), pytest.approx(0.3))


# --------------------------------------------------------------------------- paired sign flip
def brute_sign_flip(d):  # every sign pattern, plain Python
    sums = [sum(s * x for s, x in zip(signs, d))
            for signs in itertools.product([1, -1], repeat=len(d))]
    return sum(t >= sum(d) - 1e-9 for t in sums) / len(sums)


def test_sign_flip_hand_cases():
    # all four differences positive: only the identity pattern reaches the sum -> 1/16
    assert report.sign_flip_p([0.05, 0.01, 0.03, 0.02]) == pytest.approx(1 / 16)
    assert report.sign_flip_p([0.05] * 5) == pytest.approx(1 / 32)  # ties among themselves
    # [3, -1, 2]: sums of +-3 +-1 +-2 are 6 2 4 0 0 -4 -2 -6; observed 4: {6, 4} -> 2/8
    assert report.sign_flip_p([3, -1, 2]) == pytest.approx(2 / 8)
    # a zero difference flips to itself: the two patterns that differ only there tie, and
    # the >= counts both -> 2/16 (not 1/16)
    assert report.sign_flip_p([0.02, 0.0, 0.01, 0.03]) == pytest.approx(2 / 16)
    assert report.sign_flip_p([0.0, 0.0]) == pytest.approx(1.0)      # no difference at all
    assert report.sign_flip_p([-0.01, -0.02]) == pytest.approx(1.0)  # every sum >= -0.03
    # floating-point ties: sums of +-.1 +-.2 +-.3 are .6 .2 .4 -.6 -.2 -.4 and twice "0":
    # the observed .1 + .2 - .3 = 5.6e-17 and -.1 - .2 + .3 = -5.6e-17 must tie -> 5/8
    # (4/8 without the tolerance)
    assert report.sign_flip_p([0.1, 0.2, -0.3]) == pytest.approx(5 / 8)


def test_sign_flip_against_brute_force():
    rng = np.random.default_rng(3)
    for n in range(1, 9):
        d = list(np.round(rng.normal(0.01, 0.02, n), 3))  # rounded: ties happen
        assert report.sign_flip_p(d) == pytest.approx(brute_sign_flip(d)), d
    d = [0.02, -0.02, 0.02, 0.0, 0.01, -0.01]
    assert report.sign_flip_p(d) == pytest.approx(brute_sign_flip(d))


def test_sign_flip_monte_carlo_branch():
    # 2^16 = 65536 > 20000 patterns: Monte Carlo, seeded, p = (count+1)/(iters+1)
    d = list(np.random.default_rng(5).normal(0.004, 0.02, 16))
    p = report.sign_flip_p(d)
    assert p == report.sign_flip_p(d)  # fixed seed: reproducible
    exact = brute_sign_flip(d)
    assert 0.01 < exact < 0.5
    assert abs(p - exact) < 4 * math.sqrt(exact * (1 - exact) / 20000)
    few = report.sign_flip_p([0.01] * 16, iters=100)  # at most 100 random patterns
    assert few * 101 == pytest.approx(round(few * 101)) and few >= 1 / 101


# --------------------------------------------------------------------------- Holm
def test_holm_hand_example():
    # sorted 0.005 0.01 0.03 0.04 (m = 4) -> 4 x .005 = .02, 3 x .01 = .03, 2 x .03 = .06,
    # 1 x .04 = .04 -> .06 (the running max keeps the order)
    got = report.holm([0.01, 0.04, 0.03, 0.005])
    assert got == [pytest.approx(v) for v in (0.03, 0.06, 0.06, 0.02)]
    # 3 x .45 = 1.35 and 2 x .5 = 1.0: capped at 1, and the 0.9 after them stays 1
    assert report.holm([0.5, None, 0.45, 0.9]) == [1.0, None, 1.0, 1.0]
    assert report.holm([0.4, None, 0.3, 0.9]) == [pytest.approx(0.9), None, pytest.approx(0.9),
                                                    pytest.approx(0.9)]  # .9 .8 -> .9, .9
    assert report.holm([None, None]) == [None, None] and report.holm([]) == []
    assert report.holm([0.02]) == [pytest.approx(0.02)]  # one test: unchanged
    ps = list(np.random.default_rng(0).uniform(0, 0.2, 7))
    adj = report.holm(ps)
    order = np.argsort(ps)
    assert all(adj[i] >= ps[i] for i in range(7))
    assert all(adj[a] <= adj[b] for a, b in zip(order, order[1:]))  # monotone in p


# --------------------------------------------------------------------------- compare
def test_compare_paired_unpaired_and_too_few():
    base = {'0': 0.60, '1': 0.62, '2': 0.61, '3': 0.65}
    init = {'0': 0.63, '1': 0.64, '2': 0.60, '3': 0.70}  # d = .03 .02 -.01 .05
    c = report.compare(init, base, 'auto', 20000)
    d = [0.03, 0.02, -0.01, 0.05]
    assert c['test'] == 'paired' and c['pairs'] == 4
    assert c['p'] == pytest.approx(brute_sign_flip(d))
    assert c['diff'] == pytest.approx(statistics.mean(d))
    m, h = statistics.mean(d), 3.182446305284263 * statistics.stdev(d) / 2
    assert c['diff_ci'] == (pytest.approx(m - h), pytest.approx(m + h))
    # the same numbers under other seeds share nothing: the unpaired permutation test
    other = {str(int(k) + 10): v for k, v in init.items()}
    u = report.compare(other, base, 'auto', 20000)
    assert u['test'] == 'permutation' and u['pairs'] is None
    assert u['p'] == pytest.approx(report.permutation_p(list(init.values()), list(base.values())))
    assert report.compare(init, base, 'permutation', 20000)['p'] == pytest.approx(u['p'])
    assert report.compare(init, base, 'welch', 20000)['p'] == pytest.approx(
        report.welch_p(list(init.values()), list(base.values())))
    # one shared seed is not a pair test: unpaired; one run: no p, but a difference
    one = report.compare({'0': 0.7, '7': 0.8}, base, 'auto', 20000)
    assert one['test'] == 'permutation' and one['p'] is not None
    none = report.compare({'0': 0.7}, base, 'auto', 20000)
    assert none['p'] is None and none['diff'] == pytest.approx(0.7 - 0.62)


# --------------------------------------------------------------------------- init order, colours
def test_init_order_objectives_and_ablation_shares():
    names = ['zzz', 'simclr+skin', 'barlow+skinBT@1.0', 'vicreg', 'barlow', 'zzz@0.5',
             'barlow+skinBT@0.3', 'skinBT', 'barlow+skinBT', 'simclr', 'vicreg+skin',
             'barlow+skinBT@big', 'barlow+skinBT@0.1', 'random', 'supervised', 'zzz-a',
             'supervised+skinBT', 'supervised+skinBT@0.1']
    stats = {(n, 'finetune'): {} for n in names}
    assert report.layout(stats)[0] == [
        'random', 'supervised', 'barlow', 'supervised+skinBT', 'supervised+skinBT@0.1',
        'barlow+skinBT', 'barlow+skinBT@0.1', 'barlow+skinBT@0.3', 'barlow+skinBT@1.0',
        'barlow+skinBT@big', 'skinBT', 'vicreg', 'vicreg+skin', 'simclr', 'simclr+skin',
        'zzz', 'zzz@0.5', 'zzz-a']


def test_palette_one_colour_per_init():
    plt = report.pyplot()
    if plt is None:
        pytest.skip('matplotlib is not installed')
    # 10 known inits fill tab10; '@0.1' and '@1.0' (same characters) must still differ
    names = report.INIT_ORDER + ['barlow+skinBT@0.1', 'barlow+skinBT@0.3', 'barlow+skinBT@1.0',
                                 'zzz-custom']
    colors = report.palette(plt, names + ['barlow'])
    assert len({colors[n] for n in names}) == len(names)


# --------------------------------------------------------------------------- end to end
BAL = {  # (init, protocol) -> balanced accuracy per seed
    ('supervised', 'finetune'): [0.61, 0.63, 0.60, 0.64, 0.62],
    ('barlow', 'finetune'): [0.66, 0.68, 0.65, 0.69, 0.67],
    ('barlow+skinBT', 'finetune'): [0.70, 0.64, 0.61],
    ('random', 'finetune'): [0.31],
    ('zzz-custom', 'finetune'): [0.50, 0.58],
    ('supervised', 'probe'): [0.52, 0.55, 0.50, 0.53, 0.54],
    ('barlow', 'probe'): [0.58, 0.51, 0.60, 0.57, 0.59],
}


def row(init, protocol, seed, bal, labels=2554, auroc=0.9):
    return {'init': init, 'backbone': f'runs/{init}/backbone.pt', 'backbone_sha': 'ab12',
            'dataset': 'skin', 'split': 'paper', 'labels': labels, 'protocol': protocol,
            'seed': seed, 'epochs': 40, 'wall_s': 1.0,
            'metrics': {'accuracy': bal + 0.05, 'balanced_accuracy': bal, 'macro_f1': bal - 0.1,
                        'weighted_f1': bal, 'auroc': auroc, 'per_class_recall': [bal, None],
                        'confusion_matrix': [[1, 0], [0, 1]], 'n': 100}}


def write_results(path):
    rows = [row('barlow', 'finetune', 0, 0.0)]  # replaced by the rerun of seed 0 below
    for (init, protocol), xs in BAL.items():
        rows += [row(init, protocol, s, x) for s, x in enumerate(xs)]
    rows[-1]['metrics']['auroc'] = None  # undefined in one probe run -> "(n=4)"
    rows += [row('supervised', 'finetune', s, 0.5, labels=1277) for s in range(2)]
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows) + '\n')
    return rows


def run_report(*args, cwd):
    """report.py in a process of its own, forked from the fork server (forkrun.py)."""
    return forkrun.Run(str(ROOT / 'report.py'), args, str(cwd),
                       script_env(os.path.join(cwd, 'torch_home'))).wait(60)


def table_rows(md, heading):
    """(header, {init: {column: cell}}) of the Markdown table under the heading line."""
    block = md.split(heading + '\n\n', 1)[1].split('\n\n')[0]
    lines = [l for l in block.splitlines() if l.startswith('| ')]
    cells = [[c.strip() for c in l.strip('|').split('|')] for l in lines]
    return cells[0], {c[0]: dict(zip(cells[0][1:], c[1:])) for c in cells[1:]}


def cell(xs):
    return f'{statistics.mean(xs):.3f} +- {statistics.stdev(xs):.3f}'


T975 = {1: 12.70620473617471, 2: 4.302652729911275, 3: 3.182446305284263,
        4: 2.7764451051977987}  # t_{0.975, df} from the tables


def ci_cell(xs, sign=''):  # 'mean [lo, hi]' with the t-interval written out here
    m, h = statistics.mean(xs), T975[len(xs) - 1] * statistics.stdev(xs) / math.sqrt(len(xs))
    return f'{m:{sign}.3f} [{m - h:{sign}.3f}, {m + h:{sign}.3f}]'


def exact_p(a, b):  # a second, plain-Python enumeration of the one-sided permutation test
    pool, k = a + b, len(a)
    sums = [sum(pool[i] for i in c) for c in itertools.combinations(range(len(pool)), k)]
    return sum(s >= sum(a) - 1e-9 for s in sums) / len(sums)


def holm_by_hand(ps):  # Holm written out: sort, multiply by m - rank, running max, cap at 1
    order, out, top = sorted(range(len(ps)), key=lambda i: ps[i]), [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        top = max(top, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = top
    return out


def pngs(folder):
    made = sorted(f for f in os.listdir(folder) if f.endswith('.png'))
    for f in made:
        assert (folder / f).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', f
    assert not [f for f in os.listdir(folder) if f.endswith('.tmp')]  # renamed, none left
    return made


def test_report_end_to_end(tmp_path):
    write_results(tmp_path / 'results.jsonl')
    r = run_report('--results', 'results.jsonl', '--out', 'out', '--test', 'permutation',
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / 'out' / 'summary.md').read_text()
    assert md.strip() in r.stdout
    assert '29 lines, 28 runs' in md and '(1 replaced)' in md  # barlow seed 0 was rerun
    head, rows = table_rows(md, '## skin / split paper / 2554 labels')
    block = ['n', 'acc', 'bal. acc', 'macro-F1', 'AUROC', 'bal. acc [95% CI]',
             'diff [95% CI]', 'p', 'p Holm']
    assert head == ['init'] + [f'ft {c}' for c in block] + [f'probe {c}' for c in block]
    # known inits in the fixed order, unknown ones after
    assert list(rows) == ['random', 'supervised', 'barlow', 'barlow+skinBT', 'zzz-custom']
    for (init, protocol), xs in BAL.items():
        c = {k.split(' ', 1)[1]: v for k, v in rows[init].items()
             if k.startswith(PROTO[protocol] + ' ')}
        assert c['n'] == str(len(xs)), (init, protocol)
        if len(xs) > 1:
            assert c['bal. acc'] == cell(xs)                         # balanced accuracy
            assert c['acc'] == cell([x + 0.05 for x in xs])          # accuracy
            assert c['macro-F1'] == cell([x - 0.1 for x in xs])      # macro-F1
            assert c['bal. acc [95% CI]'] == ci_cell(xs)
    assert rows['supervised']['ft bal. acc'] == '0.620 +- 0.016'  # sqrt(10e-4 / 4) = 0.0158
    assert [rows['random'][k] for k in ('ft n', 'ft acc', 'ft bal. acc')] == \
        ['1', '0.360 +- -', '0.310 +- -']  # n = 1: no std
    assert rows['random']['ft bal. acc [95% CI]'] == '0.310'  # n = 1: no interval
    assert rows['random']['ft p'] == 'n<2' and rows['supervised']['ft p'] == 'base'
    assert rows['supervised']['probe p'] == 'base' and rows['supervised']['ft diff [95% CI]'] \
        == 'base'
    assert rows['random']['probe n'] == '-'  # no probe run
    assert all(rows['random'][f'probe {c}'] == '' for c in block[1:])
    # barlow beats every supervised run: 1 of C(10,5) = 252 relabellings -> 0.004
    assert rows['barlow']['ft p'] == '0.004'
    ps = {}
    for init, protocol in [('barlow', 'finetune'), ('barlow+skinBT', 'finetune'),
                           ('zzz-custom', 'finetune'), ('barlow', 'probe')]:
        ps[(init, protocol)] = exact_p(BAL[(init, protocol)], BAL[('supervised', protocol)])
        assert rows[init][f'{PROTO[protocol]} p'] == f'{ps[(init, protocol)]:.3f}', init
    # unpaired: the difference of means with Welch's interval
    a, b = BAL[('barlow', 'probe')], BAL[('supervised', 'probe')]
    va, vb = statistics.variance(a) / 5, statistics.variance(b) / 5
    df = (va + vb) ** 2 / (va ** 2 / 4 + vb ** 2 / 4)
    h, d = report.t_ppf(0.975, df) * math.sqrt(va + vb), statistics.mean(a) - statistics.mean(b)
    assert rows['barlow']['probe diff [95% CI]'] == f'{d:+.3f} [{d - h:+.3f}, {d + h:+.3f}]'
    # Holm over the 4 tests of the table, both protocols together
    for (init, protocol), q in zip(ps, holm_by_hand(list(ps.values()))):
        assert rows[init][f'{PROTO[protocol]} p Holm'] == f'{q:.3f}', init
    assert 'over the 4 tests of this table' in md and '(u)' not in md  # one test for all
    assert rows['barlow']['probe AUROC'] == '0.900 +- 0.000 (n=4)'  # one null AUROC
    assert 'permutation' in md and 'not corrected for multiple comparisons' in md.lower()
    # a second table for the other label count
    _, rows2 = table_rows(md, '## skin / split paper / 1277 labels')
    assert list(rows2) == ['supervised'] and rows2['supervised']['ft n'] == '2'
    # CSV: one line per init x protocol x metric (4 metrics) in both tables, plus the header
    csv_lines = (tmp_path / 'out' / 'summary.csv').read_text().splitlines()
    assert len(csv_lines) == 1 + 4 * (len(BAL) + 1)
    assert 'skin,paper,2554,barlow,finetune,balanced_accuracy,0.67,' in '\n'.join(csv_lines)
    got = {(c['init'], c['protocol'], c['metric']): c
           for c in csv.DictReader(io.StringIO('\n'.join(csv_lines))) if c['budget'] == '2554'}
    for (init, protocol), q in zip(ps, holm_by_hand(list(ps.values()))):
        c = got[(init, protocol, 'balanced_accuracy')]
        assert float(c['p']) == pytest.approx(ps[(init, protocol)])
        assert float(c['p_holm']) == pytest.approx(q) and c['test'] == 'permutation'
    c = got[('barlow', 'probe', 'balanced_accuracy')]
    assert float(c['diff']) == pytest.approx(d) and float(c['diff_hi']) == pytest.approx(d + h)
    m = statistics.mean(a)
    assert float(c['ci_lo']) == pytest.approx(m - T975[4] * statistics.stdev(a) / math.sqrt(5))
    # two label budgets (2554 and 1277 labels, 2 classes): a curve, no pretraining logs
    assert pngs(tmp_path / 'out') == ['curve.png', 'summary.png']
    assert '## Label efficiency' in md


PROTO = {'finetune': 'ft', 'probe': 'probe'}


def test_report_paired_default(tmp_path):
    rows = write_results(tmp_path / 'results.jsonl')
    # an init run on other seeds than the baseline: nothing to pair, the unpaired fallback
    other = [0.64, 0.66, 0.65]
    rows = [row('other', 'finetune', 10 + s, x) for s, x in enumerate(other)]
    with open(tmp_path / 'results.jsonl', 'a') as f:
        f.write(''.join(json.dumps(r) + '\n' for r in rows))
    r = run_report('--results', 'results.jsonl', '--out', 'out', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / 'out' / 'summary.md').read_text()
    _, rows = table_rows(md, '## skin / split paper / 2554 labels')
    base = {p: BAL[('supervised', p)] for p in ('finetune', 'probe')}
    # barlow fine-tuning is 0.05 above the baseline in each of the 5 seeds: 1 of 2^5 = 0.031
    assert rows['barlow']['ft p'] == '0.031'
    assert rows['barlow']['ft diff [95% CI]'] == '+0.050 [+0.050, +0.050]'
    # barlow+skinBT ran seeds 0-2: paired on those 3, d = .09 .01 .01 all > 0 -> 1/8
    d = [x - y for x, y in zip(BAL[('barlow+skinBT', 'finetune')], base['finetune'])]
    assert rows['barlow+skinBT']['ft p'] == '0.125'
    assert rows['barlow+skinBT']['ft diff [95% CI]'] == ci_cell(d, '+') + ' (3 pairs)'
    # zzz-custom: d = -.11, -.05, every sign pattern sums to >= -.16 -> 1
    assert rows['zzz-custom']['ft p'] == '1.000'
    assert rows['random']['ft p'] == 'n<2'  # one run: no test, still a difference
    assert rows['random']['ft diff [95% CI]'] == '-0.310'  # 1 pair: 0.31 - mean 0.62
    d = [x - y for x, y in zip(BAL[('barlow', 'probe')], base['probe'])]
    p_probe = brute_sign_flip(d)
    assert rows['barlow']['probe p'] == f'{p_probe:.3f}'
    assert rows['barlow']['probe diff [95% CI]'] == ci_cell(d, '+')
    # the unpaired fallback, marked (u)
    p_other = exact_p(other, base['finetune'])
    assert rows['other']['ft p'] == f'{p_other:.3f} (u)'
    ps = [1 / 32, 1 / 8, 1.0, p_other, p_probe]  # barlow, barlow+skinBT, zzz, other (ft); probe
    keys = [('barlow', 'ft'), ('barlow+skinBT', 'ft'), ('zzz-custom', 'ft'), ('other', 'ft'),
            ('barlow', 'probe')]
    for (init, pr), q in zip(keys, holm_by_hand(ps)):
        assert rows[init][f'{pr} p Holm'] == f'{q:.3f}', init
    assert 'sign-flip' in md and 'over the 5 tests of this table' in md
    got = {(c['init'], c['protocol'], c['metric']): c
           for c in csv.DictReader(open(tmp_path / 'out' / 'summary.csv'))
           if c['budget'] == '2554'}
    assert got[('barlow', 'finetune', 'balanced_accuracy')]['test'] == 'paired'
    assert got[('barlow', 'finetune', 'balanced_accuracy')]['pairs'] == '5'
    assert got[('barlow+skinBT', 'finetune', 'accuracy')]['pairs'] == '3'
    assert got[('other', 'finetune', 'balanced_accuracy')]['test'] == 'permutation'
    assert float(got[('barlow', 'probe', 'balanced_accuracy')]['p']) == pytest.approx(p_probe)


def test_a_baseline_without_the_metric_is_named_not_too_few(tmp_path):
    """AUROC is null where the test part has fewer than 2 classes: a baseline with 4 runs, all
    null, has nothing to compare with. Before, the cell said n<2 (too few runs)."""
    rows = [row('supervised', 'finetune', s, 0.5, auroc=None) for s in range(4)]
    rows += [row('barlow', 'finetune', s, 0.6, auroc=0.8) for s in range(4)]
    (tmp_path / 'r.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    r = run_report('--results', 'r.jsonl', '--out', 'out', '--p-metric', 'auroc', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    _, cells = table_rows((tmp_path / 'out' / 'summary.md').read_text(),
                          '## skin / split paper / 2554 labels')
    assert cells['barlow']['ft p'] == 'no base' and cells['barlow']['ft n'] == '4'


def test_the_holm_floor_is_said_when_the_seeds_are_too_few():
    paired = lambda n: dict(pairs=n)
    # 6 tests of 6 pairs (make all's table): 1/64 at best, x 6 for Holm = 0.094
    assert report.floor([paired(6)] * 6) == (' With 6 pairs no p can fall below 0.016, nor any '
                                             'p Holm below 0.094: more seeds are needed to pass '
                                             '0.05.')
    assert report.floor([paired(6)] * 3) == ''  # 3/64 = 0.047 can pass
    assert report.floor([paired(6), paired(4)] * 2) != ''  # 4/64 = 0.0625
    assert report.floor([paired(6), dict(pairs=None)]) == ''  # an unpaired test: not exact
    assert report.floor([paired(20)] * 6) == ''  # sampled, p = 1/(iters+1) bounds it


def test_rows_of_two_splits_of_one_name_are_never_compared(tmp_path):
    """Two split files of protocol paper (another --per-class: other test sets): their rows
    keep to tables of their own, a seed of one never replaces or pairs with a seed of the
    other, and the report says so."""
    a = [dict(row('supervised', 'finetune', s, x), split_sha='aaaa1111ffff') for s, x in
         enumerate([0.60, 0.61, 0.62])]
    b = [dict(row(init, 'finetune', s, x), split_sha='bbbb2222ffff') for init, xs in
         (('supervised', [0.40, 0.41]), ('barlow', [0.70, 0.71])) for s, x in enumerate(xs)]
    (tmp_path / 'results.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in a + b))
    r = run_report('--results', 'results.jsonl', '--out', 'out', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert ('warning: skin/paper: rows of 2 different splits of that name (split_sha '
            'aaaa1111, bbbb2222: other test sets)') in r.stderr
    md = (tmp_path / 'out' / 'summary.md').read_text()
    _, first = table_rows(md, '## skin / split paper [aaaa1111] / 2554 labels')
    _, second = table_rows(md, '## skin / split paper [bbbb2222] / 2554 labels')
    assert set(first) == {'supervised'} and first['supervised']['ft n'] == '3'
    assert first['supervised']['ft bal. acc'] == cell([0.60, 0.61, 0.62])
    assert second['supervised']['ft bal. acc'] == cell([0.40, 0.41])  # not replaced by a
    assert second['barlow']['ft diff [95% CI]'].startswith('+0.300')  # paired within b only
    (tmp_path / 'b.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in b))  # one split
    one = run_report('--results', 'b.jsonl', '--out', 'out_b', cwd=tmp_path)
    assert one.returncode == 0 and 'different splits' not in one.stderr
    assert '## skin / split paper / 2554 labels' in (tmp_path / 'out_b' / 'summary.md').read_text()


def test_report_welch_option(tmp_path):
    write_results(tmp_path / 'results.jsonl')
    r = run_report('--results', 'results.jsonl', '--out', 'out', '--test', 'welch',
                   '--p-metric', 'accuracy', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    _, rows = table_rows(r.stdout, '## skin / split paper / 2554 labels')
    a = [x + 0.05 for x in BAL[('barlow', 'probe')]]
    b = [x + 0.05 for x in BAL[('supervised', 'probe')]]
    assert rows['barlow']['probe p'] == f'{report.welch_p(a, b):.3f}'
    assert 'probe acc [95% CI]' in rows['barlow'] and 'Welch' in r.stdout


# --------------------------------------------------------------------------- label efficiency
EFF = {  # (budget, init, protocol) -> balanced accuracy per seed
    ('per_class=5', 'supervised', 'finetune'): [0.30, 0.34, 0.31, 0.33],
    ('per_class=5', 'barlow', 'finetune'): [0.36, 0.39, 0.35],
    ('per_class=5', 'barlow', 'probe'): [0.33, 0.30],
    ('per_class=20', 'supervised', 'finetune'): [0.50, 0.53, 0.49, 0.52],
    ('per_class=20', 'barlow', 'finetune'): [0.56, 0.55, 0.58, 0.54],
    ('per_class=20', 'barlow', 'probe'): [0.47, 0.50, 0.48, 0.46],
    ('fraction=0.5', 'supervised', 'finetune'): [0.61, 0.64, 0.62],
    ('fraction=0.5', 'barlow', 'finetune'): [0.66, 0.67, 0.65],
    ('fraction=0.5', 'barlow', 'probe'): [0.55],
}
LABELS = {'per_class=5': [40, 41, 39, 40], 'per_class=20': [160, 158, 161, 160],
          'fraction=0.5': [1277, 1277, 1277]}  # whole lesions: a few images more or less


def write_budgets(path):
    rows = []
    for (budget, init, protocol), xs in EFF.items():
        for s, x in enumerate(xs):
            r = row(init, protocol, s, x, labels=LABELS[budget][s])
            r['labels_rule'] = budget
            r['metrics']['per_class_recall'] = [x] * 7 + [None]  # 8 classes, one absent
            rows.append(r)
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))


def write_logs(runs):
    (runs / 'finetune').mkdir(parents=True)  # no log.jsonl: not a pretraining run
    (runs / 'barlow').mkdir()
    (runs / 'supervised').mkdir()
    recs = [dict(step=s, epoch=s / 10, loss=900 / s, loss_inv=300 / s, loss_red=600 / s,
                 lr=0.1, img_s=800.0, rankme=10 + s, feat_std=0.5) for s in range(1, 41)]
    for r in recs[9::10]:
        r['knn_bal_acc'] = 0.2 + r['step'] / 100
    lines = [json.dumps(r) for r in recs] + ['{"step": 41, "loss": 2']  # killed mid-write
    (runs / 'barlow' / 'log.jsonl').write_text('\n'.join(lines))
    recs = [dict(step=s, epoch=s // 10, loss=2.0 / s ** 0.3, lr=0.1, img_s=900.0)
            for s in range(1, 31)] + [dict(step=30, epoch=3, top1=0.4, top5=0.8)]
    (runs / 'supervised' / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))


def test_report_label_efficiency_and_plots(tmp_path):
    write_budgets(tmp_path / 'results.jsonl')
    write_logs(tmp_path / 'runs')
    r = run_report('--results', 'results.jsonl', '--out', 'out', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / 'out' / 'summary.md').read_text()
    # one table per budget whatever the image count of each seed, fewest labels first
    titles = [l for l in md.splitlines() if l.startswith('## skin')]
    assert titles == ['## skin / split paper / per_class=5 (39-41 labels)',
                      '## skin / split paper / per_class=20 (158-161 labels)',
                      '## skin / split paper / fraction=0.5 (1277 labels)']
    _, rows = table_rows(md, titles[1])
    assert rows['barlow']['ft n'] == '4' and rows['barlow']['probe n'] == '4'
    # label efficiency: init x budget, x = K for per_class=K, mean labels / 8 classes else
    eff = md.split('## Label efficiency', 1)[1]
    head = ['init', 'per_class=5 (5/class)', 'per_class=20 (20/class)',
            f'fraction=0.5 ({1277 / 8:.3g}/class)']
    for protocol, title in [('finetune', 'fine-tuning'), ('probe', 'linear probe')]:
        got_head, got = table_rows(eff, f'### skin / split paper: {title}')
        assert got_head == head
        inits = ['supervised', 'barlow'] if protocol == 'finetune' else ['barlow']
        assert list(got) == inits
        for init in inits:
            for budget, col in zip(['per_class=5', 'per_class=20', 'fraction=0.5'], head[1:]):
                xs = EFF.get((budget, init, protocol))
                want = (ci_cell(xs) if len(xs) > 1 else f'{xs[0]:.3f}') + f' ({len(xs)})'
                assert got[init][col] == want, (init, budget)
    assert pngs(tmp_path / 'out') == ['curve.png', 'pretrain.png', 'summary.png']
    # the torn last line: one warning naming file:line; the epoch record without loss and
    # runs/finetune without a log are ignored quietly
    warn = [l for l in r.stderr.splitlines() if 'warning' in l]
    assert warn == [l for l in warn if os.path.join('runs', 'barlow', 'log.jsonl:41') in l]
    assert len(warn) == 1
    csv_rows = list(csv.DictReader(open(tmp_path / 'out' / 'summary.csv')))
    c = next(c for c in csv_rows if c['budget'] == 'fraction=0.5' and c['init'] == 'barlow'
             and c['protocol'] == 'finetune' and c['metric'] == 'balanced_accuracy')
    assert float(c['per_class']) == pytest.approx(1277 / 8)
    assert float(c['labels_mean']) == pytest.approx(1277)


VAL = {  # (budget, init, protocol) -> balanced accuracy per seed, scored on the val part
    ('per_class=20', 'supervised', 'finetune'): [0.90, 0.92, 0.91],
    ('per_class=20', 'barlow', 'finetune'): [0.95, 0.93],
    ('all', 'barlow', 'finetune'): [0.99, 0.97, 0.98],
}


def test_label_efficiency_keeps_val_and_test_apart(tmp_path):
    write_budgets(tmp_path / 'results.jsonl')  # EFF, scored on the test part
    rows = []
    for (budget, init, protocol), xs in VAL.items():
        for s, x in enumerate(xs):  # the same seeds and budgets as test rows: must not merge
            r = row(init, protocol, s, x, labels={'all': 2554}.get(budget, 160))
            r['labels_rule'], r['eval_part'] = budget, 'val'
            r['metrics']['per_class_recall'] = [x] * 7 + [None]
            rows.append(r)
    with open(tmp_path / 'results.jsonl', 'a') as f:
        f.write(''.join(json.dumps(r) + '\n' for r in rows))
    r = run_report('--results', 'results.jsonl', '--out', 'out', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / 'out' / 'summary.md').read_text()
    _, got = table_rows(md, '## skin / split paper (val part) / per_class=20 (160 labels)')
    assert got['barlow']['ft bal. acc [95% CI]'] == ci_cell(VAL[('per_class=20', 'barlow',
                                                                 'finetune')])
    eff = md.split('## Label efficiency', 1)[1]
    assert 'val balanced accuracy' in eff.split('###')[0]  # the intro says what was scored
    # the test curve: EFF alone, its three budgets
    head, got = table_rows(eff, '### skin / split paper: fine-tuning')
    assert head[1:] == ['per_class=5 (5/class)', 'per_class=20 (20/class)',
                        f'fraction=0.5 ({1277 / 8:.3g}/class)']
    for init in ('supervised', 'barlow'):
        assert got[init]['per_class=20 (20/class)'] == \
            ci_cell(EFF[('per_class=20', init, 'finetune')]) + ' (4)'
    # the val curve: VAL alone, its two budgets, no probe (none ran on val)
    head, got = table_rows(eff, '### skin / split paper (val part): fine-tuning')
    assert head == ['init', 'per_class=20 (20/class)', f'all ({2554 / 8:.3g}/class)']
    assert got['supervised'] == {head[1]: ci_cell(VAL[('per_class=20', 'supervised',
                                                      'finetune')]) + ' (3)', head[2]: '-'}
    assert got['barlow'][head[2]] == ci_cell(VAL[('all', 'barlow', 'finetune')]) + ' (3)'
    assert '### skin / split paper (val part): linear probe' not in eff
    # what curve.png draws: the same two curves, apart
    args = report.get_args(['--results', str(tmp_path / 'results.jsonl')])
    rows, _ = report.read_results(args.results, args.metrics + [args.p_metric])
    curve = report.curves(report.summarise(rows, args), args.p_metric)
    assert sorted(curve) == [('skin', 'paper'), ('skin', 'paper (val part)')]
    assert [b for b, _ in curve[('skin', 'paper (val part)')][0]] == ['per_class=20', 'all']
    assert [b for b, _ in curve[('skin', 'paper')][0]] == ['per_class=5', 'per_class=20',
                                                           'fraction=0.5']
    val = curve[('skin', 'paper (val part)')][1]['finetune']
    assert [s['n'] if s else 0 for s in val['barlow']] == [2, 3]
    assert 'curve.png' in pngs(tmp_path / 'out')


# --------------------------------------------------------------------------- unlabelled data
ABL = {  # (init, protocol) -> (pool_images of its rows, balanced accuracy per seed)
    ('supervised', 'finetune'): (None, [0.60, 0.62, 0.61, 0.63]),
    ('barlow', 'finetune'): (50000, [0.63, 0.64, 0.62, 0.65]),  # its source pool: x = 0
    ('barlow', 'probe'): (50000, [0.55, 0.53, 0.56]),
    ('barlow+skinBT@0.1', 'finetune'): (120, [0.64, 0.66, 0.65, 0.63]),
    ('barlow+skinBT@0.1', 'probe'): (120, [0.57, 0.58, 0.56]),
    ('barlow+skinBT@0.3', 'finetune'): (360, [0.66, 0.67, 0.68, 0.66]),
    ('barlow+skinBT@0.3', 'probe'): (360, [0.60]),
    ('barlow+skinBT@1.0', 'finetune'): (1200, [0.69, 0.70, 0.68, 0.67]),
    ('barlow+skinBT', 'finetune'): (1200, [0.68, 0.69, 0.70]),
    ('barlow+skinBT@0.5', 'finetune'): (None, [0.50, 0.51]),  # no pool recorded: left off
    ('supervised+skinBT', 'finetune'): (1200, [0.66, 0.64]),  # one pool size: no section
    ('supervised+skinBT@1.0', 'finetune'): (1200, [0.65, 0.66]),
}


def abl_rows(fixture, **extra):
    rows = []
    for (init, protocol), (pool, xs) in fixture.items():
        for s, x in enumerate(xs):
            r = row(init, protocol, s, x, labels=160)
            r.update(labels_rule='per_class=20', **extra)
            if pool is not None:
                r['pool_images'] = pool
            rows.append(r)
    return rows


def test_report_unlabelled_data_section(tmp_path):
    rows = abl_rows(ABL)
    # scored on the val part: a table of its own, its section apart (two pool sizes there)
    val = {k: (pool, [x + 0.2 for x in xs]) for k, (pool, xs) in ABL.items()
           if k[0] in ('barlow', 'barlow+skinBT@0.1', 'barlow+skinBT@0.3')}
    rows += abl_rows(val, eval_part='val')
    (tmp_path / 'results.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    r = run_report('--results', 'results.jsonl', '--out', 'out', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / 'out' / 'summary.md').read_text()
    _, table = table_rows(md, '## skin / split paper / per_class=20 (160 labels)')
    assert list(table) == ['supervised', 'barlow', 'supervised+skinBT', 'supervised+skinBT@1.0',
                           'barlow+skinBT', 'barlow+skinBT@0.1', 'barlow+skinBT@0.3',
                           'barlow+skinBT@0.5', 'barlow+skinBT@1.0']
    sec = md.split('## Unlabelled data for further pretraining', 1)[1]
    want = lambda init, pr: (f'{ci_cell(ABL[(init, pr)][1])} ({len(ABL[(init, pr)][1])})'
                             if len(ABL[(init, pr)][1]) > 1 else
                             f'{ABL[(init, pr)][1][0]:.3f} (1)')
    head, got = table_rows(sec, '### skin / split paper / per_class=20 (160 labels): '
                                'barlow+skinBT, fine-tuning')
    assert head == ['init', 'unlabelled images', 'bal. acc [95% CI] (n)']
    # by pool size; barlow, where the further pretraining started, at 0 further images
    assert list(got) == ['barlow', 'barlow+skinBT@0.1', 'barlow+skinBT@0.3', 'barlow+skinBT',
                         'barlow+skinBT@1.0']
    assert [got[i]['unlabelled images'] for i in got] == ['0', '120', '360', '1200', '1200']
    for init in got:
        assert got[init]['bal. acc [95% CI] (n)'] == want(init, 'finetune'), init
    _, got = table_rows(sec, '### skin / split paper / per_class=20 (160 labels): '
                             'barlow+skinBT, linear probe')
    assert {i: c['unlabelled images'] for i, c in got.items()} == \
        {'barlow': '0', 'barlow+skinBT@0.1': '120', 'barlow+skinBT@0.3': '360'}
    for init in got:
        assert got[init]['bal. acc [95% CI] (n)'] == want(init, 'probe'), init
    assert 'supervised+skinBT' not in sec  # @1.0 and the plain one: the same pool
    # the val part: its own numbers only
    _, got = table_rows(sec, '### skin / split paper (val part) / per_class=20 (160 labels): '
                             'barlow+skinBT, fine-tuning')
    assert {i: c['bal. acc [95% CI] (n)'] for i, c in got.items()} == {
        i: f'{ci_cell([x + 0.2 for x in ABL[(i, "finetune")][1]])} (4)'
        for i in ('barlow', 'barlow+skinBT@0.1', 'barlow+skinBT@0.3')}
    warn = [l for l in r.stderr.splitlines() if 'warning' in l]
    assert len(warn) == 1 and 'barlow+skinBT@0.5 has no pool_images' in warn[0]
    assert pngs(tmp_path / 'out') == ['ablation.png', 'summary.png']
    got = {(c['init'], c['protocol'], c['metric']): c
           for c in csv.DictReader(open(tmp_path / 'out' / 'summary.csv'))
           if c['split'] == 'paper'}
    assert got[('barlow+skinBT@0.3', 'probe', 'accuracy')]['pool_images'] == '360'
    assert got[('supervised', 'finetune', 'accuracy')]['pool_images'] == ''


def test_a_resumed_runs_log_replaces_the_steps_it_ran_again(tmp_path):
    """A run killed at step 20 with its checkpoint at 10 logs 12.. again when resumed; a run
    started over logs from 0. Before, pretrain.png drew both passes joined by a zig-zag."""
    run = tmp_path / 'bt'
    run.mkdir()
    steps = [0, 5, 10, 15, 20] + [15, 20, 25] + [0, 5]  # killed twice: resumed, started over
    (run / 'log.jsonl').write_text(''.join(json.dumps({'step': s, 'loss': k}) + '\n'
                                           for k, s in enumerate(steps)))
    recs = report.read_logs(str(tmp_path))['bt']
    assert [(r['step'], r['loss']) for r in recs] == [(0, 8), (5, 9)]
    (run / 'log.jsonl').write_text(''.join(json.dumps({'step': s, 'loss': k}) + '\n'
                                           for k, s in enumerate(steps[:8])))
    recs = report.read_logs(str(tmp_path))['bt']
    assert [(r['step'], r['loss']) for r in recs] == [(0, 0), (5, 1), (10, 2), (15, 5), (20, 6),
                                                       (25, 7)]
    # killed after logging step 20 and its kNN, before the checkpoint there: the rerun logs
    # both again; a kNN record beside the loss record of its step is no restart
    recs = [{'step': 10, 'loss': 1}, {'step': 20, 'loss': 2}, {'step': 20, 'knn': 0.5},
            {'step': 20, 'loss': 3}, {'step': 20, 'knn': 0.6}, {'step': 30, 'loss': 4}]
    (run / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    assert report.read_logs(str(tmp_path))['bt'] == [recs[0]] + recs[3:]


def test_pools_one_size_per_init(capsys):
    cells = {('a', 'finetune'): [{'pool_images': 10}, {'pool_images': 10}],
             ('a', 'probe'): [{'pool_images': 20}, {'pool_images': None}], ('b', 'probe'): [{}]}
    assert report.pools(('skin', 'paper', 'all'), cells) == {'a': 10, 'b': None}
    err = capsys.readouterr().err
    assert 'skin/paper/all: init a mixes pool sizes (10, 20 images)' in err


def test_report_no_unlabelled_data_section_without_pool_sizes(tmp_path):
    # the shares in different tables, or one pool size per base: no section, no ablation.png
    rows = abl_rows({k: v for k, v in ABL.items() if k[0] in ('supervised', 'barlow',
                                                              'barlow+skinBT@0.1')})
    rows += [dict(r, labels_rule='all', labels=2554)
             for r in abl_rows({k: v for k, v in ABL.items() if k[0] in
                                ('supervised', 'barlow+skinBT@0.3', 'supervised+skinBT',
                                 'supervised+skinBT@1.0')})]
    (tmp_path / 'results.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    r = run_report('--results', 'results.jsonl', '--out', 'out', cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == '', r.stderr
    assert 'Unlabelled data' not in (tmp_path / 'out' / 'summary.md').read_text()
    assert 'ablation.png' not in pngs(tmp_path / 'out')


def test_report_files_depend_on_budgets_and_logs(tmp_path):
    rows = [row(i, 'finetune', s, 0.6 + 0.01 * s) for i in ('supervised', 'barlow')
            for s in range(3)]
    (tmp_path / 'results.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    (tmp_path / 'runs' / 'finetune').mkdir(parents=True)  # a folder without log.jsonl
    write_budgets(tmp_path / 'curve.jsonl')  # first a report with a curve and logs...
    write_logs(tmp_path / 'logs')
    r = run_report('--results', 'curve.jsonl', '--out', 'out', '--runs', 'logs', cwd=tmp_path)
    assert r.returncode == 0 and {'curve.png', 'pretrain.png'} <= set(pngs(tmp_path / 'out'))
    for runs in ('runs', 'no-such-dir'):  # ...whose pictures do not outlive it
        r = run_report('--results', 'results.jsonl', '--out', 'out', '--runs', runs,
                       cwd=tmp_path)
        assert r.returncode == 0 and r.stderr == '', r.stderr
        assert pngs(tmp_path / 'out') == ['summary.png']  # one budget, no logs
        assert 'Label efficiency' not in (tmp_path / 'out' / 'summary.md').read_text()


def test_report_without_matplotlib(tmp_path):
    write_budgets(tmp_path / 'results.jsonl')
    write_logs(tmp_path / 'runs')
    block = ('import runpy, sys; sys.modules["matplotlib"] = None; '  # import -> ImportError
             f'sys.argv = ["report.py", "--out", "out", "--results", "results.jsonl"]; '
             f'runpy.run_path({str(ROOT / "report.py")!r}, run_name="__main__")')
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'curve.png').write_bytes(b'an earlier report\'s')
    r = subprocess.run([sys.executable, '-c', block], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / 'out')) == ['summary.csv', 'summary.md']
    said = [l for l in r.stdout.splitlines() if 'matplotlib' in l]
    assert len(said) == 1 and 'make install' in said[0] and 'pip install matplotlib' in said[0]
    assert '## Label efficiency' in (tmp_path / 'out' / 'summary.md').read_text()


def test_report_bad_input(tmp_path):
    rows = write_results(tmp_path / 'results.jsonl')
    lines = [json.dumps(r) for r in rows[:4]]
    lines[2] = lines[2][5:]  # line 3 is no JSON (a truncated one is a torn write: warned)
    (tmp_path / 'bad.jsonl').write_text('\n'.join(lines) + '\n')
    (tmp_path / 'empty.jsonl').write_text('\n')
    (tmp_path / 'nokey.jsonl').write_text('{"init": "x", "seed": 0, "metrics": {}}\n')
    (tmp_path / 'pool.jsonl').write_text(json.dumps(dict(rows[0], pool_images='many')) + '\n')
    for name, expect in [('bad.jsonl', 'bad.jsonl:3:'), ('empty.jsonl', 'empty'),
                         ('missing.jsonl', 'does not exist'), ('nokey.jsonl', 'protocol'),
                         ('pool.jsonl', "pool.jsonl:1: pool_images is 'many'")]:
        r = run_report('--results', name, '--out', 'out', cwd=tmp_path)
        assert r.returncode == 2, name
        assert len(r.stderr.strip().splitlines()) == 1 and expect in r.stderr, r.stderr
        assert 'Traceback' not in r.stderr
    r = run_report('--results', 'results.jsonl', '--out', 'out', '--metric', 'acc', cwd=tmp_path)
    assert r.returncode == 2 and 'metric acc' in r.stderr and 'Traceback' not in r.stderr
    assert not (tmp_path / 'out').exists()  # nothing written on error
