"""report.py: the t distribution, Welch and permutation tests against closed forms and hand
cases, then the script end to end as a subprocess on a results file written here."""
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
    return subprocess.run([sys.executable, str(ROOT / 'report.py'), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def table_rows(md, heading):
    """{init: [cells]} of the Markdown table under the heading line."""
    block = md.split(heading, 1)[1].split('\n\n')[1]
    lines = [l for l in block.splitlines() if l.startswith('| ')]
    cells = [[c.strip() for c in l.strip('|').split('|')] for l in lines]
    return cells[0], {c[0]: c[1:] for c in cells[1:]}


def cell(xs):
    return f'{statistics.mean(xs):.3f} +- {statistics.stdev(xs):.3f}'


def exact_p(a, b):  # a second, plain-Python enumeration of the one-sided permutation test
    pool, k = a + b, len(a)
    sums = [sum(pool[i] for i in c) for c in itertools.combinations(range(len(pool)), k)]
    return sum(s >= sum(a) - 1e-9 for s in sums) / len(sums)


def test_report_end_to_end(tmp_path):
    write_results(tmp_path / 'results.jsonl')
    r = run_report('--results', 'results.jsonl', '--out', 'out', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / 'out' / 'summary.md').read_text()
    assert md.strip() in r.stdout
    assert '29 lines, 28 runs' in md and '(1 replaced)' in md  # barlow seed 0 was rerun
    head, rows = table_rows(md, '## skin / split paper / 2554 labels')
    assert head == ['init', 'ft n', 'ft acc', 'ft bal. acc', 'ft macro-F1', 'ft AUROC', 'ft p',
                    'probe n', 'probe acc', 'probe bal. acc', 'probe macro-F1', 'probe AUROC',
                    'probe p']
    # known inits in the fixed order, unknown ones after
    assert list(rows) == ['random', 'supervised', 'barlow', 'barlow+skinBT', 'zzz-custom']
    for (init, protocol), xs in BAL.items():
        c = rows[init][:6] if protocol == 'finetune' else rows[init][6:]
        assert c[0] == str(len(xs)), (init, protocol)
        if len(xs) > 1:
            assert c[2] == cell(xs)                              # balanced accuracy
            assert c[1] == cell([x + 0.05 for x in xs])          # accuracy
            assert c[3] == cell([x - 0.1 for x in xs])           # macro-F1
    assert rows['supervised'][2] == '0.620 +- 0.016'  # sqrt((1+1+4+4+0)e-4 / 4) = 0.0158
    assert rows['random'][:3] == ['1', '0.360 +- -', '0.310 +- -']  # n = 1: no std
    assert rows['random'][5] == 'n<2' and rows['supervised'][5] == 'base'
    assert rows['supervised'][11] == 'base'
    assert rows['random'][6:] == ['-', '', '', '', '', '']  # no probe run
    # barlow beats every supervised run: 1 of C(10,5) = 252 relabellings -> 0.004
    assert rows['barlow'][5] == '0.004'
    for init, protocol, col in [('barlow+skinBT', 'finetune', 5), ('zzz-custom', 'finetune', 5),
                                ('barlow', 'probe', 11)]:
        p = exact_p(BAL[(init, protocol)], BAL[('supervised', protocol)])
        assert rows[init][col] == f'{p:.3f}', init
    assert rows['barlow'][10] == '0.900 +- 0.000 (n=4)'  # one null AUROC
    assert 'permutation' in md and 'not corrected for multiple comparisons' in md.lower()
    # a second table for the other label count
    _, rows2 = table_rows(md, '## skin / split paper / 1277 labels')
    assert list(rows2) == ['supervised'] and rows2['supervised'][0] == '2'
    # CSV: one line per init x protocol x metric (4 metrics) in both tables, plus the header
    csv_lines = (tmp_path / 'out' / 'summary.csv').read_text().splitlines()
    assert len(csv_lines) == 1 + 4 * (len(BAL) + 1)
    assert 'skin,paper,2554,barlow,finetune,balanced_accuracy,0.67,' in '\n'.join(csv_lines)
    made = sorted(os.listdir(tmp_path / 'out'))
    try:
        import matplotlib  # noqa: F401
        assert made == ['summary.csv', 'summary.md', 'summary.png']
    except ImportError:
        assert made == ['summary.csv', 'summary.md'] and 'matplotlib' in r.stdout


def test_report_welch_option(tmp_path):
    write_results(tmp_path / 'results.jsonl')
    r = run_report('--results', 'results.jsonl', '--out', 'out', '--test', 'welch',
                   '--p-metric', 'accuracy', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    _, rows = table_rows(r.stdout, '## skin / split paper / 2554 labels')
    a = [x + 0.05 for x in BAL[('barlow', 'probe')]]
    b = [x + 0.05 for x in BAL[('supervised', 'probe')]]
    assert rows['barlow'][11] == f'{report.welch_p(a, b):.3f}'
    assert 'Welch' in r.stdout


def test_report_bad_input(tmp_path):
    rows = write_results(tmp_path / 'results.jsonl')
    lines = [json.dumps(r) for r in rows[:4]]
    lines[2] = lines[2][:-5]  # truncated JSON on line 3
    (tmp_path / 'bad.jsonl').write_text('\n'.join(lines) + '\n')
    (tmp_path / 'empty.jsonl').write_text('\n')
    (tmp_path / 'nokey.jsonl').write_text('{"init": "x", "seed": 0, "metrics": {}}\n')
    for name, expect in [('bad.jsonl', 'bad.jsonl:3:'), ('empty.jsonl', 'empty'),
                         ('missing.jsonl', 'does not exist'), ('nokey.jsonl', 'protocol')]:
        r = run_report('--results', name, '--out', 'out', cwd=tmp_path)
        assert r.returncode == 2, name
        assert len(r.stderr.strip().splitlines()) == 1 and expect in r.stderr, r.stderr
        assert 'Traceback' not in r.stderr
    r = run_report('--results', 'results.jsonl', '--out', 'out', '--metric', 'acc', cwd=tmp_path)
    assert r.returncode == 2 and 'metric acc' in r.stderr and 'Traceback' not in r.stderr
    assert not (tmp_path / 'out').exists()  # nothing written on error
