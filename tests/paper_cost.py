"""What `make paper` costs on GPUs, computed from throughput: the arithmetic of the README's
table, in one place. `make bench-gpu` prints the same table from the rates it measured.

    python tests/paper_cost.py                              # at the assumed rates
    python tests/paper_cost.py --ft 3100 --tta 2900 --bt 3300 --gpus 8
    python tests/paper_cost.py --labels all                 # make paper PAPER_LABELS=all
    python tests/paper_cost.py --pool all                   # make paper SKIN_POOL=all
    python tests/paper_cost.py --curve-inits random supervised barlow supervised+skinBT \
        barlow+skinBT skinBT --random-seeds 35             # every init at every budget, 35 seeds

Rates (as `make bench-gpu` measures them, ResNet-50, bf16, channels_last):
  --ft   fine-tuning step, img/s at 256 px, batch 64 (finetune.py's)
  --tta  test-time inference, test images/s through all --tta views at 256 px (finetune.py's
         common.predict); one forward pass is then tta x that (probe features, kNN monitor)
  --bt   Barlow Twins step, pairs/s at 224 px, batch 256; make paper pretrains at 256 px, so
         the rate is taken x (224/256)^2 (compute grows with the pixels)
  --fit-s  one probe seed with all the labels (probe.run_seed: its fits and kNN); a budget
         of half the labels is taken as half that (bench-gpu measures both)
Assumed, never measured: --ddp-efficiency (pretraining on N GPUs runs at N x efficiency x one
GPU's rate), and that make paper's Barlow Twins step (batch 128, AdamW, barlow_skin views)
runs at the benchmark's (batch 256, LARS, barlow_imagenet views). Not counted: the 23 script
runs' start-up and loading of the 256 px uint8 cache (5.0 GB: all 25,331 ISIC 2019 images,
the downsampled copies included), and building it once.
"""
import argparse
import math
import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pretrain_barlow import monitor_every  # noqa: E402

# `make paper`'s work: the Makefile's `paper` line and finetune.py / probe.py /
# pretrain_barlow.py defaults (test_paper_cost.py checks them against `make -n paper`). The
# split: ISIC 2019 without its downsampled copies (23,257 images) under the paper's rule at the
# paper's counts (PER_CLASS=paper), 2,554 labelled images; of the other 20,703, about 10% go to
# val (whole lesions) and the rest to test (the paper tested on 19,423: its split is not
# published). The pretraining pool is the train part (SKIN_POOL=train, as the paper's BT_
# rows); 'all' would add val
WORK = dict(
    inits=('random', 'supervised', 'barlow', 'supervised+skinBT', 'barlow+skinBT', 'skinBT'),
    seeds=35, random_seeds=5,  # the paper ran random init 5 times (PAPER_RANDOM_SEEDS=0-4)
    labelled=2554, val=2070, test=18633,
    budgets=(1.0, 0.5),      # LABELS="all 0.5": every labelled image, then half of each class
    curve_inits=('supervised', 'barlow'),  # fine-tuned at the later budgets (PAPER_CURVE_INITS)
    head_epochs=1, epochs=40, tta=3,
    probe_views=16,          # augmented passes over the probe's train images (+ the eval view)
    knn_per_class=25, classes=8,  # the pretraining runs' kNN monitor: its labelled references
    further_runs=2, further_epochs=100,  # supervised+skinBT and barlow+skinBT
    skin_epochs=1000,        # skinBT: Barlow Twins on the skin pool alone, from random init
    projector_epochs=1,      # --preset skin: one projector-only epoch before each run
    range_test_steps=100,    # --lr auto: at most 100 steps of the lr range test before it
    pool='train',
    ft_batch=64, bt_batch=128,  # each epoch drops its last partial batch (drop_last)
    bt_size=256, bench_size=224,
)
# bench_gpu.py's targets for one H200, taken as its rates (no GPU measured yet). For scale: NVIDIA
# publishes 2,470 img/s for ResNet-50 v1.5 training on one A100 80GB (PyTorch, mixed
# precision, batch 256, 224 px: DeepLearningExamples, resnet50v1.5 README, pytorch-21.03)
ASSUMED = dict(ft=2500.0, tta=2500.0, bt=2500.0, fit_s=1.0, ddp_efficiency=0.5)
GOALS = {1: 3 * 3600, 8: 25 * 60}  # seconds: 3 hours on one GPU, 25 minutes on 8
PROBE_SEEDS = 'probe: seeds (fits, kNN)'  # the piece whose time the rates do not scale


def monitor_passes(epochs, projector_epochs, pool_images):
    """kNN monitor passes of a pretraining run with pretrain_barlow.py's default: before the
    first step and on every monitor_every-th of all its epochs (the projector-only ones
    count, as fit numbers them)."""
    return (projector_epochs + epochs) // monitor_every(epochs, pool_images) + 1


