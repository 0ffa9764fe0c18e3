"""Barlow Twins self-supervised pretraining of a ResNet, from scratch or continued from any
initialisation ("further SSL" on unlabelled skin images). `--objective vicreg|simclr` trains
the same backbone, projector, views, loop and hand-off with VICReg's or SimCLR's loss
instead, for comparison runs (the study's method is Barlow Twins).

One GPU, or the CPU:
    python pretrain_barlow.py --data /path/to/imagenet/train --out runs/barlow
One node, 8 GPUs (the batch is global, split over ranks):
    torchrun --standalone --nproc_per_node=8 pretrain_barlow.py --data ... --out runs/barlow
Two nodes: the same on each node with
    torchrun --nnodes=2 --node_rank=R --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 ...
Further pretraining on the train part of a split, the paper's BT_ variant (without --pool
train: every non-test image of the split), its lr picked by a range test as the paper's:
    python pretrain_barlow.py --preset skin --lr auto --data ISIC_2019 \\
        --split splits/x-paper.json --pool train --init barlowtwins --train-blocks last \\
        --out runs/barlow+skinBT
Tiny CPU smoke run:
    python pretrain_barlow.py --data data/source --arch resnet18 --size 32 --cache-size 40 \\
        --batch-size 32 --projector 64-64 --max-steps 5 --out /tmp/bt
In the experiment chain: `make all` (see the Makefile).

Defaults are Facebook's ImageNet recipe; a killed run resumes when started again with the
same command; the hand-off is <out>/backbone.pt (torchvision format, no fc).

Is it learning? Each log line carries the loss's invariance and redundancy terms (also per
projector dimension, comparable across widths), the effective rank (RankMe) and spread of the
batch's backbone features, a warning when the rank collapses, and with --split a cosine kNN
(k=20) of the split's val part on its labelled train part every --monitor-every epochs
(`--monitor-data D --monitor-split S`: on another dataset's split, e.g. the target task of a
run on the source set).
"""
import argparse
import functools
import hashlib
import math
import os
import re
import time

import numpy as np
import torch

import common as C

