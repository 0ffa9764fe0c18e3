"""Results table: per init and protocol, mean +- std over seeds, n, 95% intervals and p-values
against a baseline init, in the shape of the paper's table; label-efficiency curves; the metric
against the unlabelled images of further pretraining; plots of the pretraining logs.

    python report.py                                  # results/results.jsonl -> results/summary.*
    python report.py --baseline barlow --test welch   # the paper's test, another baseline
    python report.py --results runs/big/results.jsonl --out runs/big --runs runs/big
    make all                                          # runs it as the last step of the chain

Reads the JSON lines that finetune.py and probe.py append (one per init, protocol, dataset,
split, label budget and seed; a later line with the same key is a rerun and replaces the
earlier one; two splits of one name, other test sets, are told apart by their split_sha and
never compared) and writes results/summary.md (also printed) and results/summary.csv (every
number). With matplotlib installed (`make install`, or pip install matplotlib) it also writes
results/summary.png (the --p-metric per init with 95% intervals), results/curve.png (that metric
against labelled images per class, when a dataset has 2+ label budgets) and results/pretrain.png
(loss, RankMe and online kNN curves from --runs DIR/*/log.jsonl). One table per (dataset,
split, label budget); the budget is the row's labels_rule (per_class=20, fraction=0.5, all), so
per-class draws that keep lesions whole (a few images more or less per seed) share a table.
Rows scored on the val part (finetune.py --eval-part val, to choose budgets) get tables, curves
and sections of their own: their split reads "paper (val part)".

How much unlabelled data: `make ablation` further pretrains the Barlow Twins init on shares of
the skin pool (inits barlow+skinBT@0.1, @0.3, @1.0: '<base>@<fraction>'), and each row records
the pool_images its init was pretrained on. When a table holds 2+ inits of one base with
different pool sizes, summary.md gains "Unlabelled data for further pretraining" (the metric by
pool size, the starting init barlow at 0 further images) and results/ablation.png draws it.
Needs only numpy, no torch and no GPU: run it wherever the results file is.

Why a paired test by default: seed s draws the same labelled images for every init, and which
images get drawn moves every init up or down together. The per-seed difference init - baseline
cancels that shared part, so --test auto tests those differences with an exact sign-flip
permutation test (under H0 each difference is as likely + as -; no normality assumption). Its
smallest p is 1/2^n: 1/16 with 4 seeds, 1/32 with 5, 1/128 with 7, so p < 0.01 needs 7+ paired
seeds. With fewer than 2 shared seeds it falls back to the unpaired permutation test of the
difference of means (--test permutation forces it; 5 vs 5 runs: 252 relabellings, smallest p
1/252). --test welch gives the paper's one-tailed Welch t-test, the right call with many runs
(they used 35). Several inits are tested against one baseline in each table, so beside the raw
p the table gives Holm's adjusted p (family-wise error over all the tests of that table, both
protocols). Every 95% interval is a t-interval over seeds (mean +- t_0.975,n-1 s / sqrt n; the
t quantile by bisection of the t cdf): for a mean, for the mean paired difference, and Welch's
interval for an unpaired difference of means.
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

# today's inits, then the comparison objectives (make all OBJECTIVES="barlow vicreg simclr");
# an ablation init '<base>@<fraction>' (make ablation) sorts right after its base (init_key)
INIT_ORDER = ['random', 'supervised', 'barlow', 'supervised+skinBT', 'barlow+skinBT', 'skinBT',
              'vicreg', 'vicreg+skin', 'simclr', 'simclr+skin']
PROTOCOL_ORDER = ['finetune', 'probe']
PROTOCOL_SHORT = {'finetune': 'ft', 'probe': 'probe'}
PROTOCOL_LONG = {'finetune': 'fine-tuning', 'probe': 'linear probe'}
METRIC_SHORT = {'accuracy': 'acc', 'balanced_accuracy': 'bal. acc', 'macro_f1': 'macro-F1',
                'weighted_f1': 'weighted-F1', 'auroc': 'AUROC', 'knn_accuracy': 'kNN acc'}
EXACT_MAX = 20000  # enumerate every relabelling / sign pattern up to this many, else sample
LEVEL = 0.95       # of every interval
VAL_PART = ' (val part)'  # split name of rows scored on the val part (finetune.py --eval-part)
LOSS_TERMS = {'loss': 'total', 'loss_inv': 'invariance', 'loss_red': 'redundancy'}
# Dark2 and black, those least like a tab10 colour first: tab10 is taken by INIT_ORDER
OTHER_COLORS = ['#1b9e77', '#e6ab02', '#e7298a', '#000000', '#a6761d', '#7570b3', '#66a61e',
                '#d95f02']
NO_PLOTS = ('no plots: matplotlib is not installed (`make install` installs it; or pip install '
            'matplotlib)')


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
                    help='folder for summary.md, .csv, .png, curve.png, ablation.png and '
                         'pretrain.png')
    ap.add_argument('--runs', default='runs', metavar='DIR',
                    help='pretraining run folders: DIR/*/log.jsonl -> pretrain.png (skipped '
                         'when there are none)')
    # what to compare
    ap.add_argument('--baseline', default='supervised', metavar='INIT',
                    help='init that every other init is tested against (the paper: ImageNet '
                         'supervised)')
    ap.add_argument('--metric', default='accuracy,balanced_accuracy,macro_f1,auroc',
                    metavar='LIST',
                    help='comma-separated metrics to tabulate (keys of "metrics" in a row, or '
                         'a top-level key such as knn_accuracy)')
    ap.add_argument('--p-metric', default='balanced_accuracy', metavar='NAME',
                    help='metric of the p, interval and curve columns; balanced accuracy because '
                         'the test set is imbalanced (ISIC 2019 ranks by it)')
    ap.add_argument('--test', default='auto', choices=['auto', 'permutation', 'welch'],
                    help='one-sided test of H1: init > baseline. auto: paired sign-flip test on '
                         'the seeds both ran (p < 0.01 needs 7+ of them), else permutation; '
                         'permutation: unpaired, no normality assumption; welch: the paper\'s '
                         't-test')
    ap.add_argument('--permutations', type=int, default=EXACT_MAX, metavar='N',
                    help='random relabellings / sign patterns when exact enumeration would '
                         f'exceed {EXACT_MAX} (fixed seed 0, so the report is reproducible)')
    args = ap.parse_args(argv)
    args.metrics = [m.strip() for m in args.metric.split(',') if m.strip()]
    if not args.metrics:
        ap.error('--metric: give at least one metric name')
    if args.permutations < 1:
        ap.error('--permutations: must be >= 1')
    return args


# --------------------------------------------------------------------------- reading rows
def read_results(path, metrics):
    """Rows keyed by (dataset, split, budget, init, protocol, seed); later lines replace
    earlier ones. Two splits of one name (their split_sha, the hash of the test ids, differs:
    another --per-class, another split file) are kept apart, their names followed by
    [split_sha], with a warning: no seed is compared with one scored on another test set.
    Returns (rows, number of lines read). As common.read_jsonl: a line cut
    short by a killed writer or a full disk (it starts like a JSON object but does not parse;
    anywhere, since the writers start a new line after one) is named and ignored, any other
    bad line is refused, naming it."""
    if os.path.isdir(path):
        raise UserError(f'--results {path} is a folder; pass the results file')
    if not os.path.isfile(path):
        raise UserError(f'{path} does not exist; run finetune.py or probe.py first, or pass '
                        f'--results')
    read, n_lines = [], 0
    with open(path, encoding='utf-8', errors='replace') as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            n_lines += 1
            where = f'{path}:{lineno}'
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if line.lstrip().startswith('{'):
                    print(f'warning: {where}: an incomplete line (a write cut short), ignored',
                          file=sys.stderr)
                    n_lines -= 1  # not a run a rerun replaced
                    continue
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
                if v is not None and not is_number(v):
                    raise UserError(f'{where}: {m} is {v!r}, expected a finite number or null')
            pool = row.get('pool_images')
            if pool is not None and not (is_number(pool) and pool >= 0):
                raise UserError(f'{where}: pool_images is {pool!r}, expected a number of images '
                                f'or null')
            read.append(row)
    shas = {}  # (dataset, split name): its split_sha values, in the order they came
    for row in read:
        name = (str(row.get('dataset', '-')), str(row.get('split', '-')))
        shas.setdefault(name, {}).setdefault(str(row.get('split_sha', '-'))[:8], None)
    for (dataset, split), seen in shas.items():
        if len(seen) > 1:
            print(f'warning: {dataset}/{split}: rows of {len(seen)} different splits of that '
                  f'name (split_sha {", ".join(seen)}: other test sets), kept apart as '
                  f'"{split} [split_sha]"', file=sys.stderr)
    rows = {}
    for row in read:
        dataset, split = str(row.get('dataset', '-')), str(row.get('split', '-'))
        if len(shas[(dataset, split)]) > 1:
            split += f' [{str(row.get("split_sha", "-"))[:8]}]'
        split += VAL_PART if row.get('eval_part', 'test') != 'test' else ''  # tables apart
        key = (dataset, split, budget_of(row))
        row['_group'] = key
        rows[key + (str(row['init']), str(row['protocol']), str(row['seed']))] = row
    if not rows:
        raise UserError(f'{path} is empty: no result rows; run finetune.py or probe.py first')
    return list(rows.values()), n_lines


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_count(budget):  # a budget given as a label count (rows without labels_rule)
    return budget.replace('.', '', 1).isdigit()


def budget_of(row):
    """The label budget of a row: its labels_rule when it has one, else its label count."""
    rule = row.get('labels_rule')
    return str(rule) if rule not in (None, '') else str(row.get('labels', '-'))


def value(row, metric):
    """A metric of a row: from its "metrics" object, else a top-level key (knn_accuracy)."""
    return row['metrics'][metric] if metric in row['metrics'] else row.get(metric)


def ranked(name, order):
    """Sort key: the names in `order` first, in that order, then the others alphabetically."""
    return (0, order.index(name), '') if name in order else (1, 0, name)


def init_key(name):
    """Sort key of an init: INIT_ORDER, then the others alphabetically, and an ablation init
    '<base>@<fraction>' right after its base, by fraction (barlow+skinBT@0.1 before @0.3)."""
    base, at, share = name.partition('@')
    if not at:
        return ranked(name, INIT_ORDER) + (0, 0.0, '')
    f = fraction_of(share)  # not a finite number ('@big'): after the numeric ones, by name
    return ranked(base, INIT_ORDER) + ((2, 0.0, share) if f is None else (1, f, share))


def fraction_of(share):
    """The share of '<base>@<share>' as a number; None when it is not a finite one."""
    try:
        f = float(share)
    except ValueError:
        return None
    return f if math.isfinite(f) else None


def part_of(split):
    """What a table's rows scored: 'val' under a '(val part)' split name, else 'test'."""
    return 'val' if split.endswith(VAL_PART) else 'test'


