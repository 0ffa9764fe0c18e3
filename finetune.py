"""Fine-tune a backbone on a small labelled skin-lesion set, over repeated seeds, and append
one result row per seed (every metric on the test part) to results/results.jsonl.

The paper's protocol by default: encoder + Linear(width, classes), cross-entropy, AdamW,
weight decay 0, batch 64; the head alone for --head-epochs (BN trainable; the backbone's
weights held, and given fresh optimizer state after, as fastai's freeze), then everything for
--epochs with a one-cycle schedule; the finetune_skin views; test-time augmentation as the
mean softmax over --tta passes.

One GPU, or the CPU, five seeds of 50 labels per class:
    python finetune.py --data ISIC_2019 --split splits/ISIC_2019-paper.json \\
        --init runs/barlow/backbone.pt --init-name barlow --labels-per-class 50 --seeds 0-4
Several GPUs (the batch is global; each seed uses them all):
    torchrun --standalone --nproc_per_node=4 finetune.py ...
Tiny CPU smoke run:
    python finetune.py --data data/skin --arch resnet18 --size 32 --cache-size 40 \\
        --batch-size 16 --epochs 1 --labels-per-class 4 --seeds 0-1 --out /tmp/ft
In the experiment chain: `make all` (see the Makefile). Seeds already in the results file
are skipped, so an interrupted command continues where it stopped.
Keep the classifiers (--save-model models) and classify new images, or score a split's part:
    python common.py predict --model models/barlow-seed0.pt --data NEW_IMAGES --out preds.csv
"""
import argparse
import hashlib
import os
import re
import shutil
import time

import torch

import common as C


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_data_args(p, size=256, cache_size=256)
    C.add_model_args(p)
    C.add_train_args(p, epochs=40, batch_size=64, lr=4e-3, lr_auto=True, out='runs/finetune',
                     seed=False)
    C.add_runtime_args(p)
    C.add_eval_args(p)
    g = p.add_argument_group('fine-tuning')
    g.add_argument('--head-epochs', type=C.number(float, 0, C.MAX_EPOCHS), default=1,
                   help='epochs training the head alone first (BN stays trainable)')
    g.add_argument('--weight-decay', type=C.number(float, 0, 1), default=0.0)
    g.add_argument('--optimizer', default='adamw', choices=['adamw', 'sgd', 'lars'])
    g.add_argument('--tta', type=C.number(int, 1, 1000), default=3,
                   help='test-time passes (1: the eval view alone); the mean softmax is used')
    g.add_argument('--eval-batch-size', type=C.number(int, 1), default=256,
                   help='images per forward pass at test time (the random passes are drawn per '
                        'batch: it is part of the result, and kept with --save-model)')
    g.add_argument('--class-weights', action='store_true',
                   help='weight the loss by inverse class frequency of the labelled set')
    g.add_argument('--aug', default='finetune_skin', choices=list(C.AUG_PRESETS),
                   help='training augmentation preset')
    g.add_argument('--eval-part', default='test', choices=['test', 'val'],
                   help='the part scored: test for the results; val to choose budgets (epochs, '
                        'lr) without looking at the test part (rows say eval_part: val)')
    g.add_argument('--save-model', default=None, metavar='DIR',
                   help='keep each trained seed\'s classifier as DIR/<init-name>-seed<N>.pt '
                        'for `python common.py predict` (one DIR per labels setting: the '
                        'name does not carry it)')
    return C.parse_args(p, None, argv)


def class_weights(labels, classes):
    """Inverse class frequency of the labelled set, n / (classes x n_c), so that every class
    weighs as much in the loss (sklearn's 'balanced'); a class without labels gets n / classes."""
    counts = torch.bincount(torch.tensor(labels), minlength=classes)
    return counts.sum() / (classes * counts.clamp(min=1))


