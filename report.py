"""Results table: per init and protocol, mean +- std over seeds, n, and a p-value against a
baseline init, in the shape of the paper's table.

    python report.py                                  # results/results.jsonl -> results/summary.*
    python report.py --baseline barlow --test welch   # the paper's test, another baseline
    python report.py --results runs/big/results.jsonl --out runs/big --p-metric accuracy
    make all                                          # runs it as the last step of the chain

Reads the JSON lines that finetune.py and probe.py append (one per init, protocol, dataset,
split, label count and seed; a later line with the same key is a rerun and replaces the earlier
one) and writes results/summary.md (also printed), results/summary.csv and, when matplotlib is
installed, results/summary.png. One table per (dataset, split, labels). Needs only numpy, no
torch and no GPU: run it wherever the results file is.

Why a permutation test by default: with 5 seeds per init nothing tells whether the runs are
normal, and the permutation test of the difference of means assumes only that the runs are
exchangeable under H0. With 5 vs 5 runs it is exact (252 relabellings) and its smallest p is
1/252 = 0.004, so p < 0.01 stays reachable. --test welch gives the paper's one-tailed Welch
t-test, the right call with many runs (they used 35).
"""
import argparse
import csv
import io
import itertools
import json
import math
import os
import sys

import numpy as np

INIT_ORDER = ['random', 'supervised', 'barlow', 'supervised+skinBT', 'barlow+skinBT', 'skinBT']
PROTOCOL_ORDER = ['finetune', 'probe']
PROTOCOL_SHORT = {'finetune': 'ft', 'probe': 'probe'}
METRIC_SHORT = {'accuracy': 'acc', 'balanced_accuracy': 'bal. acc', 'macro_f1': 'macro-F1',
                'weighted_f1': 'weighted-F1', 'auroc': 'AUROC', 'knn_accuracy': 'kNN acc'}
EXACT_MAX = 20000  # enumerate every relabelling up to this many, else sample this many


class UserError(Exception):
    """Bad input: printed as one line on stderr, exit status 2 (as common.UserError; this
    script stays free of torch so it runs wherever the results file is)."""


# --------------------------------------------------------------------------- CLI
def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    # input / output
    ap.add_argument('--results', default='results/results.jsonl', metavar='PATH',
                    help='JSON lines written by finetune.py / probe.py')
    ap.add_argument('--out', default='results', metavar='DIR',
                    help='folder for summary.md, .csv and .png')
    # what to compare
    ap.add_argument('--baseline', default='supervised', metavar='INIT',
                    help='init that every other init is tested against (the paper: ImageNet '
                         'supervised)')
    ap.add_argument('--metric', default='accuracy,balanced_accuracy,macro_f1,auroc',
                    metavar='LIST',
                    help='comma-separated metrics to tabulate (keys of "metrics" in a row, or '
                         'a top-level key such as knn_accuracy)')
    ap.add_argument('--p-metric', default='balanced_accuracy', metavar='NAME',
                    help='metric of the p column; balanced accuracy because the test set is '
                         'imbalanced (ISIC 2019 ranks by it)')
    ap.add_argument('--test', default='permutation', choices=['permutation', 'welch'],
                    help='one-sided test of H1: init > baseline. permutation: no normality '
                         'assumption, best for a few seeds; welch: the paper\'s t-test')
    ap.add_argument('--permutations', type=int, default=EXACT_MAX, metavar='N',
                    help='random relabellings when exact enumeration would exceed '
                         f'{EXACT_MAX} (fixed seed 0, so the report is reproducible)')
    args = ap.parse_args(argv)
    args.metrics = [m.strip() for m in args.metric.split(',') if m.strip()]
    if not args.metrics:
        ap.error('--metric: give at least one metric name')
    if args.permutations < 1:
        ap.error('--permutations: must be >= 1')
    return args


