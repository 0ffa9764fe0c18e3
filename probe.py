"""Linear probe on frozen features, over repeated seeds: does an initialisation give better
features, not only a better starting point? One result row per seed in results/results.jsonl.

The backbone runs once, in eval mode, over the train, val and test parts (the eval view), plus
--aug-views augmented passes over the train part (few labels need augmentation even with
frozen features); the features are cached per (backbone, dataset, split, size, views). Each
seed then draws its labelled subset and fits a multinomial logistic regression on the cached
features (standardised, full-batch L-BFGS, the L2 strength chosen on the val part by balanced
accuracy from a small grid), plus a cosine kNN (k=20) as a second number. Seconds, where a
100-epoch probe through the network takes minutes (see the README's benchmarks).

    python probe.py --data ISIC_2019 --split splits/ISIC_2019-paper.json \\
        --init runs/barlow/backbone.pt --init-name barlow --labels-per-class 50 --seeds 0-4
Tiny CPU run:
    python probe.py --data data/skin --arch resnet18 --size 32 --cache-size 40 \\
        --labels-per-class 4 --seeds 0-1
In the experiment chain: `make all` (see the Makefile).
"""
import argparse
import hashlib
import json
import os
import time

import torch
import torch.nn.functional as F

import common as C

L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, batch_size=256, size=256, cache_size=256)
    C.add_eval_args(p)
    g = p.add_argument_group('probe')
    g.add_argument('--l2', type=l2_grid, default=L2_GRID,
                   help='L2 strengths tried on the val part (comma-separated)')
    g.add_argument('--knn-k', type=int, default=20, help='neighbours of the kNN classifier')
    g.add_argument('--max-iter', type=int, default=30,
                   help='L-BFGS iterations per fit (warm-started along the L2 grid)')
    g.add_argument('--aug-views', type=int, default=4,
                   help='augmented passes over the train part added to the probe\'s training '
                        'features (0: the eval view alone); with few labels they matter')
    g.add_argument('--aug', default='finetune_skin', help='augmentation of those passes')
    args = C.parse_args(p, None, argv)
    if args.knn_k < 1 or args.max_iter < 1 or args.aug_views < 0:
        p.error('--knn-k and --max-iter: at least 1; --aug-views: at least 0')
    return args


def l2_grid(text):
    try:
        grid = tuple(float(v) for v in text.split(','))
        assert grid and all(v >= 0 for v in grid)
        return grid
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f'{text}: comma-separated numbers >= 0, e.g. 1e-4,1e-2')


@torch.no_grad()
def features(rt, args, backbone, index, split, sha):
    """(features, labels) per part, computed once and cached in --cache-dir."""
    parts = json.dumps([split[p] for p in ('train', 'val', 'test')])
    key = hashlib.sha1(f'{sha}|{index["file"]}|{index["fingerprint"]}|{args.size}|'
                       f'{rt.precision}|{args.aug_views}|{args.aug}|{parts}'.encode()
                       ).hexdigest()[:12]
    path = os.path.join(args.cache_dir, f'features-{key}.pt')
    if os.path.exists(path):
        return C.load_checkpoint(path)
    view = C.preset_params('eval', size=args.size)[0]
    out = {}
    for part in ('train', 'val', 'test'):
        rows = C.rows_of(index, split[part])
        if rows:
            f, y = C.predict(rt, backbone, index, rows, args.batch_size, [view])
            out[part] = {'ids': [index['ids'][r] for r in rows], 'x': f, 'y': y}
    if args.aug_views:  # (V, n, D): random views of the train part, one pass each
        view = C.preset_params(args.aug, size=args.size)[0]
        rows = C.rows_of(index, split['train'])
        out['train']['x_aug'] = torch.stack([
            C.predict(rt, backbone, index, rows, args.batch_size, [view], seed=v + 1)[0]
            for v in range(args.aug_views)])
    if rt.is_main:
        C.torch_save(out, path)
    return out