def run_seed(rt, args, row, ds, split, cache, backbone_sd, width, lineage=()):
    """Train one seed (row['seed']) from the given init; return its result row and its run
    folder (deleted by the caller once the row is safely appended)."""
    t0, seed = time.time(), row['seed']
    torch.manual_seed(seed)
    labelled = C.labelled_subset(ds, split['train'], seed, args.labels_per_class,
                                 args.label_fraction)
    train = C.cache_positions(cache, labelled)
    test = C.cache_positions(cache, split[args.eval_part])  # the val part to choose budgets
    classes = len(cache['classes'])
    batch = min(args.batch_size, len(train) - len(train) % rt.world)
    if batch // rt.world < 2:  # BatchNorm cannot train on one image
        raise C.UserError(f'{len(train)} labelled images cannot make a batch of 2 per rank on '
                          f'{rt.world} rank(s); label more or use fewer processes')
    loader = C.make_loader(cache, train, batch // rt.world, rt.rank, rt.world, seed=seed,
                           workers=args.workers, pin=rt.device.type == 'cuda')
    spe = len(loader)

    backbone, _ = C.make_backbone(args.arch)
    backbone.load_state_dict(backbone_sd)
    # one folder per result key: an interrupted seed resumes only into the same experiment
    tag = hashlib.sha1(repr(C.result_key(row)).encode()).hexdigest()[:10]
    out = os.path.join(args.out, re.sub(r'[^\w.+-]', '_', f'{args.init_name}-seed{seed}-{tag}'))
    view = C.preset_params(args.aug, size=args.size)[0]
    weight = class_weights([cache['labels'][k] for k in train], classes) \
        if args.class_weights else None
    model, raw, step_fn = C.classifier_task(rt, backbone, width, classes, view,
                                            class_weight=weight, compile=args.compile)
    eval_view = C.preset_params('eval', size=args.size)[0]

    def optimizer_at(lr):
        return C.make_optimizer({'backbone': raw.backbone, 'head': raw.head}, args.optimizer,
                                lr, lr, args.weight_decay, batch)

    if rt.is_main:
        C.claim(out)  # two runs of this seed at once would mix checkpoints
    lr, chosen = args.lr, os.path.join(out, 'lr.json')
    if lr == 'auto' and os.path.exists(chosen):  # a resumed seed keeps its choice
        lr = C.read_json(chosen)['lr']
    elif lr == 'auto':
        lr = C.lr_range_test(rt, model, raw, loader, step_fn, optimizer_at(1.0), seed)
        lr = lr * 256 / batch  # as every lr flag: per 256 images
        C.print0(f'seed {seed}: lr range test chose {lr:.3g} per 256 images')
        if rt.is_main:
            C.write_json(chosen, {'lr': lr})
    optimizer = optimizer_at(lr)
    head = int(args.head_epochs * spe)
    total = head + args.epochs * spe
    lr_fn = lambda step, g: C.phase_lr(step, g, total, int(0.25 * (total - head)), 'onecycle',
                                       head)
    config = dict(arch=args.arch, batch_size=batch, size=args.size, epochs=args.epochs,
                  seed=seed, head_epochs=args.head_epochs, aug=args.aug,
                  class_weights=args.class_weights)
    step = C.fit(rt, model, raw, optimizer, loader, step_fn, out, total, lr_fn, config=config,
                 seed=seed, max_steps=args.max_steps, log_every=args.log_every,
                 ckpt_every=args.ckpt_every, ckpt_minutes=args.ckpt_minutes,
                 nan_at_step=args.nan_at_step, head_steps=head)

    raw.eval()
    views = [eval_view] + [view] * (args.tta - 1)
    if step < 1:  # a row must come from training
        raise C.UserError(f'seed {seed}: 0 optimisation steps were taken; no row written')
    probs, labels = C.predict(rt, raw, cache, test, args.eval_batch_size, views,
                              softmax=True, seed=seed, workers=0)
    if args.save_model and rt.is_main:  # the test's settings go along: predict reproduces it
        name = re.sub(r'[^\w.+-]', '_', f'{args.init_name}-seed{seed}') + '.pt'
        C.save_classifier(os.path.join(args.save_model, name), raw, arch=args.arch,
                          classes=cache['classes'], size=args.size, cache_size=args.cache_size,
                          aug=args.aug, tta=args.tta, batch_size=args.eval_batch_size,
                          seed=seed, mean=eval_view['mean'], std=eval_view['std'], result=row,
                          lineage=[*lineage, C.lineage_entry('finetune', args.save_model,
                                                             ds['root'], [], C.split_sha(split))])
    return dict(row, labels=len(labelled), labels_by_class=C.label_counts(ds, labelled),
                metrics=C.classification_metrics(probs, labels, classes), epochs=args.epochs,
                steps=step, lr=lr, tta=args.tta, eval_batch_size=args.eval_batch_size,
                size=args.size,
                wall_s=round(time.time() - t0, 1)), out