def per_class(budget, labels, classes):
    """x of the label-efficiency curve: K of 'per_class=K', else mean labels / classes."""
    if budget.startswith('per_class='):
        try:
            return float(budget.split('=', 1)[1])
        except ValueError:
            pass
    return labels / classes if labels is not None and classes else None


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
    P(|T| > |t|) = I_{df/(df+t^2)}(df/2, 1/2) = 1 - I_{t^2/(df+t^2)}(1/2, df/2)."""
    t2 = t * t
    if t2 > 1e-6 * df:  # the first form: no 1 - x, so tails far below 1e-16 keep their digits
        tail = 0.5 * betai(df / 2.0, 0.5, df / (df + t2))
    else:  # near 0 the second keeps t^2 (df/(df+t^2) rounds to 1 for |t| < 1e-8 sqrt(df))
        tail = 0.5 * (1.0 - betai(0.5, df / 2.0, t2 / (df + t2)))
    return tail if t > 0 else 1.0 - tail


def t_cdf(t, df):
    return 1.0 - t_sf(t, df)


def t_ppf(q, df):
    """The q quantile of Student's t: t_cdf (monotone) inverted by bisection, 0 < q < 1."""
    lo, hi = -1e8, 1e8  # holds 1e-8 < q < 1 - 1e-8 even for df = 1 (the Cauchy)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
        if hi - lo <= 1e-14 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


