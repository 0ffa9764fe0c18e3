"""Supervised pretraining of a ResNet on a labelled source dataset (ImageNet-style
ImageFolder, or any labelled format the readers know). The hand-off is the same as
pretrain_barlow.py's: <out>/backbone.pt, a torchvision ResNet state dict without fc.

One GPU, or the CPU:
    python pretrain_supervised.py --data /path/to/imagenet/train --out runs/supervised
One node, 8 GPUs (the batch is global, split over ranks):
    torchrun --standalone --nproc_per_node=8 pretrain_supervised.py --data ... --out ...
Tiny CPU smoke run:
    python pretrain_supervised.py --data data/source --arch resnet18 --size 32 \\
        --cache-size 40 --batch-size 32 --max-steps 5 --out /tmp/sup
In the experiment chain: `make all` (see the Makefile).

Validation: the --split file's val part, or else a seeded, stratified --val-fraction of
--data; top-1/top-5 after every epoch, logged to <out>/log.jsonl.
"""
import argparse
import time

import torch
import torch.nn as nn

import common as C


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, epochs=90, batch_size=1024, lr=0.1, size=224, cache_size=256,
                      out='runs/supervised')
    g = p.add_argument_group('supervised')
    g.add_argument('--label-smoothing', type=float, default=0.1)
    g.add_argument('--weight-decay', type=float, default=5e-5)
    g.add_argument('--optimizer', default='sgd', choices=['sgd', 'lars', 'adamw'],
                   help='sgd (nesterov momentum 0.9); lars for batches of 4096 and more')
    g.add_argument('--warmup-epochs', type=float, default=5)
    g.add_argument('--val-fraction', type=float, default=0.02,
                   help='held out for validation when no --split is given')
    g.add_argument('--aug', default='supervised',
                   help='augmentation preset for training (crop and flip)')
    g.add_argument('--min-scale', type=float, default=None,
                   help='smallest crop area fraction (preset: 0.08); raise it for tiny images')
    return C.parse_args(p, None, argv)


def main():
    args = get_args()
    rt = C.setup_runtime(args)
    t0 = time.time()

    # --- data: train and validation parts of a labelled dataset
    ds = C.read_dataset(args.data, args.format)
    if not ds['classes'] or min(ds['labels']) < 0:
        raise C.UserError(f'--data {args.data}: supervised pretraining needs labels '
                          f'(read as {ds["format"]})')
    if args.split:
        split = C.load_split(args.split, ds)
    else:
        split = C.make_split(ds, 'random', seed=args.seed, test_fraction=0.0,
                             val_fraction=args.val_fraction)
    index = C.prepare_cache(rt, args, ds)
    train_rows, val_rows = C.rows_of(index, split['train']), C.rows_of(index, split['val'])
    loader, sampler = C.make_loader(index, train_rows, args.batch_size // rt.world, rt.rank,
                                    rt.world, seed=args.seed, workers=args.workers,
                                    pin=rt.device.type == 'cuda')
    steps_per_epoch = len(sampler)
    C.print0(f'{len(ds["classes"])} classes, train {len(train_rows)}, val {len(val_rows)}, '
             f'{steps_per_epoch} steps/epoch of {args.batch_size}')

    # --- model
    backbone, width = C.make_backbone(args.arch)
    source = C.load_backbone(backbone, args.arch, args.init, args.offline)
    model, raw = C.wrap_model(rt, C.Classifier(backbone, width, len(ds['classes'])), args.compile)
    scale = (args.min_scale, 1.0) if args.min_scale else None
    view = C.preset_params(args.aug, size=args.size, scale=scale)[0]
    eval_view = C.preset_params('eval', size=args.size)[0]
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    # --- optimiser and schedule
    optimizer = C.make_optimizer({'backbone': raw.backbone, 'head': raw.head}, args.optimizer,
                                 args.lr, args.lr, args.weight_decay, args.batch_size)
    total = args.epochs * steps_per_epoch
    warmup = int(args.warmup_epochs * steps_per_epoch)
    lr_fn = lambda step, g: g['peak_lr'] * C.lr_factor(step, total, warmup, 'cosine', 0.0)

    def step_fn(x, y, gen):
        return criterion(model(C.augment(x, view, gen)), y)

    figures = {}

    def validate(epoch):  # top-1 / top-5 on the validation part, on every rank
        raw.eval()
        logits, labels = C.predict(rt, raw, index, val_rows, max(1, args.batch_size // rt.world),
                                   [eval_view])
        raw.train()
        top5 = logits.topk(min(5, logits.shape[1]), 1).indices
        figures.update(epoch=epoch, top1=(top5[:, 0] == labels).float().mean().item(),
                       top5=(top5 == labels[:, None]).any(1).float().mean().item())
        C.print0(f'epoch {epoch}: val top-1 {figures["top1"]:.4f} top-5 {figures["top5"]:.4f}')
        return figures

    # --- train (resumes from <out>/ckpt.pt), then the hand-off
    step = C.fit(rt, args, model, raw, optimizer, loader, sampler, step_fn, args.out, total,
                 lr_fn, steps_per_epoch, epoch_fn=validate if val_rows else None)
    if val_rows and not figures:
        validate(step / steps_per_epoch)
    C.write_handoff(rt, args.out, raw.backbone, dict(
        script='pretrain_supervised', args=vars(args), init=source, steps=step,
        classes=ds['classes'], val=figures, data_root=ds['root'],
        held_out=C.split_sha(split) if split['test'] else None,
        data_fingerprint=index['fingerprint'],
        wall_s=round(time.time() - t0, 1)))
    C.print0(f'done: {args.out}/backbone.pt after {step} steps')
    C.teardown(rt)


if __name__ == '__main__':
    C.main_guard(main)
