"""Linear probe on frozen features, over repeated seeds: does an initialisation give better
features, not only a better starting point? One result row per seed in results/results.jsonl.

The backbone runs once, in eval mode, over the labelled train images of the seeds (and label
budgets: `--labels-per-class 5 10 20` probes each in one process) to run, the
val part and the test part (the eval view), plus --aug-views augmented passes over those train
images (few labels need augmentation even with frozen features); the features are cached per
(backbone, dataset, split, size, views), and a later run adds only the images it lacks. Each
seed then fits a multinomial logistic regression on the features of its labelled subset
(centred, full-batch L-BFGS, the L2 strength chosen on the val part by balanced accuracy from
a small grid), plus a cosine kNN (k=20) as a second number. Seconds per seed, where a
100-epoch probe through the network takes minutes, at the same accuracy (see the README's
benchmarks).

    python probe.py --data ISIC_2019 --split splits/ISIC_2019-paper.json \\
        --init runs/barlow/backbone.pt --init-name barlow --labels-per-class 10 50 --seeds 0-4
Tiny CPU run:
    python probe.py --data data/skin --arch resnet18 --size 32 --cache-size 40 \\
        --labels-per-class 4 --seeds 0-1
In the experiment chain: `make all` (see the Makefile).
"""
import argparse
import contextlib
import hashlib
import json
import os
import time

import torch
import torch.nn.functional as F

import common as C

L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_data_args(p, size=256, cache_size=256)
    C.add_model_args(p)
    C.add_runtime_args(p)
    C.add_eval_args(p, budgets=True)
    g = p.add_argument_group('probe')
    g.add_argument('--batch-size', type=C.number(int, 1), default=256,
                   help='images per forward pass while extracting features')
    g.add_argument('--l2', type=l2_grid, default=L2_GRID,
                   help='L2 strengths tried on the val part (comma-separated)')
    g.add_argument('--knn-k', type=C.number(int, 1), default=20,
                   help='neighbours of the kNN classifier')
    g.add_argument('--max-iter', type=C.number(int, 1), default=30,
                   help='L-BFGS iterations per fit (warm-started along the L2 grid)')
    g.add_argument('--aug-views', type=C.number(int, 0, 1000), default=16,
                   help='augmented passes over the labelled train images added to the '
                        'probe\'s training features (0: the eval view alone); each costs one '
                        'forward pass over them; 16 matched a 100-epoch probe in the README\'s '
                        'benchmark')
    g.add_argument('--aug', default='finetune_skin', choices=list(C.AUG_PRESETS),
                   help='augmentation of those passes')
    return C.parse_args(p, None, argv)


def l2_grid(text):
    """Strengths in [0, 1e4]: above that the weights are 0 anyway, and near float's limit
    the penalty overflows to a non-finite fit."""
    try:
        grid = tuple(float(v) for v in text.split(','))
        if grid and all(0 <= v <= 1e4 for v in grid):
            return grid
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f'{text}: comma-separated numbers in [0, 1e4], e.g. '
                                     f'1e-4,1e-2')


def budgets(args):
    """[(per_class, fraction)]: the label budgets to probe, one process for all of them (the
    features are extracted once, for the union of their labelled subsets)."""
    if args.labels_per_class:
        return [(k, None) for k in dict.fromkeys(args.labels_per_class)]
    if args.label_fraction:
        return [(None, f) for f in dict.fromkeys(args.label_fraction)]
    return [(None, None)]


@torch.no_grad()
def features(rt, args, backbone, cache, split, sha, train_ids):
    """{part: {'ids', 'x', 'y'}} for the val and test parts and the train images of train_ids
    (the labelled subsets of the seeds to run; with few labels the rest would never be used),
    plus 'x_aug' (V, n, D) for those, cached in --cache-dir per (backbone, dataset, split,
    size, views). A later run extracts only the train images the file lacks and adds them."""
    key = hashlib.sha1(f'{sha}|{cache["file"]}|{cache["fingerprint"]}|{args.size}|'
                       f'{rt.precision}|{args.aug_views}|{args.aug}|'
                       f'{json.dumps([split[p] for p in ("train", "val", "test")])}'.encode()
                       ).hexdigest()[:12]
    path = os.path.join(args.cache_dir, f'features-{key}.pt')
    out = {}
    if os.path.exists(path):
        try:
            out = C.load_checkpoint(path)
            if not isinstance(out, dict) or not all(
                    isinstance(v, dict) and {'ids', 'x', 'y'} <= set(v) for v in out.values()):
                raise C.UserError(f'{path}: not a feature file')
        except C.UserError as e:  # derived data: make it again rather than block later runs
            C.print0(f'note: {str(e)[:200]}; extracting the features again')
            out = {}
    have = set(out['train']['ids']) if 'train' in out else set()
    wanted, cached = set(train_ids), set(cache['ids'])
    new = [i for i in split['train'] if i in wanted and i in cached and i not in have]
    if out and not new:
        return out
    todo = {part: split[part] for part in ('val', 'test') if part not in out}
    todo['train'] = new
    view = C.preset_params('eval', size=args.size)[0]
    for part, ids in todo.items():
        positions = C.cache_positions(cache, ids)
        if not positions:
            continue
        f, y = C.predict(rt, backbone, cache, positions, args.batch_size, [view])
        got = {'ids': [cache['ids'][k] for k in positions], 'x': f, 'y': y}
        if part == 'train' and args.aug_views:
            got['x_aug'] = augmented(rt, args, backbone, cache, split['train'], positions)
        old = out.get(part)
        out[part] = got if old is None else {  # the train part grows by the new images
            k: old[k] + got[k] if k == 'ids' else
            torch.cat([old[k], got[k]], dim=1 if k == 'x_aug' else 0) for k in got}
    if rt.is_main:
        C.torch_save(out, path)
    return out