def t_interval(xs, level=LEVEL):
    """(lo, hi) = mean +- t_{(1+level)/2, n-1} s / sqrt(n) over the seeds; None when n < 2."""
    mean, std, n = mean_std(xs)
    if n < 2:
        return None
    h = t_ppf((1 + level) / 2, n - 1) * std / math.sqrt(n)
    return mean - h, mean + h


def welch_parts(a, b):
    """(mean(a) - mean(b), its standard error sqrt(va/na + vb/nb), Welch-Satterthwaite df
    (va/na + vb/nb)^2 / ((va/na)^2/(na-1) + (vb/nb)^2/(nb-1)), None when the se is 0)."""
    (ma, sa, na), (mb, sb, nb) = mean_std(a), mean_std(b)
    ea, eb = sa * sa / na, sb * sb / nb
    if ea + eb == 0.0:
        return ma - mb, 0.0, None
    return ma - mb, math.sqrt(ea + eb), (ea + eb) ** 2 / (ea * ea / (na - 1) + eb * eb / (nb - 1))


def welch_p(a, b):
    """One-sided Welch t-test, H1: mean(a) > mean(b): p = P(T_df > (ma - mb) / se).
    Both samples constant: p = 0 if ma > mb, else 1."""
    diff, se, df = welch_parts(a, b)
    return (0.0 if diff > 0 else 1.0) if se == 0.0 else t_sf(diff / se, df)


def _count_ge(stat, observed):
    """#{stat >= observed}; equal sums added in another order are still ties."""
    return int((stat >= observed - 1e-9 * max(1.0, abs(observed))).sum())


def _chunks(iters, size=5000):  # Monte Carlo draws in chunks: bounded memory
    return [size] * (iters // size) + ([iters % size] if iters % size else [])


def permutation_p(a, b, iters=EXACT_MAX, seed=0):
    """One-sided permutation test of the difference of means, H1: mean(a) > mean(b).
    The statistic is sum(a) (same order as mean(a) - mean(b) with the pool fixed). Exact over
    all C(na+nb, na) relabellings when that is <= EXACT_MAX: p = #{stat >= observed} / count;
    else `iters` random relabellings (seeded): p = (#{stat >= observed} + 1) / (iters + 1)."""
    x = np.asarray(list(a) + list(b), dtype=np.float64)
    n, k = len(x), len(a)
    observed = x[:k].sum()
    if math.comb(n, k) <= EXACT_MAX:
        idx = np.array(list(itertools.combinations(range(n), k)), dtype=np.int64)
        return _count_ge(x[idx].sum(1), observed) / len(idx)
    rng = np.random.default_rng(seed)  # (chunk, n) random keys, argsort = shuffles
    count = sum(_count_ge(x[np.argsort(rng.random((c, n)), axis=1)[:, :k]].sum(1), observed)
                for c in _chunks(iters))
    return (count + 1) / (iters + 1)


def sign_flip_p(d, iters=EXACT_MAX, seed=0):
    """One-sided paired test, H1: mean(d) > 0, d = per-seed differences init - baseline.
    Under H0 each difference is as likely -d_i as +d_i, so sum(d) is compared with sum(s * d)
    over sign patterns s: all 2^n when 2^n <= EXACT_MAX, p = #{>= observed} / 2^n; else `iters`
    random patterns (seeded), p = (count + 1) / (iters + 1). A zero difference flips to itself,
    so patterns that differ only there tie, and the >= counts them all (d = 0, 0: p = 1)."""
    d = np.asarray(d, dtype=np.float64)
    n, observed = len(d), d.sum()
    if 2 ** n <= EXACT_MAX:
        signs = 1.0 - 2.0 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)  # (2^n, n)
        return _count_ge(signs @ d, observed) / len(signs)
    rng = np.random.default_rng(seed)
    count = sum(_count_ge(rng.choice([-1.0, 1.0], size=(c, n)) @ d, observed)
                for c in _chunks(iters))
    return (count + 1) / (iters + 1)


def holm(ps):
    """Holm step-down adjusted p-values (None stays None): with the m p-values sorted
    ascending, adj_(i) = max over j <= i of min(1, (m - j + 1) p_(j)). Rejecting adj < alpha
    keeps the family-wise error <= alpha whatever the dependence between the tests."""
    order = sorted((i for i, p in enumerate(ps) if p is not None), key=lambda i: ps[i])
    out, running = [None] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * ps[i]))
        out[i] = running
    return out


def compare(a, b, test, iters):
    """An init against the baseline on one metric; a, b = {seed: value}. Returns test, p, the
    difference to the baseline, its 95% interval and the number of pairs (None if unpaired)."""
    shared = sorted(set(a) & set(b))
    if test == 'auto' and len(shared) >= 2:  # paired: the t-interval of the differences
        d = [a[s] - b[s] for s in shared]
        return dict(test='paired', p=sign_flip_p(d, iters), diff=mean_std(d)[0],
                    diff_ci=t_interval(d), pairs=len(d))
    xs, ys = list(a.values()), list(b.values())
    kind = 'welch' if test == 'welch' else 'permutation'
    if len(xs) < 2 or len(ys) < 2:
        diff = mean_std(xs)[0] - mean_std(ys)[0] if xs and ys else None
        return dict(test=kind, p=None, diff=diff, diff_ci=None, pairs=None)
    diff, se, df = welch_parts(xs, ys)  # unpaired: the difference of means, Welch's interval
    h = 0.0 if df is None else t_ppf((1 + LEVEL) / 2, df) * se
    p = welch_p(xs, ys) if kind == 'welch' else permutation_p(xs, ys, iters)
    return dict(test=kind, p=p, diff=diff, diff_ci=(diff - h, diff + h), pairs=None)


