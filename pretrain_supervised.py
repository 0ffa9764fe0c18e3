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

import common as C


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_data_args(p, size=224, cache_size=256)
    C.add_model_args(p)
    C.add_train_args(p, epochs=90, batch_size=1024, lr=0.1, out='runs/supervised')
    C.add_runtime_args(p)
    g = p.add_argument_group('supervised')
    g.add_argument('--label-smoothing', type=C.number(float, 0, 0.99), default=0.1,
                   help='1 would make every target uniform: nothing left to learn')
    g.add_argument('--weight-decay', type=C.number(float, 0, 1), default=5e-5)
    g.add_argument('--optimizer', default='sgd', choices=['sgd', 'lars', 'adamw'],
                   help='sgd (nesterov momentum 0.9); lars for batches of 4096 and more')
    g.add_argument('--warmup-epochs', type=C.number(float, 0, C.MAX_EPOCHS), default=5)
    g.add_argument('--val-fraction', type=C.number(float, 0, 0.99), default=0.02,
                   help='held out for validation when no --split is given')
    g.add_argument('--aug', default='supervised', choices=list(C.AUG_PRESETS),
                   help='augmentation preset for training (crop and flip)')
    g.add_argument('--min-scale', type=C.number(float, 1e-3, 1), default=None,
                   help='smallest crop area fraction (preset: 0.08); raise it for tiny images')
    return C.parse_args(p, None, argv)


def main():
    args = get_args()
    for path, flag in ((args.out, '--out'), (args.cache_dir, '--cache-dir')):
        C.check_writable(path, flag)
    rt = C.setup_runtime(args.device, args.precision, args.seed)
    local_batch = C.local_batch(args.batch_size, rt.world)
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
    k_of = {i: k for k, i in enumerate(ds['ids'])}
    present = sorted({ds['labels'][k_of[i]] for i in split['train']})
    if len(present) < 2:  # one class: the loss reaches 0 at once and teaches nothing
        raise C.UserError(f'--data {args.data}: the train part holds {len(present)} class(es)'
                          f' ({" ".join(ds["classes"][c] for c in present) or "none"}); '
                          f'supervised pretraining needs at least 2')
    cache = C.prepare_cache(ds, args.cache_size, args.cache_dir, args.workers, args.skip_bad)
    train = C.cache_positions(cache, split['train'])
    val = C.cache_positions(cache, split['val'])
    loader = C.make_loader(cache, train, local_batch, rt.rank, rt.world, seed=args.seed,
                           workers=args.workers, pin=rt.device.type == 'cuda')
    steps_per_epoch = len(loader)
    classes = cache['classes']
    C.print0(f'{len(classes)} classes, train {len(train)}, val {len(val)}, '
             f'{steps_per_epoch} steps/epoch of {args.batch_size}')

    # --- model
    backbone, width = C.make_backbone(args.arch)
    source = C.load_backbone(backbone, args.arch, args.init, args.offline)
    init_sha = C.state_fingerprint(backbone.state_dict())
    held_out = C.split_sha(split) if split['test'] else None
    lineage = C.init_lineage(args.init, init_sha) + [
        C.lineage_entry('pretrain_supervised', args.out, ds['root'], [], held_out)]
    scale = (args.min_scale, 1.0) if args.min_scale else None
    view = C.preset_params(args.aug, size=args.size, scale=scale)[0]
    model, raw, step_fn = C.classifier_task(rt, backbone, width, len(classes), view,
                                            args.label_smoothing, compile=args.compile)
    eval_view = C.preset_params('eval', size=args.size)[0]

    # --- optimiser and schedule
    optimizer = C.make_optimizer({'backbone': raw.backbone, 'head': raw.head}, args.optimizer,
                                 args.lr, args.lr, args.weight_decay, args.batch_size)
    total = args.epochs * steps_per_epoch
    warmup = int(args.warmup_epochs * steps_per_epoch)
    C.warn_if_never_warm(args.warmup_epochs, args.epochs)
    lr_fn = lambda step, g: g['peak_lr'] * C.lr_factor(step, total, warmup, 'cosine', 0.0)

    figures = {}

    def validate(epoch):  # top-1 / top-5 on the validation part, on every rank
        raw.eval()
        logits, labels = C.predict(rt, raw, cache, val, max(1, args.batch_size // rt.world),
                                   [eval_view])
        raw.train()
        top5 = logits.topk(min(5, logits.shape[1]), 1).indices
        figures.update(epoch=epoch, top1=(top5[:, 0] == labels).float().mean().item(),
                       top5=(top5 == labels[:, None]).any(1).float().mean().item())
        C.print0(f'epoch {epoch}: val top-1 {figures["top1"]:.4f} top-5 {figures["top5"]:.4f}')
        return figures

    # --- train (resumes from <out>/ckpt.pt when it was made with the same settings and data)
    config = dict(arch=args.arch, batch_size=args.batch_size, size=args.size,
                  epochs=args.epochs, seed=args.seed, classes=classes, init_sha=init_sha,
                  aug=args.aug, min_scale=args.min_scale, warmup_epochs=args.warmup_epochs,
                  label_smoothing=args.label_smoothing, val_fraction=args.val_fraction,
                  data_root=ds['root'], data_fingerprint=cache['fingerprint'],
                  held_out=C.split_sha(split))
    if rt.is_main:
        C.claim(args.out)  # one process per run folder
    step = C.fit(rt, model, raw, optimizer, loader, step_fn, args.out, total, lr_fn,
                 config=config, seed=args.seed, max_steps=args.max_steps,
                 log_every=args.log_every, ckpt_every=args.ckpt_every,
                 ckpt_minutes=args.ckpt_minutes, nan_at_step=args.nan_at_step,
                 epoch_fn=validate if val else None)
    if val and not figures:
        validate(step / steps_per_epoch)

    # --- hand-off
    C.write_handoff(rt, args.out, raw.backbone, dict(
        script='pretrain_supervised', args=vars(args), init=source, steps=step,
        classes=classes, val=figures, data_root=ds['root'], held_out=held_out,
        lineage=lineage, data_fingerprint=cache['fingerprint'],
        wall_s=round(time.time() - t0, 1)))
    C.print0(f'done: {args.out}/backbone.pt after {step} steps')
    C.teardown(rt)


if __name__ == '__main__':
    C.main_guard(main)