def augmented(rt, args, backbone, cache, whole_train, positions):
    """(V, n, D) features of --aug-views random views of the train images at cache
    `positions`, one pass each. An image's views must not depend on which other images are
    extracted with it (other seeds, earlier runs): pass v draws for the whole train part and
    takes these images' draws,
    and the batch-wide antialiasing prefilter is off (it depends on the batch's crops; with a
    cache a little larger than --size, as the Makefile's 40 for 32, crops shrink little)."""
    view = C.preset_params(args.aug, size=args.size, antialias=False)[0]
    where = {i: k for k, i in enumerate(whole_train)}
    pick = torch.tensor([where[cache['ids'][k]] for k in positions], dtype=torch.long)
    side = cache['size']
    drawn = [C.take_params(C.draw_params(view, len(whole_train), side, side,
                                         torch.Generator().manual_seed(v + 1)), pick)
             for v in range(args.aug_views)]
    return torch.stack([C.predict(rt, backbone, cache, positions, args.batch_size, [view],
                                  drawn=[d])[0] for d in drawn])


def fit_logreg(x, y, classes, l2, max_iter, init=None, xt=None):
    """Multinomial logistic regression, full batch, L-BFGS with strong Wolfe line search.
    Loss: mean cross-entropy + l2 * ||W||^2 (bias not penalised). init=(W, b) warm-starts
    (along the L2 grid); xt: x.T made contiguous, when the caller reuses it across fits.
    The gradient is written out, (softmax - onehot) / n, and multiplied by that contiguous
    x.T: autograd's x.T @ grad through a transposed view is ~6x slower on CPU. Returns (W, b)."""
    n, xt = len(x), x.T.contiguous() if xt is None else xt
    onehot = F.one_hot(y, classes).to(x.dtype)
    w0, b0 = init or (x.new_zeros(x.shape[1], classes), x.new_zeros(classes))
    w, b = w0.clone(), b0.clone()
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9,
                            line_search_fn='strong_wolfe')

    def closure():
        logp = torch.log_softmax(torch.addmm(b, x, w), 1)
        r = (logp.exp() - onehot) / n  # d loss / d logits
        w.grad, b.grad = torch.addmm(w, xt, r, beta=2 * l2), r.sum(0)
        return -(logp * onehot).sum() / n + l2 * w.pow(2).sum()

    with torch.no_grad():
        opt.step(closure)
    return w, b