# --------------------------------------------------------------------------- summarise
def summarise(rows, args):
    """{group: {'cells': {(init, protocol): {'_runs': n, metric: stats}}, 'labels': mean
    labelled images, 'span': (min, max), 'classes': number of classes or None}}."""
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
                a = {str(r['seed']): value(r, m) for r in rs if value(r, m) is not None}
                mean, std, n = mean_std(list(a.values()))
                s = dict(mean=mean, std=std, n=n, ci=t_interval(list(a.values())), test=None,
                         p=None, diff=None, diff_ci=None, pairs=None, note=None)
                if init == args.baseline:
                    s['note'] = 'base'
                elif not base:
                    s['note'] = 'no base'
                else:
                    b = {str(r['seed']): value(r, m) for r in base if value(r, m) is not None}
                    s.update(compare(a, b, args.test, args.permutations))
                    s['note'] = ('no base' if not b else  # its runs lack this metric
                                 'n<2' if s['p'] is None else None)
                stats[(init, protocol)][m] = s
            shas = {str(r['backbone_sha']) for r in rs if r.get('backbone_sha')}
            if len(shas) > 1:
                print(f'warning: {"/".join(g)}: init {init} ({protocol}) mixes {len(shas)} '
                      f'backbones ({", ".join(sorted(s[:8] for s in shas))})', file=sys.stderr)
        keys = sorted(stats)
        for m in metrics:  # one Holm family per table and metric: both protocols together
            for k, q in zip(keys, holm([stats[k][m]['p'] for k in keys])):
                stats[k][m]['p_holm'] = q
        rs = [r for c in cells.values() for r in c]
        labels = [r['labels'] for r in rs if is_number(r.get('labels'))]
        classes = [len(r['metrics']['per_class_recall']) for r in rs
                   if isinstance(r['metrics'].get('per_class_recall'), list)]
        out[g] = dict(cells=stats, labels=mean_std(labels)[0],
                      span=(min(labels), max(labels)) if labels else None,
                      classes=max(classes) if classes else None, pool=pools(g, cells))
    return out


def pools(g, cells):
    """{init: pool_images of its rows, None when they have none}: the unlabelled images its
    pretraining saw. One pretraining run per init, so one value; a table mixing several (an
    init rebuilt on another pool) is warned about, and the most frequent one kept."""
    by = {}
    for (init, _), rs in cells.items():
        by.setdefault(init, []).extend(r['pool_images'] for r in rs
                                       if is_number(r.get('pool_images')))
    out = {}
    for init, vs in by.items():
        if len(set(vs)) > 1:
            print(f'warning: {"/".join(g)}: init {init} mixes pool sizes '
                  f'({", ".join(f"{v:g}" for v in sorted(set(vs)))} images); the most frequent '
                  f'one is the x of the unlabelled-data section', file=sys.stderr)
        out[init] = max(set(vs), key=lambda v: (vs.count(v), v)) if vs else None
    return out


def ordered(summary):
    """Groups by dataset, split, then budget from the fewest labelled images to the most."""
    return sorted(summary, key=lambda g: (g[0], g[1], summary[g]['labels'] is None,
                                          summary[g]['labels'] or 0.0, g[2]))


def layout(stats):
    """The inits (rows) and protocols (column blocks) of one table, in display order."""
    return (sorted({i for i, _ in stats}, key=init_key),
            sorted({p for _, p in stats}, key=lambda p: ranked(p, PROTOCOL_ORDER)))


def curves(summary, metric):
    """{(dataset, split): (budgets, {protocol: {init: [stats per budget, None if not run]}})}
    for the (dataset, split) pairs with 2+ budgets; budgets = [(budget, x)], x = labelled
    images per class (None when the number of classes is unknown)."""
    by, out = {}, {}
    for g in ordered(summary):
        info = summary[g]
        by.setdefault(g[:2], []).append((g, per_class(g[2], info['labels'], info['classes'])))
    for ds, gs in by.items():
        if len(gs) > 1:
            inits, protocols = layout({k for g, _ in gs for k in summary[g]['cells']})
            got = lambda i, pr: [summary[g]['cells'].get((i, pr), {}).get(metric) for g, _ in gs]
            out[ds] = ([(g[2], x) for g, x in gs],
                       {pr: {i: got(i, pr) for i in inits if any(got(i, pr))} for pr in protocols})
    return out


def ablations(summary, metric):
    """How much unlabelled data: {(group, base): [(init, x, {protocol: stats})] by x} for the
    bases of '<base>@<fraction>' inits whose inits in one table (the plain base included) ran
    2+ pool sizes. x = unlabelled images of further pretraining: the rows' pool_images, and 0
    for the init the further pretraining started from (the base up to its first '+': barlow
    of barlow+skinBT), whose own pool_images counts its pretraining on the source instead. A
    plain base without '+' and without pool_images was not further pretrained: 0 too."""
    out = {}
    for g in ordered(summary):
        info = summary[g]
        inits, protocols = layout(info['cells'])
        for base in sorted({i.split('@', 1)[0] for i in inits if '@' in i}, key=init_key):
            pts = []
            for init in [i for i in inits if i.split('@', 1)[0] == base]:
                x = info['pool'][init]
                if x is None and init == base and '+' not in base:
                    x = 0
                if x is None:  # rows from before pool_images was recorded
                    print(f'warning: {"/".join(g)}: init {init} has no pool_images in its rows; '
                          f'left off the unlabelled-data section', file=sys.stderr)
                    continue
                pts.append((init, x))
            if len({x for _, x in pts}) < 2:
                continue
            start = base.split('+', 1)[0]
            if start != base and start in inits:
                pts.append((start, 0))
            got = lambda i: {pr: info['cells'][(i, pr)][metric] for pr in protocols
                             if info['cells'].get((i, pr), {}).get(metric, {}).get('n')}
            out[(g, base)] = [(i, x, got(i))
                              for i, x in sorted(pts, key=lambda p: (p[1], init_key(p[0])))]
    return out


# --------------------------------------------------------------------------- tables
def fmt_cell(mean, std, n, runs):
    if n == 0:
        return 'n/a'
    s = f'{mean:.3f} +- ' + ('-' if std is None else f'{std:.3f}')
    return s if n == runs else f'{s} (n={n})'


def fmt_ci(mean, ci, sign=''):
    """'0.620 [0.600, 0.640]'; the mean alone when there is no interval (n = 1)."""
    f = lambda x: f'{x:{sign}.3f}'
    return 'n/a' if mean is None else f(mean) + ('' if ci is None else f' [{f(ci[0])}, {f(ci[1])}]')


def fmt_x(x):  # images per class: 5, 20, 160, 1277
    return f'{x:.0f}' if x >= 100 else f'{x:.3g}'