def describe(row):
    m = row['metrics']
    return (f'{row["init"]} seed {row["seed"]}: accuracy {m["accuracy"]:.4f} balanced '
            f'{m["balanced_accuracy"]:.4f} macro-F1 {m["macro_f1"]:.4f} '
            f'({row["labels"]} labels, {row["wall_s"]}s)')


def main():
    args = get_args()
    args.init_name = args.init_name or args.init
    for path, flag, kind in ((args.out, '--out', 'dir'), (args.cache_dir, '--cache-dir', 'dir'),
                             (args.results, '--results', 'append'),
                             (args.save_model, '--save-model', 'dir')):
        if path is not None:  # --save-model is optional
            C.check_writable(path, flag, kind)
    rt = C.setup_runtime(args.device, args.precision, parallel_seeds=args.parallel == 'seeds')
    C.local_batch(args.batch_size, rt.world)  # the global batch, split evenly over the ranks
    ds = C.read_dataset(args.data, args.format)
    split, split_file = C.get_split(ds, args.split, args.protocol)
    backbone, width = C.make_backbone(args.arch)
    source = C.load_backbone(backbone, args.arch, args.init, args.offline)
    backbone_sd = {k: v.clone() for k, v in backbone.state_dict().items()}
    sha = C.state_fingerprint(backbone_sd)
    lineage = C.check_held_out(args.init, ds, split, sha)  # what a kept classifier has seen
    if not split[args.eval_part]:
        raise C.UserError(f'--eval-part {args.eval_part}: the split {split_file} has no '
                          f'{args.eval_part} images')
    every = C.pending_rows(args.results, args.seeds, ds, split, split_file,
                           init=args.init_name, init_source=source, arch=args.arch,
                           backbone_sha=sha, protocol='finetune', eval_part=args.eval_part,
                           labels_rule=C.labels_rule(args.labels_per_class, args.label_fraction),
                           pool_images=C.init_meta(args.init).get('pool_images'))
    todo = C.share(rt, every, args.seeds)
    if not every:
        return C.teardown(rt)
    # on rank 0 even when its own seeds are done: the other ranks wait for its cache
    cache = C.prepare_cache(ds, args.cache_size, args.cache_dir, args.workers, args.skip_bad)
    if not todo:
        return C.teardown(rt)
    short = C.short_classes(ds, split['train'], args.labels_per_class)

    def run(row):  # the row, and what to do once it is safely appended
        row, out = run_seed(rt, args, row, ds, split, cache, backbone_sd, width, lineage)
        # the row is the artifact; until it is written, ckpt.pt lets a rerun evaluate the
        # trained seed again instead of losing it
        return dict(row, labels_short=short), lambda: shutil.rmtree(out, ignore_errors=True)
    C.run_seeds(rt, todo, run, args.results, describe)
    C.teardown(rt)


if __name__ == '__main__':
    C.main_guard(main)