@contextlib.contextmanager
def full_fp32():
    """fp32 matrix products at full precision inside (no TF32 on CUDA; nothing changes on
    the CPU): L-BFGS's line search compares losses to 1e-9, the kNN ranks similarities."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def fit_probe(x, y, classes, grid, max_iter, val=None, device='cpu'):
    """(W, b, l2, val score) of the probe on centred features x (n, D), labels y: along the
    L2 grid from strong to weak, each fit warm-started from the last, the one that labels
    val = (x, y) (centred the same way) with the best balanced accuracy; without val, or
    with one L2 value, the grid's first and score -1. The fits run on `device` in full fp32:
    they are memory-bound matrix products (at the paper's shape, 43,418 x 2,048 and 8
    classes, the six took 11.6 s on two CPU cores; `make bench-gpu` times a seed on a GPU).
    W, b and the scoring stay on the CPU with the features."""
    grid = list(grid)
    xd, yd = x.to(device), y.to(device)
    xt, host = xd.T.contiguous(), lambda wb: tuple(t.cpu() for t in wb)
    with full_fp32():
        if val is None or len(grid) < 2:
            return (*host(fit_logreg(xd, yd, classes, grid[0], max_iter, None, xt)), grid[0],
                    -1.0)
        best, wb = None, None
        for l2 in sorted(grid, reverse=True):
            wb = fit_logreg(xd, yd, classes, l2, max_iter, wb, xt)
            w, b = host(wb)
            score = C.classification_metrics(torch.softmax(val[0] @ w + b, 1), val[1],
                                             classes)['balanced_accuracy']
            if best is None or score > best[3]:
                best = (w, b, l2, score)
        return best


def run_seed(args, row, labelled, feats, classes, device='cpu'):
    """Fit the probe of one seed (row['seed']) on the cached features of its labelled train
    ids (the fits and the kNN on `device`); return its result row."""
    t0, labelled = time.time(), set(labelled)
    tr = feats['train']
    keep = torch.tensor([i in labelled for i in tr['ids']])
    x, y = tr['x'][keep], tr['y'][keep]
    xa = tr['x_aug'][:, keep].flatten(0, 1) if 'x_aug' in tr else x[:0]
    ya = y.repeat(len(xa) // max(1, len(y)))
    xfit, yfit = torch.cat([x, xa]), torch.cat([y, ya])  # the eval view + augmented views
    # centred on the labelled set (conditioning; the bias absorbs the shift), not scaled: the
    # L2 penalty then acts on the features as they are, as in a probe trained by SGD, which
    # scored 1 point higher than standardised features on an 8,000-image test set
    mean = xfit.mean(0)
    norm = lambda f: f - mean
    val = (norm(feats['val']['x']), feats['val']['y']) if 'val' in feats else None
    w, b, best_l2, best = fit_probe(norm(xfit), yfit, classes, args.l2, args.max_iter, val,
                                    device)
    if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
        raise C.UserError(f'seed {row["seed"]}: the probe fit at l2 {best_l2} is not finite; '
                          f'try other --l2 values')
    te = feats['test']
    metrics = C.classification_metrics(torch.softmax(norm(te['x']) @ w + b, 1), te['y'],
                                       classes)
    with full_fp32():  # test x labelled similarities: 91 G multiply-adds at the paper's shape
        knn = C.knn_predict(x.to(device), y.to(device), te['x'].to(device), classes,
                            args.knn_k).cpu()
    knn_acc = (knn.argmax(1) == te['y']).double().mean().item()
    # the val part's balanced accuracy at the chosen L2 (optimistic: it chose the L2), the
    # score that budgets such as --aug-views are chosen by, never the test part's
    val = {'val_balanced_accuracy': round(best, 6)} if best >= 0 else {}
    return dict(row, labels=len(y), metrics=metrics, knn_accuracy=knn_acc, l2=best_l2,
                epochs=0, size=args.size, wall_s=round(time.time() - t0, 2), **val)


def describe(row):
    m = row['metrics']
    return (f'{row["init"]} probe seed {row["seed"]}: accuracy {m["accuracy"]:.4f} balanced '
            f'{m["balanced_accuracy"]:.4f} kNN {row["knn_accuracy"]:.4f} '
            f'(l2 {row["l2"]}, {row["labels"]} labels)')


def main():
    args = get_args()
    args.init_name = args.init_name or args.init
    for path, flag, kind in ((args.cache_dir, '--cache-dir', 'dir'),
                             (args.results, '--results', 'append')):
        C.check_writable(path, flag, kind)
    rt = C.setup_runtime(args.device, args.precision, parallel_seeds=args.parallel == 'seeds')
    ds = C.read_dataset(args.data, args.format)
    split, split_file = C.get_split(ds, args.split, args.protocol)
    backbone, _ = C.make_backbone(args.arch)
    source = C.load_backbone(backbone, args.arch, args.init, args.offline)
    sha = C.state_fingerprint(backbone.state_dict())
    C.check_held_out(args.init, ds, split, sha)
    backbone = backbone.to(rt.device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    every, todo, labelled, short = 0, [], {}, {}  # labelled: (rule, seed) -> train ids
    for per_class, fraction in budgets(args):
        rule = C.labels_rule(per_class, fraction)
        rows = C.pending_rows(args.results, args.seeds, ds, split, split_file,
                              init=args.init_name, init_source=source, arch=args.arch,
                              backbone_sha=sha, protocol='probe', labels_rule=rule,
                              pool_images=C.init_meta(args.init).get('pool_images'))
        every += len(rows)
        rows = C.share(rt, rows, args.seeds)
        for row in rows:
            labelled[rule, row['seed']] = C.labelled_subset(ds, split['train'], row['seed'],
                                                            per_class, fraction)
        if rows:
            short[rule] = C.short_classes(ds, split['train'], per_class)
        todo += rows
    if not every:
        return C.teardown(rt)
    # on rank 0 even when its own seeds are done: the other ranks wait for its cache
    cache = C.prepare_cache(ds, args.cache_size, args.cache_dir, args.workers, args.skip_bad)
    if not todo:
        return C.teardown(rt)
    t0 = time.time()
    feats = features(rt, args, backbone, cache, split, sha, set().union(*labelled.values()))
    C.print0(f'features: {sum(len(v["ids"]) for v in feats.values())} images '
             f'(+{args.aug_views} augmented passes over the train ones) in '
             f'{time.time() - t0:.1f}s')
    if C.state_fingerprint(backbone.state_dict()) != sha:  # frozen means frozen
        raise RuntimeError('the backbone changed while extracting features')

    def run(row):
        rule = row['labels_rule']
        ids = labelled[rule, row['seed']]
        return dict(run_seed(args, row, ids, feats, len(cache['classes']), rt.device),
                    labels_by_class=C.label_counts(ds, ids), labels_short=short[rule])
    C.run_seeds(rt, todo, run, args.results, describe)
    C.teardown(rt)


if __name__ == '__main__':
    C.main_guard(main)