def fmt_p(p, note):
    if p is None:
        return note or '-'
    return f'{p:.3f}' if p >= 0.001 else f'{p:.1e}'


def group_title(g, info):
    dataset, split, budget = g
    if is_count(budget) or info['span'] is None:
        return f'{dataset} / split {split} / {budget} labels'
    lo, hi = info['span']
    return f'{dataset} / split {split} / {budget} ({lo:g}' + ('' if lo == hi else f'-{hi:g}') \
        + ' labels)'


def table_md(g, info, args):
    stats, pm = info['cells'], METRIC_SHORT.get(args.p_metric, args.p_metric)
    inits, protocols = layout(stats)
    head = ['init']
    for pr in protocols:
        short = PROTOCOL_SHORT.get(pr, pr)
        head += [f'{short} n'] + [f'{short} {METRIC_SHORT.get(m, m)}' for m in args.metrics]
        head += [f'{short} {pm} [95% CI]', f'{short} diff [95% CI]', f'{short} p',
                 f'{short} p Holm']
    lines = [f'## {group_title(g, info)}', '', '| ' + ' | '.join(head) + ' |',
             '|' + '---|' * len(head)]
    partial = False
    for init in inits:
        cells = [init]
        for pr in protocols:
            s = stats.get((init, pr))
            if s is None:
                cells += ['-'] + [''] * (len(args.metrics) + 4)
                continue
            cells.append(str(s['_runs']))
            for m in args.metrics:
                partial |= 0 < s[m]['n'] < s['_runs']
                cells.append(fmt_cell(s[m]['mean'], s[m]['std'], s[m]['n'], s['_runs']))
            c = s[args.p_metric]
            diff = fmt_ci(c['diff'], c['diff_ci'], '+') if c['diff'] is not None else '-'
            most = max(s['_runs'], stats.get((args.baseline, pr), {}).get('_runs', 0))
            if c['pairs'] is not None and c['pairs'] < most:  # some seeds left unpaired
                diff += f' ({c["pairs"]} pairs)'
            unpaired = args.test == 'auto' and c['p'] is not None and c['test'] != 'paired'
            cells += [fmt_ci(c['mean'], c['ci']), 'base' if c['note'] == 'base' else diff,
                      fmt_p(c['p'], c['note']) + (' (u)' if unpaired else ''),
                      fmt_p(c['p_holm'], None)]
        lines.append('| ' + ' | '.join(cells) + ' |')
    tested = [s[args.p_metric] for s in stats.values() if s[args.p_metric]['p'] is not None]
    return lines + ['', (f'p Holm: over the {len(tested)} tests of this table.{floor(tested)}'
                         if tested else 'No test in this table (baseline only, or too few runs).')
                    + (' "(n=k)": the metric was null (undefined) in some runs.' if partial
                       else ''), '']


def floor(tested):
    """A sentence when the seeds are too few for any p Holm of the table to fall below 0.05:
    an exact sign-flip test of n pairs cannot go below 1 / 2^n, so m tests' Holm below m / 2^n
    (said only when every test is paired and exact)."""
    pairs = [c['pairs'] for c in tested]
    if None in pairs or 2 ** max(pairs) > EXACT_MAX:
        return ''
    low = len(tested) / 2 ** max(pairs)
    return (f' With {max(pairs)} pairs no p can fall below {1 / 2 ** max(pairs):.3f}, nor any p '
            f'Holm below {low:.3f}: more seeds are needed to pass 0.05.' if low > 0.05 else '')


def notes_md(args):
    """What the table cells mean, written once under the tables."""
    pm, name = METRIC_SHORT.get(args.p_metric, args.p_metric), args.p_metric.replace('_', ' ')
    perm = (f'exact over all relabellings when C(n1+n2, n1) <= {EXACT_MAX}, else '
            f'{args.permutations} random ones, seed 0, p = (count+1)/(iters+1)')
    test, diff = {
        'welch': ('Welch\'s unequal-variance t-test (Welch-Satterthwaite df), unpaired', None),
        'permutation': (f'unpaired permutation test of the difference of means ({perm})', None),
        'auto': (f'paired: exact sign-flip permutation test of the per-seed differences on the '
                 f'seeds both ran (all 2^n sign patterns when 2^n <= {EXACT_MAX}, else '
                 f'{args.permutations} random ones, seed 0, p = (count+1)/(iters+1); a zero '
                 f'difference ties, counted by the >=). (u) = fewer than 2 shared seeds: the '
                 f'unpaired permutation test of the difference of means instead ({perm})',
                 'the mean per-seed difference init - baseline on the seeds both ran, with its '
                 'paired t-interval ("k pairs" when some seeds have no partner; (u): the '
                 'difference of means with Welch\'s interval)')}[args.test]
    diff = diff or 'the difference of means init - baseline with Welch\'s interval'
    return ['n = runs (seeds); metric cells = mean +- sample std (ddof=1) over those runs on '
            'the test set (std "-" when n = 1; a split named "(val part)": rows of '
            'finetune.py --eval-part val, scored on the val part to choose budgets, in tables '
            'of their own). ft = fine-tuning the whole network, probe = '
            'linear probe on frozen features; acc = accuracy, bal. acc = balanced accuracy '
            '(mean recall over the classes in the test labels), AUROC = macro one-vs-rest.',
            f'{pm} [95% CI] = mean with the t-interval over seeds (mean +- t_0.975,n-1 s / '
            f'sqrt n); diff = {diff}.',
            f'p = one-sided p-value of H1: mean {name} of the init > that of `{args.baseline}` '
            f'in the same protocol; {test}. p is not corrected for multiple comparisons; p Holm '
            f'is (Holm step-down over the tests of one table: the family-wise error over all its '
            f'inits and both protocols stays <= alpha). base = the baseline, n<2 = too few runs '
            f'to test, no base = baseline not run or without this metric.', '']


