"""Throughput benchmarks (not tests: timings vary by machine). `make bench` runs them all and
prints one table; every row names what was measured so the figures can be quoted.

    python tests/bench.py                  # everything, sized for a laptop CPU (a few minutes)
    python tests/bench.py --only aug,bt    # a subset: aug, step, optim, cache, bt, probe
    python tests/bench.py --device cuda --only aug,bt   # on a GPU: ResNet-50, 224 px, batch 256

What is measured:
  aug    pairs/s of the batched two-view barlow_imagenet augmentation (256 px uint8 -> 224 px)
         against torchvision's PIL per-sample pipeline, in as many processes as threads here
  step   images/s of a training step (forward, backward, SGD) per model and resolution, the
         share of the step that the batched augmentation of that batch costs, and the step with
         common.Conv2d's matrix products on small maps turned off (MATMUL_PIXELS = 0)
  cache  one epoch read from the uint8 cache against decoding the JPEGs
  bt     bare backbone forward+backward images/s against the full Barlow Twins step
         (augmentation, projector, loss, LARS) pairs/s at the same batch; target >= 0.85 x /2
         (CPU: ResNet-18 at 64 and 224 px; CUDA: ResNet-50, 224 px, bf16, channels_last)
  probe  probe.py's cached-feature logistic regression against a 100-epoch linear probe
         through the frozen network with augmentation (Facebook's evaluate.py protocol)
"""
import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402

ROWS = []


def row(what, value, unit, note=''):
    ROWS.append((what, value, unit, note))
    print(f'  {what}: {value:,.1f} {unit} {note}', flush=True)


def timed(fn, reps, warmup=1, device='cpu'):
    """Median seconds of fn() over reps runs after warmup runs (synchronising on CUDA)."""
    return timed_together([fn], reps, warmup, device, rounds=1)[0]


def timed_together(fns, reps, warmup=1, device='cpu', rounds=3):
    """Median seconds of each fn over rounds x reps runs. Each round runs every fn in turn,
    warmup runs then reps timed runs, so each is timed in the steady state of repeating
    itself (as in training) while a change of machine load between rounds moves every
    figure alike rather than one of them."""
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    ts = [[] for _ in fns]
    for _ in range(rounds):
        for fn, t_fn in zip(fns, ts):
            for _ in range(warmup):
                fn()
            for _ in range(reps):
                sync()
                t = time.perf_counter()
                fn()
                sync()
                t_fn.append(time.perf_counter() - t)
    return [float(np.median(t_fn)) for t_fn in ts]