PRESETS = {  # the paper's further-pretraining settings; explicit flags win
    'skin': dict(batch_size=128, lambd=1 / 8192, weight_decay=1.5e-6, optimizer='adamw',
                 schedule='onecycle', lr=1e-3, lr_biases=1e-3, epochs=100, warmup_epochs=None,
                 head_warmup_epochs=1, aug='barlow_skin', size=256, cache_size=256),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_data_args(p, size=224, cache_size=256)
    C.add_model_args(p)
    C.add_train_args(p, epochs=1000, batch_size=2048, lr=0.2, lr_auto=True, out='runs/barlow')
    C.add_runtime_args(p)
    g = p.add_argument_group('Barlow Twins')
    g.add_argument('--objective', default='barlow', choices=list(C.OBJECTIVES),
                   help='barlow (the study\'s); vicreg or simclr for comparison runs, with '
                        'their published coefficients')
    g.add_argument('--temperature', type=C.number(float, 1e-3), default=0.1,
                   help='simclr only: softmax temperature')
    g.add_argument('--preset', choices=list(PRESETS),
                   help='skin: the paper\'s further-pretraining recipe (batch 128, Adam '
                        'one-cycle, lambda 1/8192, 1 projector-only epoch, its views)')
    g.add_argument('--projector', default='8192-8192-8192', type=projector_widths,
                   help='projector widths; 2048-2048 or narrower for small runs')
    g.add_argument('--lambd', type=C.number(float, 0, 100), default=0.0051,
                   help='weight of the off-diagonal term (1/projector width is the paper\'s)')
    g.add_argument('--lr-biases', type=C.number(float, 0, C.MAX_LR), default=0.0048,
                   help='peak lr of biases and BN parameters, per 256 images')
    g.add_argument('--weight-decay', type=C.number(float, 0, 1), default=1e-6)
    g.add_argument('--optimizer', default='lars', choices=['lars', 'sgd', 'adamw'],
                   help='lars for big batches; adamw (lr ~1e-3) for small-batch users')
    g.add_argument('--schedule', default='cosine', choices=['cosine', 'onecycle', 'constant'])
    g.add_argument('--warmup-epochs', type=C.number(float, 0, C.MAX_EPOCHS), default=10,
                   help='default 10 (Facebook\'s, of 1000); --preset skin: a quarter of '
                        '--epochs, as fastai\'s fit_one_cycle and finetune.py')
    g.add_argument('--head-warmup-epochs', type=C.number(float, 0, C.MAX_EPOCHS), default=0,
                   help='train the projector alone this long first, before --epochs '
                        '(backbone BN stays trainable)')
    g.add_argument('--train-blocks', default='all', choices=['all', 'layer4', 'last'],
                   help='unfreeze the whole backbone, its last stage, or only the last '
                        'residual block (the paper\'s BT_ variant)')
    g.add_argument('--aug', default='barlow_imagenet', choices=['barlow_imagenet', 'barlow_skin'],
                   help='the two views: Facebook\'s ImageNet ones or the paper\'s skin ones')
    g.add_argument('--min-scale', type=C.number(float, 1e-3, 1), default=None,
                   help='smallest crop area fraction of the views (preset: 0.08 ImageNet, '
                        '0.7 skin)')
    g.add_argument('--monitor-every', type=C.number(int, 0), default=None,
                   help='epochs between kNN scores of the --split val part (0: never; '
                        'default: every epoch, but at most 50 times a run on pools under '
                        '20,000 images and 4 times on bigger ones)')
    g.add_argument('--monitor-data', default=None,
                   help='with --monitor-split: score the kNN on this labelled dataset\'s '
                        'split instead (a run on a source set, watched on the target task)')
    g.add_argument('--monitor-split', default=None,
                   help='split JSON of --monitor-data (its train and val parts; never test)')
    g.add_argument('--pool', default='all', choices=['all', 'train'],
                   help='with --split, the images pretrained on: all (every non-test image: '
                        'train, val, unlabelled, the split\'s extra folders) or train (its '
                        'labelled train part alone, as the paper\'s BT_ rows; val then stays '
                        'unseen by pretraining too). --extra-data joins either')
    g.add_argument('--pool-fraction', type=C.number(float, 1e-6, 1), default=1.0,
                   help='pretrain on this seeded share of the pool, whole lesion groups at a '
                        'time (never test images): how much unlabelled data is needed')
    g.add_argument('--extra-data', action='append', default=[],
                   help='an extra folder of unlabelled images for the pool (repeatable); '
                        'refused if it holds images the --split marks as test: by file name, '
                        'by file bytes (sha1) and, once cached, by decoded pixels (sha1 of the '
                        'uint8 image at --cache-size: a losslessly re-encoded copy)')
    args = C.parse_args(p, PRESETS, argv)
    if bool(args.monitor_data) != bool(args.monitor_split):
        p.error('give --monitor-data and --monitor-split together')
    if args.pool == 'train' and not args.split:
        p.error('--pool train needs --split (the split names the train part)')
    return args


def projector_widths(text):
    """'8192-8192-8192': checked here, before any work (the projector is built much later)."""
    if not re.fullmatch(r'[1-9]\d{0,5}(-[1-9]\d{0,5})*', text):
        raise argparse.ArgumentTypeError(f'{text}: expected widths like 8192-8192-8192 '
                                         f'(integers from 1 to 999999)')
    return text


def file_sha1(path):
    h = hashlib.sha1()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def same_bytes(paths, test_paths):
    """The paths whose file bytes equal a test image's (sha1). Only files the size of some
    test image are read: two files of different sizes never match."""
    by_size = {}
    for p in test_paths:
        if '.npz:' not in p:  # an array entry (DermaMNIST) has no file bytes of its own
            by_size.setdefault(os.path.getsize(p), []).append(p)
    sha = functools.lru_cache(maxsize=None)(file_sha1)
    return [p for p in paths
            if any(sha(p) == sha(q) for q in by_size.get(os.path.getsize(p), ()))]


def same_pixels(cache, pool, test):
    """The positions in `pool` whose cached uint8 pixels equal those of a position in
    `test` (sha1 of each (S, S, 3) image): copies under another name or re-encoded without
    loss. About 0.1 ms per 256 px image."""
    arr = np.load(cache['file'], mmap_mode='r')
    digest = lambda k: hashlib.sha1(arr[k].tobytes()).digest()
    seen = {digest(k) for k in test}
    return [k for k in pool if digest(k) in seen]


def freeze(backbone, train_blocks):
    """requires_grad=False outside the trained part; BN layers stay trainable everywhere, as
    fastai's freeze (the paper's setting)."""
    if train_blocks == 'all':
        return
    keep = backbone.layer4 if train_blocks == 'layer4' else backbone.layer4[-1]
    trained = {id(p) for p in keep.parameters()}
    for m in backbone.modules():
        if not isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            for p in m.parameters(recurse=False):
                p.requires_grad_(id(p) in trained)


def collapse_watch(width, every_logs=3, floor=0.01):
    """log_fn for fit: feature_stats of the batch's features, and one warning line when the
    effective rank stays below floor * width for every_logs logs in a row."""
    low = [0]

    def log_fn(stats):
        if 'features' not in stats:
            return {}
        figures = C.feature_stats(stats['features'])
        low[0] = low[0] + 1 if figures['rankme'] < floor * width else 0
        if low[0] == every_logs:
            C.print0(f'warning: the representation is collapsing (effective rank '
                     f'{figures["rankme"]:.1f} of {width} for {every_logs} logs); try a lower '
                     f'--lr, milder views (--min-scale), or a larger --batch-size')
        return figures
    return log_fn


def monitor_every(epochs, pool_images):
    """The default epochs between kNN monitor passes: every epoch, but at most 50 passes in
    the run's `epochs` on a pool under 20,000 images (there a pass costs 8-14% of an epoch:
    on the paper's split 2,142 eval-view images against the two training views of 4,496
    pairs, or of the train part's 2,554), and at most 4 on a bigger pool; plus the one before
    the first step."""
    return max(1, math.ceil(epochs / (50 if pool_images < 20_000 else 4)))


def schedule(epochs, steps_per_epoch, kind, warmup_epochs, head_epochs=0):
    """(total steps, lr_fn(step, group)): head_epochs of the projector alone, then `epochs` of
    the whole model warming up over warmup_epochs; None: a quarter of them (the skin preset's
    one-cycle, as fastai's fit_one_cycle and finetune.py)."""
    head = int(head_epochs * steps_per_epoch)
    steps = epochs * steps_per_epoch
    warmup = int(0.25 * steps) if warmup_epochs is None else int(warmup_epochs * steps_per_epoch)
    C.warn_if_never_warm(warmup_epochs, epochs)
    return head + steps, lambda step, g: C.phase_lr(step, g, head + steps, warmup, kind, head)


def knn_monitor(rt, backbone, ds, cache, split, size, per_class=25, k=20, batch=256):
    """monitor(epoch) -> {'knn_bal_acc'}: balanced accuracy of a cosine kNN (k=20, the
    probe's) that labels the split's val part from up to per_class labelled train images per
    class (seeded), on the backbone's eval-mode features; never the test part. The eval-view
    inputs are made once; rank 0 computes, the other ranks wait at one barrier."""
    ref = C.labelled_subset(ds, split['train'], seed=0, per_class=per_class)
    parts = [C.cache_positions(cache, ref), C.cache_positions(cache, split['val'])]
    view, inputs = C.preset_params('eval', size=size)[0], []
    for positions in parts:  # eval-view float16 inputs on the CPU, labels
        loader = C.make_loader(cache, positions, batch, shuffle=False, drop_last=False,
                               workers=0)
        xs, ys = zip(*[(C.augment(x.permute(0, 3, 1, 2), view, None).half(), y)
                       for x, y in loader])
        inputs.append((torch.cat(xs), torch.cat(ys)))

    @torch.no_grad()
    def monitor(epoch):
        out, t0 = {}, time.time()
        if rt.is_main:
            was = backbone.training
            backbone.eval()
            with torch.autocast(rt.device.type, dtype=rt.dtype,
                                enabled=rt.dtype != torch.float32):
                feats = [torch.cat([backbone(xb.to(rt.device).float()).float()
                                    for xb in x.split(batch)]).cpu() for x, _ in inputs]
            backbone.train(was)
            (fr, yr), (fv, yv) = zip(feats, [y for _, y in inputs])
            probs = C.knn_predict(fr, yr, fv, len(cache['classes']), k)
            out['knn_bal_acc'] = C.classification_metrics(probs, yv, len(cache['classes']))[
                'balanced_accuracy']
            out['knn_s'] = round(time.time() - t0, 2)  # what the monitor costs
            C.print0(f'epoch {epoch}: kNN on the val part, balanced accuracy '
                     f'{out["knn_bal_acc"]:.4f} ({out["knn_s"]} s)')
        if rt.world > 1:
            torch.distributed.barrier()
        return out
    return monitor


def main():
    args = get_args()
    for path, flag in ((args.out, '--out'), (args.cache_dir, '--cache-dir')):
        C.check_writable(path, flag)
    for path, flag in ((args.monitor_data, '--monitor-data'), (args.monitor_split,
                                                               '--monitor-split')):
        if path and not os.path.exists(path):  # before any work, naming its own flag
            raise C.UserError(f'{flag} {path}: no such file or folder')
    rt = C.setup_runtime(args.device, args.precision, args.seed)
    local_batch = C.local_batch(args.batch_size, rt.world)
    t0 = time.time()

    # --- data: the unlabelled pool (labels ignored), never the split's test images
    ds = C.read_dataset(args.data, args.format)
    ids, test, held_out, root, folders = ds['ids'], [], None, ds['root'], args.extra_data
    split_file_sha = None
    if args.split:
        split = C.load_split(args.split, ds)
        ids, test, held_out = split['pretrain'], split['test'], C.split_sha(split)
        split_file_sha = file_sha1(args.split)
        if args.pool == 'all':
            folders = split['extra'] + folders
        else:
            ids = split['train']
    folders = list(dict.fromkeys(os.path.abspath(f) for f in folders))
    stem = lambda i: os.path.splitext(os.path.basename(i))[0]
    test_stems = {stem(t) for t in test}  # test ids may carry folders and extensions
    path_of = dict(zip(ds['ids'], ds['paths']))
    test_paths = [path_of[i] for i in test]
    seen = {os.path.abspath(p) for p in ds['paths']}
    for folder in folders:  # extra unlabelled images join the pool (one cache)
        extra = C.read_dataset(folder, 'folder')
        twice = [i for i, p in zip(extra['ids'], extra['paths']) if os.path.abspath(p) in seen]
        if twice:  # a folder inside --data (or inside another extra folder)
            raise C.UserError(f'--extra-data {folder}: {len(twice)} image(s) are already in '
                              f'the dataset or an earlier folder: {C.few(twice)}; pass folders '
                              f'that do not overlap')
        seen.update(os.path.abspath(p) for p in extra['paths'])
        leak = [i for i in extra['ids'] if i in test or stem(i) in test_stems]
        copies = set(same_bytes(extra['paths'], test_paths)) if test else set()
        leak += [i for i, p in zip(extra['ids'], extra['paths']) if p in copies and i not in leak]
        if leak:
            raise C.UserError(f'--extra-data {folder}: {len(leak)} image(s) are test images of '
                              f'{args.split} (by name or file bytes): {C.few(leak)}; remove '
                              f'them from the folder')
        extra_ids = [f'{folder}:{i}' for i in extra['ids']]
        # one dataset, one cache; the split's images keep their labels (for the kNN monitor)
        ds = C.make_dataset('mixed', f'{ds["root"]}+{extra["root"]}', ds['classes'],
                            ds['ids'] + extra_ids, ds['paths'] + extra['paths'],
                            ds['labels'] + [-1] * len(extra_ids), ds['groups'] + extra_ids)
        ids = ids + extra_ids
    cache = C.prepare_cache(ds, args.cache_size, args.cache_dir, args.workers, args.skip_bad)
    positions = C.cache_positions(cache, C.pool_subset(ds, ids, args.pool_fraction, args.seed))
    if test:  # a copy under another name, or re-encoded: the same pixels once decoded
        copies = same_pixels(cache, positions, C.cache_positions(cache, test))
        if copies:
            raise C.UserError(f'{len(copies)} pool image(s) have the pixels of test images of '
                              f'{args.split}: {C.few(cache["ids"][k] for k in copies)}; remove '
                              f'those copies from the pool')
    loader = C.make_loader(cache, positions, local_batch, rt.rank, rt.world, seed=args.seed,
                           workers=args.workers, pin=rt.device.type == 'cuda')
    steps_per_epoch = len(loader)
    part = ' (the train part)' if args.pool == 'train' else ''
    C.print0(f'pool: {len(positions)} images{part}, {steps_per_epoch} steps/epoch of '
             f'{args.batch_size}')

    # --- model
    backbone, width = C.make_backbone(args.arch)
    source = C.load_backbone(backbone, args.arch, args.init, args.offline)
    init_sha = C.state_fingerprint(backbone.state_dict())
    lineage = C.init_lineage(args.init, init_sha) + [
        C.lineage_entry('pretrain_barlow', args.out, root, folders, held_out)]
    freeze(backbone, args.train_blocks)
    settings = {'barlow': dict(lambd=args.lambd), 'simclr': dict(temperature=args.temperature),
                'vicreg': {}}[args.objective]
    model, raw = C.wrap_model(rt, C.SSLModel(backbone, width, args.projector, args.objective,
                                             **settings), args.compile)
    views = C.preset_params(args.aug, size=args.size,
                            scale=(args.min_scale, 1.0) if args.min_scale else None)

    def step_fn(x, y, gen):  # (B, 3, S, S) uint8 -> two augmented views -> loss, stats
        return model(*C.augment_views(x, views, gen), stats=True)

    # --- optimiser and schedule; --lr auto: the range test the paper chose its lr by, one lr
    # for every parameter (fastai's), kept in lr.json for a resumed run
    def optimizer_at(lr, lr_biases):
        return C.make_optimizer({'backbone': raw.backbone, 'projector': raw.projector},
                                args.optimizer, lr, lr_biases, args.weight_decay,
                                args.batch_size)
    if rt.is_main:
        C.claim(args.out)  # one process per run folder
    lr, lr_biases, chosen = args.lr, args.lr_biases, os.path.join(args.out, 'lr.json')
    resuming = os.path.exists(os.path.join(args.out, 'ckpt.pt'))  # fit checks its settings
    if lr == 'auto' and resuming and os.path.exists(chosen):
        lr = lr_biases = C.read_json(chosen)['lr']
        C.print0(f'lr: {lr:.3g} per 256 images, as the range test chose for this run ({chosen})')
    elif lr == 'auto':  # a fresh run tests again: an lr.json left without a checkpoint may
        # be another setting's
        lr = lr_biases = C.lr_range_test(rt, model, raw, loader, step_fn, optimizer_at(1.0, 1.0),
                                         args.seed) * 256 / args.batch_size
        C.print0(f'lr range test chose {lr:.3g} per 256 images')
        if rt.is_main:
            C.write_json(chosen, {'lr': lr})
    optimizer = optimizer_at(lr, lr_biases)
    total, lr_fn = schedule(args.epochs, steps_per_epoch, args.schedule, args.warmup_epochs,
                            args.head_warmup_epochs)
    head = total - args.epochs * steps_per_epoch  # the projector-only steps

    # --- monitors: the target task's kNN (with --split), on epochs that `every` divides
    every = monitor_every(args.epochs, len(positions)) if args.monitor_every is None else \
        args.monitor_every
    monitor, target = None, (ds, cache, split) if args.split else None
    if args.monitor_split:  # another dataset's split: its own cache, same size
        mds = C.read_dataset(args.monitor_data, 'auto')
        target = (mds, C.prepare_cache(mds, args.cache_size, args.cache_dir, args.workers,
                                       args.skip_bad), C.load_split(args.monitor_split, mds))
    if target and every and target[1]['classes'] and target[2]['val']:
        knn = knn_monitor(rt, raw.backbone, *target, args.size)
        monitor = lambda epoch: knn(epoch) if epoch % every == 0 else {}
        if not os.path.exists(os.path.join(args.out, 'ckpt.pt')):  # where training starts
            rec = monitor(0)
            if rt.is_main:
                C.append_jsonl(os.path.join(args.out, 'log.jsonl'), dict(step=0, epoch=0, **rec))

    # --- train (resumes from <out>/ckpt.pt when it was made with the same settings, init and
    # pool: then the lineage written at the end holds for every step of the run)
    config = dict(arch=args.arch, batch_size=args.batch_size, size=args.size,
                  epochs=args.epochs, seed=args.seed, projector=args.projector,
                  objective=args.objective, **settings, aug=args.aug, min_scale=args.min_scale,
                  schedule=args.schedule, warmup_epochs=args.warmup_epochs,
                  head_warmup_epochs=args.head_warmup_epochs, train_blocks=args.train_blocks,
                  init_sha=init_sha, data_root=root, held_out=held_out,
                  split_file_sha1=split_file_sha, extra_data=folders, pool=args.pool,
                  pool_fingerprint=cache['fingerprint'], pool_images=len(positions),
                  pool_fraction=args.pool_fraction)
    step = C.fit(rt, model, raw, optimizer, loader, step_fn, args.out, total, lr_fn,
                 config=config, seed=args.seed, max_steps=args.max_steps,
                 log_every=args.log_every, ckpt_every=args.ckpt_every,
                 ckpt_minutes=args.ckpt_minutes, nan_at_step=args.nan_at_step,
                 epoch_fn=monitor, log_fn=collapse_watch(width), head_steps=head)

    # --- hand-off
    C.write_handoff(rt, args.out, raw.backbone, dict(
        script='pretrain_barlow', objective=args.objective, args=vars(args), init=source,
        lr=lr, lr_biases=lr_biases,  # per 256 images: --lr auto's choice
        steps=step, data_root=root, held_out=held_out, lineage=lineage,
        pool=args.pool, pool_images=len(positions), pool_fraction=args.pool_fraction,
        data_fingerprint=cache['fingerprint'], wall_s=round(time.time() - t0, 1)))
    C.print0(f'done: {args.out}/backbone.pt after {step} steps')
    C.teardown(rt)


if __name__ == '__main__':
    C.main_guard(main)