def seed_seconds(fit_s, budget):
    """One probe seed's seconds at a label budget: fit_s a number (all the labels; a budget
    in proportion, assumed) or {budget: seconds} (measured)."""
    return fit_s[budget] if isinstance(fit_s, dict) else budget * fit_s


def pieces(ft, tta, bt, fit_s, ddp_efficiency, gpus=1, work=WORK, fits='assumed'):
    """[(piece, work in words, seconds on one GPU, seconds on `gpus`)]: make paper's steps in
    the order it runs them (JOBS=1: one at a time), with `gpus` GPUs under torchrun. Evaluation
    runs --parallel seeds (each rank its seeds in turn: ceil(seeds / gpus) rounds per command,
    every rank extracting the probe's features itself); pretraining is one DDP run. fit_s:
    one probe seed's seconds (seed_seconds)."""
    w = work
    forward = tta * w['tta']                         # single-view forward passes a second
    bt_rate = bt * (w['bench_size'] / w['bt_size']) ** 2
    dist = gpus * ddp_efficiency if gpus > 1 else 1
    seeds = lambda inits: sum(w['random_seeds'] if i == 'random' else w['seeds'] for i in inits)
    rounds = lambda inits: sum(math.ceil((w['random_seeds'] if i == 'random' else w['seeds'])
                                         / gpus) for i in inits)  # one command an init
    pool = w['labelled'] + (w['val'] if w['pool'] == 'all' else 0)
    whole = lambda n, batch: n // batch * batch  # the images of an epoch's full batches
    knn = min(w['labelled'], w['knn_per_class'] * w['classes']) + w['val']
    out = []
    for k, f in enumerate(w['budgets']):
        inits = w['inits'] if k == 0 else [i for i in w['inits'] if i in w['curve_inits']]
        n = whole(round(f * w['labelled']), w['ft_batch'])
        train = (w['head_epochs'] + w['epochs']) * n / ft
        test = w['test'] / tta
        seed = train + test
        out.append((f'fine-tuning, {"all the" if f == 1 else f"{f:g} of the"} labels',
                    f'{seeds(inits)} seeds of {len(inits)} inits x ({w["head_epochs"] + w["epochs"]} '
                    f'epochs x {n:,} = {train:,.1f} s + {w["tta"]} TTA passes x {w["test"]:,} = '
                    f'{test:,.1f} s)', seeds(inits) * seed, rounds(inits) * seed))
    images = w['labelled'] * (1 + w['probe_views']) + w['val'] + w['test']
    n_inits = len(w['inits'])
    per_seed = sum(seed_seconds(fit_s, f) for f in w['budgets'])  # one seed of each budget
    each = ' + '.join(f'{seed_seconds(fit_s, f):.3g}' for f in w['budgets'])
    feat = n_inits * images / forward
    out.append(('probe: features (once an init, on every rank)',
                f'{n_inits} x ({w["labelled"]:,} x {1 + w["probe_views"]} views + '
                f'{w["val"] + w["test"]:,}) = {n_inits * images:,} passes', feat, feat))
    every = seeds(w['inits'])  # the probe: every init at every budget
    out.append((PROBE_SEEDS, f'{every * len(w["budgets"])} seeds: {every} x ({each} s, {fits})',
                every * per_seed, rounds(w['inits']) * per_seed))
    for name, runs, epochs in (('further Barlow Twins', w['further_runs'], w['further_epochs']),
                               ('Barlow Twins on skin only', 1, w['skin_epochs'])):
        tested = w['range_test_steps'] * w['bt_batch']  # the lr range test's pairs
        pairs = runs * ((w['projector_epochs'] + epochs) * whole(pool, w['bt_batch']) + tested)
        passes = runs * monitor_passes(epochs, w['projector_epochs'], pool) * knn
        one = pairs / bt_rate + passes / forward
        out.append((name, f'{runs} x ({w["projector_epochs"] + epochs:,} epochs x '
                          f'{whole(pool, w["bt_batch"]):,} + {tested:,} in the lr range test) = '
                          f'{pairs:,} pairs + {passes:,} kNN passes', one,
                    pairs / (bt_rate * dist) + passes / forward))
    return out


def hours(s):
    return f'{s / 3600:.2f} h' if s >= 3600 else f'{s / 60:.1f} min' if s >= 60 else f'{s:.1f} s'


def needed(rows, goal, column):
    """How many times the rates would have to be for the total to meet `goal` (the fits are
    fixed time), or None when the fixed part alone exceeds it."""
    fixed = sum(r[column] for r in rows if r[0] == PROBE_SEEDS)
    scaled = sum(r[column] for r in rows) - fixed
    return None if goal <= fixed else scaled / (goal - fixed)