def efficiency_md(curve, args):
    """Label efficiency: the p-metric per init (rows) and budget (columns), per protocol."""
    lines = []
    for (dataset, split), (budgets, by_protocol) in curve.items():
        head = ['init'] + [b + (' labels' if is_count(b) else '')
                           + ('' if x is None else f' ({fmt_x(x)}/class)') for b, x in budgets]
        for pr, by_init in by_protocol.items():
            lines += [f'### {dataset} / split {split}: {PROTOCOL_LONG.get(pr, pr)}', '',
                      '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
            for init, ss in by_init.items():
                lines.append('| ' + ' | '.join([init] + [
                    f'{fmt_ci(s["mean"], s["ci"])} ({s["n"]})' if s and s['n'] else '-'
                    for s in ss]) + ' |')
            lines.append('')
    pm = args.p_metric.replace('_', ' ')
    return ['## Label efficiency', '', f'Test {pm} against the label budget (val {pm} for a '
            f'split named "(val part)": those rows are never mixed with test ones): mean [95% '
            f't-interval over seeds] (seeds); x/class = labelled images per class (for a '
            f'fraction or all labels: mean labelled images / classes); curve.png draws it.',
            ''] + lines if lines else []


def ablation_md(abl, summary, args):
    """How much unlabelled data: per table, base and protocol, the p-metric by pool size."""
    lines, pm = [], METRIC_SHORT.get(args.p_metric, args.p_metric)
    for (g, base), pts in abl.items():
        protocols = sorted({pr for *_, by in pts for pr in by},
                           key=lambda p: ranked(p, PROTOCOL_ORDER))
        for pr in protocols:
            lines += [f'### {group_title(g, summary[g])}: {base}, {PROTOCOL_LONG.get(pr, pr)}',
                      '', f'| init | unlabelled images | {pm} [95% CI] (n) |', '|---|---|---|']
            lines += [f'| {init} | {x:.0f} | {fmt_ci(by[pr]["mean"], by[pr]["ci"])} '
                      f'({by[pr]["n"]}) |' for init, x, by in pts if pr in by]
            lines.append('')
    name = args.p_metric.replace('_', ' ')
    return ['## Unlabelled data for further pretraining', '',
            f'Test {name} (val {name} for a split named "(val part)") against the unlabelled '
            f'images the init was further pretrained on (pool_images of its rows; '
            f'`<base>@<share>` = `make ablation`: that share of the pool, from the init named '
            f'before the first "+"): mean [95% t-interval over seeds] (seeds). 0 = that '
            f'starting init, without further pretraining. ablation.png draws it.',
            ''] + lines if lines else []


def markdown(summary, curve, abl, args, source):
    lines = ['# Results', '', source, '']
    for g in ordered(summary):
        lines += table_md(g, summary[g], args)
    return '\n'.join(lines + notes_md(args) + efficiency_md(curve, args)
                     + ablation_md(abl, summary, args))


def csv_text(summary, args):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator='\n')
    w.writerow(['dataset', 'split', 'budget', 'init', 'protocol', 'metric', 'mean', 'std', 'n',
                'p', 'note', 'test', 'baseline', 'p_holm', 'ci_lo', 'ci_hi', 'diff', 'diff_lo',
                'diff_hi', 'pairs', 'labels_mean', 'per_class', 'pool_images'])
    num = lambda x: '' if x is None else f'{x:.10g}'
    for g in ordered(summary):
        info = summary[g]
        x = per_class(g[2], info['labels'], info['classes'])
        for init, pr in sorted(info['cells'], key=lambda k: (init_key(k[0]),
                                                             ranked(k[1], PROTOCOL_ORDER))):
            for m, s in info['cells'][(init, pr)].items():
                if m == '_runs':
                    continue
                ci, dci = s['ci'] or (None, None), s['diff_ci'] or (None, None)
                w.writerow([*g, init, pr, m, num(s['mean']), num(s['std']), s['n'],
                            num(s['p']), s['note'] or '', s['test'] or '', args.baseline,
                            num(s['p_holm']), num(ci[0]), num(ci[1]), num(s['diff']),
                            num(dci[0]), num(dci[1]), s['pairs'] or '', num(info['labels']),
                            num(x), num(info['pool'].get(init))])
    return buf.getvalue()


def check_out(path):
    """Refuse an --out that cannot be written, before any work: a file in its place, or a
    folder where a real write (not the permission bits: root ignores them) fails."""
    if not path.strip():
        raise UserError('--out is empty; give a folder')
    folder = os.path.abspath(path)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f'--out {path}: is a file; a folder is expected there')
    while not os.path.exists(folder):  # made later: the nearest existing ancestor decides
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f'--out {path}: {folder} is a file, so nothing can be made below it')
    probe = os.path.join(folder, f'.write-test.{os.getpid()}')
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        os.remove(probe)
    except OSError as e:
        raise UserError(f'--out {path}: cannot be written ({e.filename}: {e.strerror})')


def write_text(path, text):
    """Temporary name, then rename: an interrupted run never leaves half a table."""
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- pretraining logs
def read_logs(root):
    """{run: [records]} from root/*/log.jsonl. Folders without one (runs/finetune) are not
    pretraining runs; a torn line (a run killed mid-write) is skipped with a warning. A run
    killed past its last checkpoint logs those steps again when resumed: the later records
    of a step replace the earlier ones."""
    runs = {}
    if not os.path.isdir(root):
        return runs
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, 'log.jsonl')
        if not os.path.isfile(path):
            continue
        recs, kinds = [], set()
        with open(path, encoding='utf-8', errors='replace') as f:
            for lineno, line in enumerate(f, 1):
                try:
                    rec = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:
                    print(f'warning: {path}:{lineno}: not valid JSON (torn line?), skipped',
                          file=sys.stderr)
                    continue
                if isinstance(rec, dict) and is_number(rec.get('step')):
                    kind = (rec['step'], frozenset(rec))  # a kNN record shares its step
                    if recs and (rec['step'] < recs[-1]['step'] or kind in kinds):
                        # a rerun from an earlier step (its checkpoint's, or 0), or the same
                        # step logged again: its records replace those from there
                        recs = [r for r in recs if r['step'] < rec['step']]
                        kinds = {(r['step'], frozenset(r)) for r in recs}
                    kinds.add(kind)
                    recs.append(rec)
        if recs:
            runs[name] = recs
    return runs