# --------------------------------------------------------------------------- reading rows
def read_results(path, metrics):
    """Rows keyed by (dataset, split, labels, init, protocol, seed); later lines replace
    earlier ones. Returns (rows, number of lines read)."""
    if not os.path.isfile(path):
        raise UserError(f'{path} does not exist; run finetune.py or probe.py first, or pass '
                        f'--results')
    rows, n_lines = {}, 0
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            n_lines += 1
            where = f'{path}:{lineno}'
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f'{where}: not valid JSON ({e.msg}, column {e.colno}); '
                                f'fix or delete that line')
            if not isinstance(row, dict):
                raise UserError(f'{where}: expected a JSON object, got {type(row).__name__}')
            missing = [k for k in ('init', 'protocol', 'seed', 'metrics') if k not in row]
            if missing:
                raise UserError(f'{where}: missing key(s) {", ".join(missing)}')
            if not isinstance(row['metrics'], dict):
                raise UserError(f'{where}: "metrics" must be an object')
            for m in metrics:
                v = value(row, m)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                      or not math.isfinite(v)):
                    raise UserError(f'{where}: {m} is {v!r}, expected a finite number or null')
            key = tuple(str(row.get(k, '-')) for k in ('dataset', 'split', 'labels'))
            row['_group'] = key
            rows[key + (str(row['init']), str(row['protocol']), str(row['seed']))] = row
    if not rows:
        raise UserError(f'{path} is empty: no result rows; run finetune.py or probe.py first')
    return list(rows.values()), n_lines


def value(row, metric):
    """A metric of a row: from its "metrics" object, else a top-level key (knn_accuracy)."""
    return row['metrics'][metric] if metric in row['metrics'] else row.get(metric)


def ranked(name, order):
    """Sort key: the names in `order` first, in that order, then the others alphabetically."""
    return (0, order.index(name), '') if name in order else (1, 0, name)


def group_key(group):  # (dataset, split, labels), label counts sorted as numbers
    dataset, split, labels = group
    try:
        return (dataset, split, 0, float(labels), '')
    except ValueError:
        return (dataset, split, 1, 0.0, labels)


# --------------------------------------------------------------------------- statistics
def mean_std(xs):
    """(mean, sample std with ddof=1 or None when n < 2, n)."""
    n = len(xs)
    if n == 0:
        return None, None, 0
    mean = math.fsum(xs) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return mean, std, n