def table(ft, tta, bt, fit_s, ddp_efficiency, gpus=8, source='assumed', fits='assumed',
          ddp='assumed', work=WORK):
    """Markdown lines: the pieces, the totals, and against each goal the factor on the rates
    that would meet it (the probe seeds' time held fixed). source, fits, ddp: where the
    rates, the probe seeds' time and the DDP efficiency come from ('assumed', 'measured',
    'given')."""
    rows = pieces(ft, tta, bt, fit_s, ddp_efficiency, gpus, work, fits)
    probe = (f'{seed_seconds(fit_s, 1.0):.3g} s' if not isinstance(fit_s, dict) else
             ' / '.join(f'{v:.3g} s' for v in fit_s.values()) + ' (all / half the labels)')
    big, small = work['bt_size'], work['bench_size']
    rates = (f'Rates ({source}): fine-tuning {ft:,.0f} img/s at {big} px, test-time inference '
             f'{tta:,.0f} img/s through {work["tta"]} views, Barlow Twins {bt:,.0f} pairs/s at '
             f'{small} px ({bt * (small / big) ** 2:,.0f} at {big}); one probe seed {probe} '
             f'({fits}); '
             f'{gpus}-GPU pretraining at {ddp_efficiency:g} x {gpus} x one GPU ({ddp}).')
    lines = textwrap.wrap(rates, 95) + ['', f'| piece | work | one GPU | {gpus} GPUs |',
                                        '|---|---|---|---|']
    lines += [f'| {p} | {w} | {hours(a)} | {hours(b)} |' for p, w, a, b in rows]
    totals = [sum(r[2] for r in rows), sum(r[3] for r in rows)]
    lines.append(f'| **make paper** | | **{hours(totals[0])}** | **{hours(totals[1])}** |')
    lines.append('')
    for column, n in ((2, 1), (3, gpus)):
        goal = GOALS.get(n)
        if goal is None:
            continue
        k = needed(rows, goal, column)
        total = totals[column - 2]
        verdict = 'meets it' if total <= goal else (
            f'misses it: every rate {k:.2f}x these would meet it' if k else
            'misses it at any rate (the probe seeds alone take longer)')
        lines.append(f'- goal on {n} GPU{"s" if n > 1 else ""}: {hours(goal)}; '
                     f'{hours(total)} {verdict}')
    return lines


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    positive = lambda s: float(s) if float(s) > 0 else p.error(f'{s}: must be > 0')

    def count(low):
        def parse(s):
            if not s.isdigit() or int(s) < low:
                raise argparse.ArgumentTypeError(f'{s}: give a whole number, {low} or more')
            return int(s)
        return parse
    for k in ('ft', 'tta', 'bt'):
        p.add_argument(f'--{k}', type=positive, default=ASSUMED[k])
    p.add_argument('--fit-s', type=positive, default=ASSUMED['fit_s'])
    p.add_argument('--ddp-efficiency', type=positive, default=ASSUMED['ddp_efficiency'])
    p.add_argument('--gpus', type=count(2), metavar='N', default=8)
    p.add_argument('--labels', nargs='+', default=['all', '0.5'], metavar='BUDGET',
                   help="make paper's PAPER_LABELS: all, or fractions of each class written "
                        "with a point, as the Makefile reads them (default: all 0.5)")
    p.add_argument('--curve-inits', nargs='+', choices=WORK['inits'], metavar='INIT',
                   default=list(WORK['curve_inits']),
                   help="make paper's PAPER_CURVE_INITS: the inits fine-tuned at the budgets "
                        "after all (default: supervised barlow, as the paper)")
    p.add_argument('--random-seeds', type=count(1), metavar='N',
                   default=WORK['random_seeds'],
                   help="seeds of the random init (make paper's PAPER_RANDOM_SEEDS=0-4: 5)")
    p.add_argument('--pool', choices=['train', 'all'], default=WORK['pool'],
                   help="make paper's SKIN_POOL: the skin pretraining runs' images, the train "
                        "part (default, the paper's) or all non-test ones (train and val)")
    a = p.parse_args(argv)
    budgets = []
    for b in a.labels:
        try:
            f = 1.0 if b == 'all' else float(b) if '.' in b else None
        except ValueError:
            f = None
        if f is None or not 0 < f <= 1:
            p.error(f'--labels {b}: give all or a fraction of each class such as 0.5 (the '
                    f'Makefile reads a number without a point as images per class, which '
                    f'this table does not count)')
        if f not in budgets:
            budgets.append(f)
    a.budgets = tuple(budgets)
    return a


def main(argv=None):
    a = get_args(argv)
    how = lambda *keys: 'given' if any(getattr(a, k) != ASSUMED[k] for k in keys) else 'assumed'
    source = 'given' if how('ft', 'tta', 'bt') == 'given' else 'assumed: the targets of one H200'
    print('\n'.join(table(a.ft, a.tta, a.bt, a.fit_s, a.ddp_efficiency, a.gpus, source,
                          how('fit_s'), how('ddp_efficiency'),
                          work=dict(WORK, budgets=a.budgets, curve_inits=tuple(a.curve_inits),
                                    random_seeds=a.random_seeds, pool=a.pool))))


if __name__ == '__main__':
    main()