def series(recs, key):
    """(steps, values) of the records that carry a finite number under key."""
    pts = [(r['step'], r[key]) for r in recs if is_number(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


# --------------------------------------------------------------------------- plots
def pyplot():
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_png(plt, fig, path):
    fig.tight_layout()
    tmp = f'{path}.{os.getpid()}.tmp'  # then rename, as every artifact
    fig.savefig(tmp, format='png', dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def palette(plt, names):
    """{init: colour}, one per init in every figure: the known inits tab10's, in INIT_ORDER;
    the others (ablation shares, custom names) OTHER_COLORS in init_key order, handed out over
    all the names of the report so no two of them share one until there are more than 8."""
    known = plt.get_cmap('tab10')
    rest = sorted((n for n in set(names) if n not in INIT_ORDER), key=init_key)
    return {**{n: known(i % 10) for i, n in enumerate(INIT_ORDER)},
            **{n: OTHER_COLORS[i % len(OTHER_COLORS)] for i, n in enumerate(rest)}}


def plot_summary(plt, summary, metric, path):
    """Bars of the metric's mean per init with the 95% t-interval, protocols side by side,
    n over each bar; one panel per (dataset, split, budget)."""
    groups = ordered(summary)
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 3.8 * len(groups)), squeeze=False)
    for ax, g in zip(axes[:, 0], groups):
        stats = summary[g]['cells']
        inits, protocols = layout(stats)
        width = 0.8 / len(protocols)
        for j, pr in enumerate(protocols):
            for k, init in enumerate(inits):
                s = stats.get((init, pr), {}).get(metric)
                if not s or not s['n']:
                    continue
                x = k + (j - (len(protocols) - 1) / 2) * width
                lo, hi = s['ci'] or (s['mean'], s['mean'])  # n = 1: a bar, no whiskers
                label = PROTOCOL_LONG.get(pr, pr)
                ax.bar(x, s['mean'], width, capsize=3, color=f'C{j}',
                       yerr=[[s['mean'] - lo], [hi - s['mean']]] if s['ci'] else None,
                       label=None if label in ax.get_legend_handles_labels()[1] else label)
                # inside the axis (0-1.1) when the interval runs past it (2 seeds: t = 12.7)
                ax.text(x, min(hi, 1.04) + 0.01, f'n={s["n"]}', ha='center', va='bottom',
                        fontsize=7)
        ax.set_xticks(range(len(inits)))
        ax.set_xticklabels(inits, rotation=20, ha='right')
        ax.set_ylim(0, 1.1)
        ax.set_xlabel('initialisation')
        ax.set_ylabel(f'{part_of(g[1])} {metric.replace("_", " ")}\n(0-1, mean, 95% CI)')
        ax.set_title(group_title(g, summary[g]))
        ax.grid(axis='y', alpha=0.3)
        ax.legend(loc='upper left', fontsize=8)
    save_png(plt, fig, path)


def plot_curves(plt, curve, metric, path, colors):
    """The metric against labelled images per class (log x), a line per init with its 95%
    band; fine-tuning and probe side by side; a row per (dataset, split)."""
    protocols = sorted({pr for _, by in curve.values() for pr in by},
                       key=lambda p: ranked(p, PROTOCOL_ORDER))
    fig, axes = plt.subplots(len(curve), len(protocols), squeeze=False, sharey='row',
                             figsize=(5.5 * len(protocols), 4.2 * len(curve)))
    for row, ((dataset, split), (budgets, by_protocol)) in zip(axes, curve.items()):
        for ax, pr in zip(row, protocols):
            for init, ss in by_protocol.get(pr, {}).items():
                got = [(x, s) for (_, x), s in zip(budgets, ss) if x is not None and s and s['n']]
                if not got:
                    continue
                ns = sorted({s['n'] for _, s in got})
                n = f'n={ns[0]}' if len(ns) == 1 else f'n={ns[0]}-{ns[-1]}'
                c = colors[init]
                ax.plot([x for x, _ in got], [s['mean'] for _, s in got], 'o-', color=c,
                        label=f'{init} ({n})')
                band = [(x, *s['ci']) for x, s in got if s['ci']]
                if band:
                    ax.fill_between(*zip(*band), color=c, alpha=0.15, lw=0)
            ax.set_xscale('log')
            ticks = sorted({x for _, x in budgets if x is not None})  # the budgets, plainly
            ax.set_xticks(ticks, [fmt_x(x) for x in ticks])
            ax.set_xlim(ticks[0] / 1.3, ticks[-1] * 1.3)  # every panel the same budgets
            ax.minorticks_off()
            ax.set_xlabel('labelled images per class (log scale)')
            ax.set_ylabel(f'{part_of(split)} {metric.replace("_", " ")} (0-1)')
            ax.set_title(f'{dataset} / split {split}: {PROTOCOL_LONG.get(pr, pr)}')
            ax.grid(alpha=0.3, which='both')
            ax.legend(fontsize=8, title='init (seeds); band: 95% CI', title_fontsize=8)
    save_png(plt, fig, path)


def seeds(stats):  # 'n=5', or 'n=3-5' when the points of a line ran different numbers
    ns = sorted({s['n'] for s in stats})
    return f'n={ns[0]}' if len(ns) == 1 else f'n={ns[0]}-{ns[-1]}'


def errorbars(ax, pts, **style):
    """Means at [(x, stats)] with their 95% t-interval as bars (none when n = 1)."""
    lo = [s['mean'] - (s['ci'] or (s['mean'],))[0] for _, s in pts]
    hi = [(s['ci'] or (0, s['mean']))[1] - s['mean'] for _, s in pts]
    ax.errorbar([x for x, _ in pts], [s['mean'] for _, s in pts], yerr=[lo, hi], capsize=3,
                ms=6, **style)


def plot_ablation(plt, abl, summary, metric, path):
    """The metric against the unlabelled images of further pretraining (log x), a line with
    95% error bars per protocol through the '<base>@<fraction>' inits, the plain base as an
    open square just right of its x (it may share it with base@1.0), the starting init (0
    images, off a log axis) as a dashed line with its 95% band; a panel per (table, base)."""
    cols = min(2, len(abl))
    rows = -(-len(abl) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 5.6 * rows), squeeze=False)
    for ax in axes.flat[len(abl):]:
        ax.axis('off')
    for ax, ((g, base), pts) in zip(axes.flat, abl.items()):
        protocols = sorted({pr for *_, by in pts for pr in by},
                           key=lambda p: ranked(p, PROTOCOL_ORDER))
        for j, pr in enumerate(protocols):
            c, long = f'C{j}', PROTOCOL_LONG.get(pr, pr)
            dodge = 1.025 ** (j - (len(protocols) - 1) / 2)  # the protocols' bars apart
            got = [(init, x * dodge, by[pr]) for init, x, by in pts if pr in by]
            for init, _, s in [p for p in got if p[1] == 0]:  # 0 is off a log axis: a level
                ax.axhline(s['mean'], color=c, ls='--', lw=1.2,
                           label=f'{init}, no further pretraining: {long} ({seeds([s])})')
                if s['ci']:
                    ax.axhspan(*s['ci'], color=c, alpha=0.08, lw=0)
            shares = [(x, s) for init, x, s in got if x > 0 and '@' in init]
            if shares:
                errorbars(ax, shares, fmt='o-', color=c, lw=1.5,
                          label=f'{base}@share: {long} ({seeds([s for _, s in shares])})')
            for init, x, s in [p for p in got if p[1] > 0 and '@' not in p[0]]:
                errorbars(ax, [(x * 1.08, s)], fmt='s', color=c, mfc='white',
                          label=f'{init}: {long} ({seeds([s])})')
        ticks = sorted({x for _, x, _ in pts if x > 0})
        ax.set_xscale('log')
        ax.set_xticks(ticks, [f'{x:.0f}' for x in ticks])
        ax.set_xlim(ticks[0] / 1.6, ticks[-1] * 1.6)
        ax.minorticks_off()
        ax.set_xlabel('unlabelled images of further pretraining (log scale)')
        ax.set_ylabel(f'{part_of(g[1])} {metric.replace("_", " ")}\n(0-1, mean, 95% CI)')
        ax.set_title(f'{group_title(g, summary[g])}\n{base}', fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, title='seeds; bars and band: 95% CI', title_fontsize=7.5,
                  loc='upper center', bbox_to_anchor=(0.5, -0.2), ncol=2)  # off the lines
    save_png(plt, fig, path)