def _betacf(a, b, x, tiny=1e-300):
    """Continued fraction of the incomplete beta function (Numerical Recipes betacf, Lentz)."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),             # even step
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd step
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betai(a, b, x):
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):  # the continued fraction converges fast here
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t, df):
    """P(T > t) for Student's t with df (real, > 0) degrees of freedom:
    P(|T| > |t|) = I_{df/(df+t^2)}(df/2, 1/2)."""
    tail = 0.5 * betai(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


def t_cdf(t, df):
    return 1.0 - t_sf(t, df)


def welch_p(a, b):
    """One-sided Welch t-test, H1: mean(a) > mean(b). t = (ma - mb) / sqrt(va/na + vb/nb),
    Welch-Satterthwaite df = (va/na + vb/nb)^2 / ((va/na)^2/(na-1) + (vb/nb)^2/(nb-1)),
    p = P(T_df > t). Both samples constant: p = 0 if ma > mb, else 1."""
    (ma, sa, na), (mb, sb, nb) = mean_std(a), mean_std(b)
    ea, eb = sa * sa / na, sb * sb / nb
    if ea + eb == 0.0:
        return 0.0 if ma > mb else 1.0
    t = (ma - mb) / math.sqrt(ea + eb)
    df = (ea + eb) ** 2 / (ea * ea / (na - 1) + eb * eb / (nb - 1))
    return t_sf(t, df)


def permutation_p(a, b, iters=EXACT_MAX, seed=0):
    """One-sided permutation test of the difference of means, H1: mean(a) > mean(b).
    The statistic is sum(a) (same order as mean(a) - mean(b) with the pool fixed). Exact over
    all C(na+nb, na) relabellings when that is <= EXACT_MAX: p = #{stat >= observed} / count;
    else `iters` random relabellings (seeded): p = (#{stat >= observed} + 1) / (iters + 1)."""
    x = np.asarray(list(a) + list(b), dtype=np.float64)
    n, k = len(x), len(a)
    observed = x[:k].sum()
    tol = 1e-9 * max(1.0, abs(observed))  # equal sums in another order are still ties
    if math.comb(n, k) <= EXACT_MAX:
        idx = np.array(list(itertools.combinations(range(n), k)), dtype=np.int64)
        return float((x[idx].sum(1) >= observed - tol).mean())
    rng, count, done = np.random.default_rng(seed), 0, 0
    while done < iters:  # chunks of relabellings: (chunk, n) random keys, argsort = shuffles
        chunk = min(5000, iters - done)
        idx = np.argsort(rng.random((chunk, n)), axis=1)[:, :k]
        count += int((x[idx].sum(1) >= observed - tol).sum())
        done += chunk
    return (count + 1) / (iters + 1)


def p_value(a, b, test, iters):
    if len(a) < 2 or len(b) < 2:
        return None
    return welch_p(a, b) if test == 'welch' else permutation_p(a, b, iters)


# --------------------------------------------------------------------------- summarise
def summarise(rows, args):
    """{group: {(init, protocol): {'_runs': rows, metric: (mean, std, n, p, note)}}}"""
    metrics = args.metrics + [m for m in [args.p_metric] if m not in args.metrics]
    groups = {}
    for r in rows:
        groups.setdefault(r['_group'], {}).setdefault((str(r['init']), str(r['protocol'])),
                                                      []).append(r)
    out = {}
    for g, cells in groups.items():
        stats = {}
        for (init, protocol), rs in cells.items():
            stats[(init, protocol)] = {'_runs': len(rs)}
            base = cells.get((args.baseline, protocol), [])
            for m in metrics:
                xs = [value(r, m) for r in rs if value(r, m) is not None]
                ys = [value(r, m) for r in base if value(r, m) is not None]
                p = note = None
                if init == args.baseline:
                    note = 'base'
                elif not base:
                    note = 'no base'
                else:
                    p = p_value(xs, ys, args.test, args.permutations)
                    note = 'n<2' if p is None else None
                stats[(init, protocol)][m] = mean_std(xs) + (p, note)
            shas = {str(r['backbone_sha']) for r in rs if r.get('backbone_sha')}
            if len(shas) > 1:
                print(f'warning: {"/".join(g)}: init {init} ({protocol}) mixes {len(shas)} '
                      f'backbones ({", ".join(sorted(s[:8] for s in shas))})', file=sys.stderr)
        out[g] = stats
    return out


def layout(stats):
    """The inits (rows) and protocols (column blocks) of one table, in display order."""
    return (sorted({i for i, _ in stats}, key=lambda i: ranked(i, INIT_ORDER)),
            sorted({p for _, p in stats}, key=lambda p: ranked(p, PROTOCOL_ORDER)))


def fmt_cell(mean, std, n, runs):
    if n == 0:
        return 'n/a'
    s = f'{mean:.3f} +- ' + ('-' if std is None else f'{std:.3f}')
    return s if n == runs else f'{s} (n={n})'


def fmt_p(p, note):
    if p is None:
        return note or '-'
    return f'{p:.3f}' if p >= 0.001 else f'{p:.1e}'


def markdown(summary, args, source):
    test = ('Welch\'s unequal-variance t-test (Welch-Satterthwaite df)' if args.test == 'welch'
            else f'permutation test of the difference of means (exact over all relabellings '
                 f'when C(n1+n2, n1) <= {EXACT_MAX}, else {args.permutations} random ones, '
                 f'seed 0, p = (count+1)/(iters+1); no normality assumption)')
    lines = ['# Results', '', source, '']
    for g in sorted(summary, key=group_key):
        stats = summary[g]
        inits, protocols = layout(stats)
        head = ['init']
        for pr in protocols:
            short = PROTOCOL_SHORT.get(pr, pr)
            head += [f'{short} n'] + [f'{short} {METRIC_SHORT.get(m, m)}' for m in args.metrics]
            head += [f'{short} p']
        dataset, split, labels = g
        lines += [f'## {dataset} / split {split} / {labels} labels', '',
                  '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
        partial = False
        for init in inits:
            cells = [init]
            for pr in protocols:
                s = stats.get((init, pr))
                if s is None:
                    cells += ['-'] + [''] * (len(args.metrics) + 1)
                    continue
                cells.append(str(s['_runs']))
                for m in args.metrics:
                    mean, std, n, _, _ = s[m]
                    partial |= 0 < n < s['_runs']
                    cells.append(fmt_cell(mean, std, n, s['_runs']))
                cells.append(fmt_p(*s[args.p_metric][3:]))
            lines.append('| ' + ' | '.join(cells) + ' |')
        n_tests = sum(s[args.p_metric][3] is not None for s in stats.values())
        lines += ['', f'n = runs (seeds); metric cells = mean +- sample std (ddof=1) over those '
                  f'runs on the test set (std "-" when n = 1). ft = fine-tuning the whole '
                  f'network, probe = linear probe on frozen features; acc = accuracy, bal. acc '
                  f'= balanced accuracy (mean recall over the classes in the test labels), '
                  f'AUROC = macro one-vs-rest.'
                  + (' "(n=k)": the metric was null (undefined) in some runs.' if partial
                     else ''),
                  f'p = one-sided p-value of H1: mean {args.p_metric.replace("_", " ")} of the '
                  f'init > that of `{args.baseline}` in the same protocol; {test}. Not corrected '
                  f'for multiple comparisons ({n_tests} tests in this table). base = the '
                  f'baseline, n<2 = too few runs to test, no base = baseline not run.', '']
    return '\n'.join(lines)


def csv_text(summary, args):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator='\n')
    w.writerow(['dataset', 'split', 'labels', 'init', 'protocol', 'metric', 'mean', 'std', 'n',
                'p', 'note', 'test', 'baseline'])
    num = lambda x: '' if x is None else f'{x:.10g}'
    for g in sorted(summary, key=group_key):
        stats = summary[g]
        for init, pr in sorted(stats, key=lambda k: (ranked(k[0], INIT_ORDER),
                                                    ranked(k[1], PROTOCOL_ORDER))):
            for m, v in stats[(init, pr)].items():
                if m != '_runs':
                    mean, std, n, p, note = v
                    w.writerow([*g, init, pr, m, num(mean), num(std), n, num(p), note or '',
                                args.test, args.baseline])
    return buf.getvalue()


def plot(summary, metric, path):
    """Bar chart of metric mean +- std per init, protocols side by side; one panel per group.
    Returns False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = sorted(summary, key=group_key)
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 3.5 * len(groups)), squeeze=False)
    for ax, g in zip(axes[:, 0], groups):
        stats = summary[g]
        inits, protocols = layout(stats)
        width = 0.8 / len(protocols)
        for j, pr in enumerate(protocols):
            ms = [stats.get((i, pr), {}).get(metric, (None, None)) for i in inits]
            xs = [k + (j - (len(protocols) - 1) / 2) * width for k in range(len(inits))]
            ax.bar(xs, [m[0] or 0.0 for m in ms], width, yerr=[m[1] or 0.0 for m in ms],
                   capsize=3, label=PROTOCOL_SHORT.get(pr, pr))
        ax.set_xticks(range(len(inits)))
        ax.set_xticklabels(inits, rotation=20, ha='right')
        ax.set_ylabel(f'{metric} (mean +- std)')
        ax.set_title(' / '.join(g))
        ax.legend()
    fig.tight_layout()
    tmp = f'{path}.{os.getpid()}.tmp'
    fig.savefig(tmp, format='png', dpi=120)
    os.replace(tmp, path)
    plt.close(fig)
    return True


def write_text(path, text):
    """Temporary name, then rename: an interrupted run never leaves half a table."""
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- main
def main(argv=None):
    args = get_args(argv)
    needed = args.metrics + [args.p_metric]
    rows, n_lines = read_results(args.results, needed)
    for m in needed:
        if not any(value(r, m) is not None for r in rows):
            have = sorted({k for r in rows for k in r['metrics']})
            raise UserError(f'metric {m}: no result row in {args.results} has a value for it '
                            f'(rows have: {", ".join(have)})')
    if not any(str(r['init']) == args.baseline for r in rows):
        print(f'warning: --baseline {args.baseline}: no row has that init; no p-values',
              file=sys.stderr)
    summary = summarise(rows, args)
    source = (f'From `{args.results}`: {n_lines} lines, {len(rows)} runs after reruns '
              f'replaced earlier lines ({n_lines - len(rows)} replaced).')
    md = markdown(summary, args, source)
    os.makedirs(args.out, exist_ok=True)
    write_text(os.path.join(args.out, 'summary.md'), md)
    write_text(os.path.join(args.out, 'summary.csv'), csv_text(summary, args))
    print(md)
    png = os.path.join(args.out, 'summary.png')
    if plot(summary, args.p_metric, png):
        print(f'wrote {args.out}/summary.md, summary.csv, summary.png')
    else:
        print(f'wrote {args.out}/summary.md, summary.csv (no summary.png: matplotlib is not '
              f'installed)')


if __name__ == '__main__':
    try:
        main()
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