def fit_logreg(x, y, classes, l2, max_iter, init=None):
    """Multinomial logistic regression, full batch, L-BFGS with strong Wolfe line search.
    Loss: mean cross-entropy + l2 * ||W||^2 (bias not penalised). init=(W, b) warm-starts
    (along the L2 grid). Returns (W, b)."""
    w0, b0 = init or (torch.zeros(x.shape[1], classes), torch.zeros(classes))
    w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9,
                            line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def knn_predict(train_x, train_y, x, classes, k=20, t=0.07):
    """Cosine kNN with similarity-weighted votes exp(sim / t), as DINO's; returns probs."""
    a, q = F.normalize(train_x, dim=1), F.normalize(x, dim=1)
    sim, idx = (q @ a.T).topk(min(k, len(a)), dim=1)
    votes = torch.zeros(len(x), classes, dtype=sim.dtype)
    votes.scatter_add_(1, train_y[idx], (sim / t).exp())
    return votes / votes.sum(1, keepdim=True)


def run_seed(args, row, ds, split, feats, classes):
    """Fit the probe of one seed (row['seed']) on cached features; return its result row."""
    t0, seed = time.time(), row['seed']
    labelled = set(C.labelled_subset(ds, split['train'], seed, args.labels_per_class,
                                     args.label_fraction))
    tr = feats['train']
    keep = torch.tensor([i in labelled for i in tr['ids']])
    x, y = tr['x'][keep], tr['y'][keep]
    xa = tr['x_aug'][:, keep].flatten(0, 1) if 'x_aug' in tr else x[:0]
    ya = y.repeat(len(xa) // max(1, len(y)))
    xfit, yfit = torch.cat([x, xa]), torch.cat([y, ya])  # the eval view + augmented views
    mean, std = xfit.mean(0), xfit.std(0).clamp(min=1e-6)  # on the labelled set only
    norm = lambda f: (f - mean) / std
    grid = list(args.l2)
    best_l2, best, wb = grid[0], -1.0, None
    if 'val' in feats and len(grid) > 1:
        for l2 in sorted(grid, reverse=True):  # strong to weak, each warm-started
            wb = fit_logreg(norm(xfit), yfit, classes, l2, args.max_iter, wb)
            probs = torch.softmax(norm(feats['val']['x']) @ wb[0] + wb[1], 1)
            score = C.classification_metrics(probs, feats['val']['y'], classes)
            if score['balanced_accuracy'] > best:
                best_l2, best, (w, b) = l2, score['balanced_accuracy'], wb
    else:
        w, b = fit_logreg(norm(xfit), yfit, classes, best_l2, args.max_iter)
    te = feats['test']
    metrics = C.classification_metrics(torch.softmax(norm(te['x']) @ w + b, 1), te['y'],
                                       classes)
    knn = knn_predict(x, y, te['x'], classes, args.knn_k)
    knn_acc = (knn.argmax(1) == te['y']).double().mean().item()
    return dict(row, labels=len(y), metrics=metrics, knn_accuracy=knn_acc, l2=best_l2,
                epochs=0, size=args.size, wall_s=round(time.time() - t0, 2))


def main():
    args = get_args()
    args.init_name = args.init_name or args.init
    rt = C.setup_runtime(args)
    ds = C.read_dataset(args.data, args.format)
    split, split_file = C.get_split(rt, args, ds)
    index = C.prepare_cache(rt, args, ds)
    backbone, _ = C.make_backbone(args.arch)
    source = C.load_backbone(backbone, args.arch, args.init, args.offline)
    C.check_held_out(args.init, ds, split)
    backbone = backbone.to(rt.device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    sha = C.state_fingerprint(backbone.state_dict())
    t0 = time.time()
    feats = features(rt, args, backbone, index, split, sha)
    C.print0(f'features: {sum(len(v["ids"]) for v in feats.values())} images in '
             f'{time.time() - t0:.1f}s')
    if C.state_fingerprint(backbone.state_dict()) != sha:  # frozen means frozen
        raise RuntimeError('the backbone changed while extracting features')
    done = C.done_keys(args.results)
    for seed in C.parse_seeds(args.seeds):
        row = C.result_stub(args, ds, split, split_file, source, sha, 'probe', seed)
        if C.result_key(row) in done:
            C.print0(f'seed {seed}: already in {args.results}, skipped')
            continue
        row = run_seed(args, row, ds, split, feats, len(ds['classes']))
        m = row['metrics']
        C.print0(f'{args.init_name} probe seed {seed}: accuracy {m["accuracy"]:.4f} balanced '
                 f'{m["balanced_accuracy"]:.4f} kNN {row["knn_accuracy"]:.4f} '
                 f'(l2 {row["l2"]}, {row["labels"]} labels)')
        if rt.is_main:
            C.append_jsonl(args.results, row)
    C.teardown(rt)


if __name__ == '__main__':
    C.main_guard(main)