def plot_pretrain(plt, runs, path, colors):
    """A loss panel per run (log y; the invariance and redundancy terms when logged), then
    RankMe and online-kNN panels over all runs when any run logged them."""
    panels = [('loss', name) for name, recs in runs.items() if series(recs, 'loss')[0]]
    panels += [(k, None) for k in ('rankme', 'knn_bal_acc')
               if any(series(r, k)[0] for r in runs.values())]
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis('off')
    for ax, (key, name) in zip(axes.flat, panels):
        if key == 'loss':
            for k, style in zip(LOSS_TERMS, ('-', '--', ':')):
                xs, ys = series(runs[name], k)
                if xs:
                    ax.plot(xs, ys, style, lw=1, label=LOSS_TERMS[k])
            ax.set_yscale('log')
            ax.set_ylabel('training loss (log scale)')
            ax.set_title(f'{name}: loss')
        else:
            for name_, recs in runs.items():
                xs, ys = series(recs, key)
                if xs:
                    ax.plot(xs, ys, 'o-' if len(xs) < 30 else '-', ms=3, lw=1,
                            color=colors[name_], label=name_)
            ax.set_ylabel('RankMe (effective rank, dims)' if key == 'rankme' else
                          'online kNN balanced accuracy (0-1, val)')
            ax.set_title('RankMe' if key == 'rankme' else 'kNN monitor')
        ax.set_xlabel('optimizer step')
        ax.grid(alpha=0.3, which='both')
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    save_png(plt, fig, path)
    return True


# --------------------------------------------------------------------------- main
def main(argv=None):
    args = get_args(argv)
    check_out(args.out)
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
    curve = curves(summary, args.p_metric)
    for (dataset, split), (budgets, _) in curve.items():
        left = [b for b, x in budgets if x is None]
        if left:
            print(f'warning: {dataset}/{split}: no per_class_recall in the rows, so the number '
                  f'of classes is unknown; {", ".join(left)} left off curve.png',
                  file=sys.stderr)
    abl = ablations(summary, args.p_metric)
    runs = read_logs(args.runs)
    source = (f'From `{args.results}`: {n_lines} lines, {len(rows)} runs after reruns '
              f'replaced earlier lines ({n_lines - len(rows)} replaced).')
    md = markdown(summary, curve, abl, args, source)
    os.makedirs(args.out, exist_ok=True)
    write_text(os.path.join(args.out, 'summary.md'), md)
    write_text(os.path.join(args.out, 'summary.csv'), csv_text(summary, args))
    print(md)
    made = ['summary.md', 'summary.csv']
    plt = pyplot()
    if plt is None:
        stale(args.out, made)
        print(f'wrote {args.out}/{", ".join(made)}; {NO_PLOTS}')
        return
    colors = palette(plt, [i for info in summary.values() for i, _ in info['cells']] + list(runs))
    plot_summary(plt, summary, args.p_metric, os.path.join(args.out, 'summary.png'))
    made.append('summary.png')
    drawable = {ds: c for ds, c in curve.items() if sum(x is not None for _, x in c[0]) > 1}
    if drawable:
        plot_curves(plt, drawable, args.p_metric, os.path.join(args.out, 'curve.png'), colors)
        made.append('curve.png')
    if abl:
        plot_ablation(plt, abl, summary, args.p_metric, os.path.join(args.out, 'ablation.png'))
        made.append('ablation.png')
    if runs and plot_pretrain(plt, runs, os.path.join(args.out, 'pretrain.png'), colors):
        made.append('pretrain.png')
    stale(args.out, made)
    print(f'wrote {args.out}/{", ".join(made)}')


PICTURES = ('summary.png', 'curve.png', 'ablation.png', 'pretrain.png')


def stale(out, made):
    """Remove the pictures an earlier report left in `out` that this one did not draw: they
    would sit beside tables that no longer describe them."""
    for name in PICTURES:
        if name not in made and os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


if __name__ == '__main__':
    try:
        main()
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a path of the wrong kind, permissions, a full disk: one line
        print(f'error: {e.filename or ""}: {e.strerror or e}', file=sys.stderr)
        sys.exit(2)