def images(n, side, seed=0):
    """(n, side, side, 3) uint8 with structure (smooth blobs), not noise or zeros."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    return (F.interpolate(low, size=side, mode='bicubic').clamp(0, 1) * 255).byte() \
        .permute(0, 2, 3, 1).contiguous()


# --------------------------------------------------------------------------- aug
def _pil_pairs(args):
    import torchvision.transforms.v2 as T
    from PIL import Image
    arr, n = args
    torch.set_num_threads(1)
    base = [T.RandomResizedCrop(224, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip()]
    jitter = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2)]
    tail = [T.ToImage(), T.ToDtype(torch.float32, scale=True),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    t1 = T.Compose(base + jitter + [T.GaussianBlur(23, (0.1, 2.0))] + tail)
    t2 = T.Compose(base + jitter + [T.RandomApply([T.GaussianBlur(23, (0.1, 2.0))], p=0.1),
                                    T.RandomSolarize(128, p=0.2)] + tail)
    for i in range(n):
        im = Image.fromarray(arr[i % len(arr)])
        t1(im), t2(im)
    return n


def bench_aug(args, dev):
    print('aug: barlow_imagenet, two views, 256 px uint8 -> 224 px')
    x = images(args.aug_batch, 256).to(dev).permute(0, 3, 1, 2)
    views = C.preset_params('barlow_imagenet', size=224)
    g = torch.Generator().manual_seed(0)
    s = timed(lambda: C.augment_views(x, views, g), args.reps, device=dev.type)
    batched = args.aug_batch / s
    row(f'batched augmentation ({dev.type}, batch {args.aug_batch})', batched, 'pairs/s')
    procs = torch.get_num_threads()
    arr = images(32, 256).numpy()
    n = max(8, args.aug_batch // procs)
    with mp.get_context('fork').Pool(procs) as pool:
        pool.map(_pil_pairs, [(arr, 2)] * procs)  # warm up the workers
        t = time.perf_counter()
        done = sum(pool.map(_pil_pairs, [(arr, n)] * procs))
        pil = done / (time.perf_counter() - t)
    row(f'torchvision PIL per-sample ({procs} processes)', pil, 'pairs/s',
        f'(batched is {batched / pil:.1f}x)')


# --------------------------------------------------------------------------- step
def bench_step(args, dev):
    print('step: training step (forward + backward + SGD), and the augmentation share')
    for arch, size, batch in args.step_configs:
        model, _ = C.make_backbone(arch)
        model = nn.Sequential(model, nn.Linear(C.ARCHS[arch], 10)).to(dev)
        if dev.type == 'cuda':
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        raw = images(batch, size + size // 8).to(dev).permute(0, 3, 1, 2)
        view = C.preset_params('barlow_imagenet', size=size)[0]
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 10, (batch,), device=dev)
        xin = C.augment(raw, view, g)

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == 'cuda'):
                loss = F.cross_entropy(model(xin), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        def onednn_step():  # every map through oneDNN's convolution (no matrix products)
            pixels, C.MATMUL_PIXELS = C.MATMUL_PIXELS, 0
            try:
                step()
            finally:
                C.MATMUL_PIXELS = pixels
        s_step, s_onednn = timed_together([step, onednn_step], args.reps, device=dev.type)
        s_aug = timed(lambda: C.augment(raw, view, g), args.reps, device=dev.type)
        row(f'{arch} {size}px batch {batch}: train step', batch / s_step, 'img/s',
            f'(augmenting one view: {100 * s_aug / s_step:.1f}% of a step; every map through '
            f'oneDNN: {batch / s_onednn:,.0f} img/s)')


# --------------------------------------------------------------------------- optimiser step
def bench_optim(args, dev):
    print('optim: one optimiser step over a ResNet-18\'s parameters (random gradients)')
    model, _ = C.make_backbone('resnet18')
    params = list(model.to(dev).parameters())
    for q in params:
        q.grad = torch.randn_like(q)
    ours = lambda name: C.make_optimizer({'backbone': model}, name, 1e-3, 1e-3, 0, 256)
    for what, make in (
            ('AdamW, torch default (a loop on the CPU)', lambda: torch.optim.AdamW(params)),
            ('AdamW, fused (make_optimizer)', lambda: ours('adamw')),
            ('SGD nesterov, torch default',
             lambda: torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True)),
            ('SGD nesterov, fused (make_optimizer)', lambda: ours('sgd')),
            ('LARS (make_optimizer)', lambda: ours('lars'))):
        s = timed(make().step, 10 * args.reps, warmup=3, device=dev.type)
        row(f'{what}: step', 1e3 * s, 'ms')


# --------------------------------------------------------------------------- cache
def bench_cache(args, dev):
    from PIL import Image
    print(f'cache: one epoch of {args.cache_images} JPEGs (600x450) -> 256 px')
    with tempfile.TemporaryDirectory() as tmp:
        arr = images(64, 450).numpy()
        os.makedirs(f'{tmp}/img')
        for i in range(args.cache_images):
            Image.fromarray(np.ascontiguousarray(arr[i % 64][:, :])).resize((600, 450)).save(
                f'{tmp}/img/{i:05d}.jpg', quality=90)
        ds = C.read_dataset(f'{tmp}/img', 'folder')
        t = time.perf_counter()
        for p in ds['paths']:  # what a per-epoch PIL pipeline pays: decode + resize
            np.asarray(C.load_image(p).resize((256, 256), Image.BILINEAR))
        decode = time.perf_counter() - t
        cache = C.build_cache(ds, 256, f'{tmp}/cache', workers=0, verbose=False)
        loader = C.make_loader(cache, range(len(cache['ids'])), 64, workers=0)

        def epoch():
            loader.sampler.set_epoch(0)
            for x, _ in loader:
                assert x.shape[0] == 64
        read = timed(epoch, 3)
    row('decode JPEGs (1 process)', args.cache_images / decode, 'img/s')
    row('read from the uint8 cache (1 process)', args.cache_images / read, 'img/s',
        f'({decode / read:.0f}x faster)')


# --------------------------------------------------------------------------- bt
def bench_bt(args, dev):
    """The bare backbone against the full step of each objective (the same backbone, batch
    and projector; augmentation, projector, loss, LARS), timed in alternating rounds."""
    for arch, size, batch, projector in args.bt_configs:
        print(f'bt: {arch} {size}px batch {batch}, projector {projector}')
        backbone, width = C.make_backbone(arch)
        backbone = backbone.to(dev)
        if dev.type == 'cuda':
            backbone = backbone.to(memory_format=torch.channels_last)
        amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == 'cuda')
        x = C.augment(images(batch, size).to(dev).permute(0, 3, 1, 2),
                      C.preset_params('eval', size=size)[0], None)
        plain = torch.optim.SGD(backbone.parameters(), lr=0.0)

        def backbone_step():
            with torch.autocast(**amp):
                loss = backbone(x).float().square().mean()
            plain.zero_grad(set_to_none=True)
            loss.backward()
        raw = images(batch, size + size // 8).to(dev).permute(0, 3, 1, 2)
        views = C.preset_params('barlow_imagenet', size=size)
        g = torch.Generator().manual_seed(0)

        def ssl_step(objective):  # one model per objective around the same backbone
            model = C.SSLModel(backbone, width, projector, objective).to(dev)
            opt = C.make_optimizer({'backbone': model.backbone, 'projector': model.projector},
                                   'lars', 0.2, 0.0048, 1e-6, batch)

            def step():
                with torch.autocast(**amp):
                    loss = model(*C.augment_views(raw, views, g))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return step
        objectives = args.objectives.split(',')
        times = timed_together([backbone_step] + [ssl_step(o) for o in objectives], args.reps,
                               device=dev.type)
        img_s = batch / times[0]
        row(f'bare {arch} forward+backward, {size} px, batch {batch}', img_s, 'img/s')
        for objective, t in zip(objectives, times[1:]):
            pair_s = batch / t
            row(f'full {objective} step, projector {projector}, same batch', pair_s, 'pairs/s',
                f'(ratio to backbone/2: {pair_s / (img_s / 2):.2f}; target >= 0.85)')


# --------------------------------------------------------------------------- probe
def bench_probe(args, dev):
    """Same backbone, same labelled set: probe.py (features once, then a logistic regression
    on the cached features per seed) against 100 epochs of SGD on a linear head through the
    frozen network with the finetune_skin augmentation, as Facebook's evaluate.py does (its
    lr and schedule). Both are scored on the split's test part and, when the data is the
    synthetic skin set, on an independent one of --probe-test-count images (make_synthetic.py
    with another seed), where a 1-point difference is beyond the noise of a few hundred."""
    import subprocess
    import probe
    if not os.path.exists(args.probe_backbone) or not os.path.isdir(args.probe_data):
        print(f'probe: skipped, needs {args.probe_backbone} and {args.probe_data} '
              f'(run `make all` first)')
        return
    print(f'probe: {args.probe_backbone} on {args.probe_data}, {args.arch_probe} '
          f'{args.size_probe}px')
    size, cache_size = args.size_probe, args.size_probe + args.size_probe // 4
    ds = C.read_dataset(args.probe_data)
    split = C.make_split(ds, 'random', seed=0)
    cache = C.build_cache(ds, cache_size, args.cache_dir, workers=0, verbose=False)
    backbone, width = C.make_backbone(args.arch_probe)
    C.load_backbone(backbone, args.arch_probe, args.probe_backbone, offline=True)
    backbone = backbone.to(dev).eval().requires_grad_(False)
    classes = len(ds['classes'])
    labelled = C.labelled_subset(ds, split['train'], 0, per_class=args.probe_labels)
    train, test = C.cache_positions(cache, labelled), C.cache_positions(cache, split['test'])
    eval_view = C.preset_params('eval', size=size)[0]
    rt = C.setup_runtime(dev.type, 'fp32')
    tests = {'test part': (cache, test)}
    stamp = os.path.join(args.probe_data, '.synthetic.json')
    if os.path.exists(stamp) and args.probe_test_count:
        settings = C.read_json(stamp)['settings']  # the same generator, another seed
        root = os.path.abspath(os.path.join(args.cache_dir, f'bench-skin-{args.probe_test_count}'))
        subprocess.run([sys.executable, os.path.join(ROOT, 'make_synthetic.py'), '--out', root,
                        '--only', 'skin', '--skin-count', str(args.probe_test_count),
                        '--seed', str(settings['seed'] + 1), '--size', str(settings['size'])],
                       check=True)
        other = C.read_dataset(os.path.join(root, 'skin'))
        other_cache = C.build_cache(other, cache_size, args.cache_dir, workers=0, verbose=False)
        tests['independent'] = (other_cache, list(range(len(other_cache['ids']))))

    with tempfile.TemporaryDirectory() as tmp:  # --- probe.py: features once, then the fit
        pargs = probe.get_args(['--data', args.probe_data, '--size', str(size),
                                '--cache-dir', tmp])
        pargs.labels_per_class = args.probe_labels  # probe.py's defaults otherwise
        t = time.perf_counter()
        feats = probe.features(rt, pargs, backbone, cache, split, 'bench', labelled)
        extract_s = time.perf_counter() - t
    fast, fit_s = {}, []
    for name, (c, positions) in tests.items():  # the same fit, scored on each test set
        x, y = C.predict(rt, backbone, c, positions, 256, [eval_view])
        t = time.perf_counter()
        r = probe.run_seed(pargs, {'seed': 0}, labelled, dict(feats, test={'x': x, 'y': y}),
                           classes)
        fit_s.append(time.perf_counter() - t)
        fast[name] = r['metrics']
    fit_s = min(fit_s)

    t = time.perf_counter()  # --- 100 epochs through the frozen network with augmentation
    head = nn.Linear(width, classes).to(dev)
    head.weight.data.normal_(0, 0.01)
    head.bias.data.zero_()
    epochs, batch = args.probe_epochs, 32
    opt = torch.optim.SGD(head.parameters(), lr=0.3 * batch / 256, momentum=0.9,
                          weight_decay=1e-6)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loader = C.make_loader(cache, train, batch, drop_last=False, workers=0)
    view = C.preset_params('finetune_skin', size=size)[0]
    g = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for b in loader:
            x, y = C.to_device(b, dev)
            with torch.no_grad():
                f = backbone(C.augment(x, view, g))
            loss = F.cross_entropy(head(f), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    slow_s = time.perf_counter() - t
    slow = {}
    for name, (c, positions) in tests.items():
        logits, labels = C.predict(rt, lambda x: head(backbone(x)), c, positions, 256,
                                   [eval_view])
        slow[name] = C.classification_metrics(torch.softmax(logits, 1), labels, classes)

    def scores(ms, ref=None):
        out = []
        for name, m in ms.items():
            acc, bal = m['accuracy'], m['balanced_accuracy']
            s = f'{name} ({len(tests[name][1])}): acc {acc:.3f} bal {bal:.3f}'
            if ref:
                s += (f' ({100 * (acc - ref[name]["accuracy"]):+.1f}, '
                      f'{100 * (bal - ref[name]["balanced_accuracy"]):+.1f} points)')
            out.append(s)
        return '; '.join(out)
    n_train = len(train)
    row(f'{epochs}-epoch probe through the network, {n_train} labels, one seed', slow_s, 's',
        f'({scores(slow)})')
    row(f'probe.py features once ({n_train} x (1 + {pargs.aug_views} views), val, test)',
        extract_s, 's')
    row('probe.py fit of one seed on the cached features', fit_s, 's',
        f'({slow_s / fit_s:.0f}x faster per seed, {slow_s / (extract_s + fit_s):.0f}x with '
        f'the features; {scores(fast, slow)})')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--only', default='aug,step,optim,cache,bt,probe')
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    p.add_argument('--reps', type=int, default=3)
    p.add_argument('--aug-batch', type=int, help='aug: batch (64 on CPU, 256 on CUDA)')
    p.add_argument('--arch', help='bt: one backbone instead of the default configurations')
    p.add_argument('--size', type=int, help='bt: resolution (with --arch)')
    p.add_argument('--batch', type=int, help='bt: batch (with --arch)')
    p.add_argument('--projector', help='bt: projector (with --arch)')
    p.add_argument('--objectives', default='barlow,vicreg,simclr',
                   help='bt: the objectives timed next to the bare backbone')
    p.add_argument('--cache-images', type=int, default=400)
    p.add_argument('--cache-dir', default='cache')
    p.add_argument('--probe-backbone', default='runs/barlow/backbone.pt')
    p.add_argument('--probe-data', default='data/skin')
    p.add_argument('--arch-probe', default='resnet18')
    p.add_argument('--size-probe', type=int, default=32)
    p.add_argument('--probe-labels', type=int, default=1000,
                   help='labels per class (1000: the whole train part)')
    p.add_argument('--probe-epochs', type=int, default=100)
    p.add_argument('--probe-test-count', type=int, default=8000,
                   help='images of the independent synthetic test set (0: none)')
    args = p.parse_args()
    dev = torch.device('cuda' if args.device == 'cuda' or (
        args.device == 'auto' and torch.cuda.is_available()) else 'cpu')
    if dev.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        args.aug_batch = args.aug_batch or 256
        args.step_configs = [('resnet50', 224, 128)]
        args.bt_configs = [('resnet50', 224, 256, '8192-8192-8192')]  # Facebook's projector
    else:  # projectors 4x the backbone's width, as Facebook's 8192 on ResNet-50's 2048
        args.aug_batch = args.aug_batch or 64
        args.step_configs = [('resnet10', 32, 64), ('resnet18', 32, 64), ('resnet18', 32, 32),
                             ('resnet18', 64, 64), ('resnet50', 224, 8)]
        args.bt_configs = [('resnet18', 64, 64, '2048-2048'), ('resnet18', 224, 32, '2048-2048')]
    if args.arch or args.size or args.batch or args.projector:
        arch, size, batch, projector = args.bt_configs[-1]
        args.bt_configs = [(args.arch or arch, args.size or size, args.batch or batch,
                            args.projector or projector)]
    print(f'device {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads')
    for name in args.only.split(','):
        globals()[f'bench_{name}'](args, dev)
    print('\n| measurement | value | unit | note |\n|---|---|---|---|')
    for what, value, unit, note in ROWS:
        print(f'| {what} | {value:,.1f} | {unit} | {note.strip("()")} |')


if __name__ == '__main__':
    main()
