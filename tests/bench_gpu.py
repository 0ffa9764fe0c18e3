"""GPU throughput of the project's own training and evaluation code paths, as one table with
the targets of a single H200 (`make bench-gpu`). A measurement, not a test: it exits 0 when a
target is missed and says which.

    python tests/bench_gpu.py --out results/bench-gpu.md     # one GPU, at most 7 minutes
    python tests/bench_gpu.py --skip-compile                 # without the torch.compile rows
    python tests/bench_gpu.py --tiny --device cpu            # tiny shapes, seconds (the test)

What is measured (ResNet-50, bf16 autocast, channels_last, each row for --seconds after
warmup steps, the device waited for at both ends of a row, peak memory per row):
  aug      batched two-view barlow_imagenet augmentation, 256 px uint8 -> 224 px, batch 256
  bare     ResNet-50 forward + backward alone on ready inputs, 224 px, batch 256
  barlow   the full Barlow Twins step through common.train_step (two augmented views,
           projector 8192-8192-8192, fp32 loss, LARS) from a pinned uint8 batch, as
           pretrain_barlow.py runs it; its ratio to bare / 2 (two backbone passes per pair);
           the same with --compile (first call timed as compile)
  e2e      the same eager step fed by make_loader from a uint8 cache on disk (8,192 images,
           C.default_workers() processes), against the synthetic-input step
  finetune the paper's fine-tuning step (finetune_skin view, 256 px, batch 64, AdamW) as
           finetune.py runs it, eager and compiled
  tta      common.predict with finetune.py's test-time augmentation (eval view + 2 random
           finetune_skin views, its --eval-batch-size 256, mean softmax)
  syncs    the host's waits for the device (torch.cuda.set_sync_debug_mode('warn'), counted
           over 10 steady-state calls after the timing) in the eager Barlow Twins and
           fine-tuning steps (target 0 a step: the loop reads the device only at its check
           steps) and in one test-time call (target 1: its copy of the outputs at the end);
           where there are more, the first one's traceback is printed
  probe    one probe seed (probe.run_seed: 6 L2 fits on 2,554 x 17 views of 2,048-dimensional
           features, each scored on 2,070 val ones, then the test metrics and kNN on 18,633),
           with all the labelled images and with half, the fits and kNN on the device
Then `make paper`'s cost on one GPU and on 8, computed from these rates (tests/paper_cost.py:
the eager fine-tuning step, as make paper runs it; the test-time row; the end-to-end Barlow
Twins step; the probe seeds).
Targets (one H200): augmentation >= 20,000 pairs/s; Barlow Twins >= 2,500 pairs/s with the
ratio >= 0.9; end to end >= 0.9 of the synthetic-input step; fine-tuning >= 2,500 img/s; no
host wait in a training step.
On the CPU (or with --tiny) the shapes are tiny (resnet10, 32 px, batch 16, projector 64-64)
and the targets are not judged: that run only proves the script works.
"""
import argparse
import gc
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402
import paper_cost  # noqa: E402
import probe  # noqa: E402

CONFIGS = {  # the paper's setting on one GPU, and tiny shapes that run in seconds on a CPU
    'full': dict(arch='resnet50', cache=256, size=224, batch=256, projector='8192-8192-8192',
                 ft_size=256, ft_batch=64, eval_batch=256, classes=8, tta=3, images=8192,
                 probe=(2554, 16, 2070, 18633), width=2048, seconds=8.0, warmup=5),
    'tiny': dict(arch='resnet10', cache=40, size=32, batch=16, projector='64-64',
                 ft_size=32, ft_batch=8, eval_batch=16, classes=3, tta=3, images=64,
                 probe=(24, 2, 12, 48), width=512, seconds=0.3, warmup=1),
}
NVIDIA_SMI = ['nvidia-smi', '--query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,driver_version',
              '--format=csv,noheader']
COMPILE_ESTIMATE_S = 150  # what one compiled model's first call may take on an H200
SYNC_WARNING = 'called a synchronizing CUDA operation'  # torch's, in sync debug mode 'warn'


class AtMost(float):
    """A target that is a ceiling (host waits per step); a plain number is a floor."""


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    p.add_argument('--precision', default='auto', choices=['auto', 'bf16', 'fp16', 'fp32'],
                   help='auto: bf16 autocast on CUDA, fp32 on CPU (as the scripts)')
    p.add_argument('--tiny', action='store_true',
                   help='tiny shapes (resnet10, 32 px, batch 16); the default on the CPU')
    p.add_argument('--seconds', type=C.number(float, 0), default=None,
                   help='timed seconds per row after warmup (default 8; tiny 0.3)')
    p.add_argument('--warmup', type=C.number(int, 1), default=None,
                   help='untimed steps before each row (default 5; tiny 1)')
    p.add_argument('--skip-compile', action='store_true',
                   help='leave out the torch.compile rows (about 1-2 minutes of compiling each)')
    p.add_argument('--workers', type=C.number(int, 0), default=C.default_workers(),
                   help='loader processes of the end-to-end row (default: as the scripts)')
    p.add_argument('--images', type=C.number(int, 1), default=None,
                   help='images in the on-disk uint8 cache (default 8192: 32 steps an epoch, '
                        'so the loader\'s refill at each epoch start weighs little; tiny 64)')
    p.add_argument('--tmp', default=None, help='folder for that cache (default: a temp dir)')
    p.add_argument('--budget-minutes', type=C.number(float, 0), default=7.0,
                   help='skip a row whose estimated cost would take the run past this, counted '
                        'from the process\'s start (default 7: within 8 minutes, its end '
                        'included)')
    p.add_argument('--out', default=None,
                   help='also write the header and table to this file (after every row, so a '
                        'run stopped from outside keeps what it measured)')
    return p.parse_args(argv)


# --------------------------------------------------------------------------- helpers
IMPORTED = time.perf_counter()


def since_start():
    """Seconds since this process started (the interpreter's and torch's imports included):
    Linux's /proc; elsewhere since this module was imported."""
    try:
        with open('/proc/self/stat') as f:
            ticks = int(f.read().rsplit(')', 1)[1].split()[19])  # field 22: start time
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf('SC_CLK_TCK')
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - IMPORTED


def sync(rt):
    if rt.device.type == 'cuda':
        torch.cuda.synchronize(rt.device)


def images(n, side, seed=0):
    """(n, side, side, 3) uint8 with structure (smooth blobs plus grain), not noise or zeros."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    x = F.interpolate(low, size=side, mode='bicubic') + 0.05 * torch.randn(
        n, 3, side, side, generator=g)
    return (x.clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).contiguous()


def host_batch(rt, n, side, classes, seed=0):
    """(uint8 (n, S, S, 3), labels (n,)) as make_loader yields it: pinned when going to CUDA."""
    x = images(n, side, seed)
    y = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))
    if rt.device.type == 'cuda':
        x, y = x.pin_memory(), y.pin_memory()
    return x, y


def measure(rt, step, items, seconds, warmup, min_reps=2):
    """(items per second, reps) of step() in the steady state: `warmup` untimed calls, then
    calls until `seconds` of host time have passed (at least min_reps). The device is waited
    for only at both ends, as the training loop waits only at its check steps; the host runs
    at most a queue's depth ahead, which the final wait includes."""
    for _ in range(warmup):
        step()
    sync(rt)
    reps, t0 = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - t0 < seconds:
        step()
        reps += 1
    sync(rt)
    return reps * items / (time.perf_counter() - t0), reps


def first_call(rt, step):
    """Seconds of the first call (the torch.compile compilation, cudnn autotuning)."""
    sync(rt)
    t = time.perf_counter()
    step()
    sync(rt)
    return time.perf_counter() - t


def count_syncs(rt, call, calls=10, expected=0):
    """Synchronizing CUDA calls per call() in the steady state: torch.cuda.set_sync_debug_mode
    ('warn') counts them over `calls` calls (0.0: the host queued them all without waiting
    for the device). When there are more than `expected` a call, one more call under 'error'
    mode prints where the first one is. On the CPU there is no device queue: a reason, not a
    count."""
    if rt.device.type != 'cuda':
        return 'n/a (CPU: no device queue)'
    sync(rt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            for _ in range(calls):
                call()
        finally:
            torch.cuda.set_sync_debug_mode('default')
    n = sum(SYNC_WARNING in str(w.message) for w in caught)
    if n > expected * calls:  # where the first one is, for whoever removes it
        torch.cuda.set_sync_debug_mode('error')
        try:
            call()
        except RuntimeError:
            print(f'  {n} synchronizing call(s) in {calls} calls; the first one:', flush=True)
            traceback.print_exc()
        finally:
            torch.cuda.set_sync_debug_mode('default')
            sync(rt)
    return n / calls


def reset_peak(rt):
    gc.collect()
    if rt.device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(rt.device)


def peak_gib(rt):
    """CUDA: the row's peak of allocated memory. CPU: the process's peak resident set so
    far (Linux reports KiB), which only grows from row to row."""
    if rt.device.type == 'cuda':
        return torch.cuda.max_memory_allocated(rt.device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def release():
    """Drop compiled code and cached blocks between rows, so each row starts clean."""
    if hasattr(torch, '_dynamo'):
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def nvidia_smi():
    """name, clocks (SM, max SM, memory) and driver of each GPU, or why there is none."""
    try:
        r = subprocess.run(NVIDIA_SMI, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f'(nvidia-smi unavailable: {type(e).__name__})'
    if r.returncode:
        return f'(nvidia-smi failed: {(r.stderr or r.stdout).strip()[:200]})'
    return '; '.join(line.strip() for line in r.stdout.strip().splitlines())


def nvidia_smi_later(delay):
    """nvidia-smi's reading `delay` seconds from now, in a thread: the clocks under load."""
    out = {}
    timer = threading.Timer(delay, lambda: out.update(text=nvidia_smi()))
    timer.daemon = True
    timer.start()
    return timer, out


def environment(rt, args, cfg):
    """The header lines: device, clocks, versions, host, settings."""
    cuda = rt.device.type == 'cuda'
    lines = []
    if cuda:
        prop = torch.cuda.get_device_properties(rt.device)
        lines.append(f'device: {torch.cuda.get_device_name(rt.device)} ({rt.device}), '
                     f'{prop.multi_processor_count} SMs, {prop.total_memory / 2 ** 30:.1f} GiB, '
                     f'compute capability {prop.major}.{prop.minor}')
        lines.append(f'nvidia-smi (name, SM clock, max SM clock, memory clock, driver) at the '
                     f'start: {nvidia_smi()}')
    else:
        lines.append(f'device: CPU ({platform.processor() or platform.machine()}), '
                     f'{torch.get_num_threads()} torch threads')
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    lines.append(f'versions: torch {torch.__version__}, torchvision {torchvision.__version__}, '
                 f'CUDA {torch.version.cuda}, cuDNN {cudnn}, python {platform.python_version()}, '
                 f'numpy {np.__version__}, git {C.git_revision()}')
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    shm = ''  # the loader workers hand their batches over through it (4 a worker in flight)
    if os.path.isdir('/dev/shm'):
        total, _, free = shutil.disk_usage('/dev/shm')
        shm = f', /dev/shm {total / 2 ** 30:.1f} GiB ({free / 2 ** 30:.1f} free)'
    lines.append(f'host: {cores} cores, loader workers {args.workers}{shm}')
    lines.append(f'settings: {cfg["name"]} shapes, {cfg["arch"]}, precision {rt.precision}, '
                 f'channels_last {"on (wrap_model)" if cuda else "off (CPU)"}, '
                 f'{cfg["seconds"]:g} s per row after {cfg["warmup"]} warmup steps; peak memory '
                 + ('per row (max_memory_allocated)' if cuda else
                    'is the process\'s max resident set so far'))
    return lines


# --------------------------------------------------------------------------- the rows
class Table:
    """Rows of (measurement, value, unit, peak GiB, target); a row whose function fails or
    is skipped keeps its place with the reason as its value, and the others still run."""

    def __init__(self, rt, judge, budget_s, out=None, header=(), started=None):
        """budget_s counts from `started` (a time.perf_counter() reading; default now); out:
        a file the table so far is written to after each run()."""
        self.rt, self.judge, self.rows, self.out, self.header = rt, judge, [], out, header
        self.t0 = time.perf_counter() if started is None else started
        self.budget_s = budget_s
        self.broken = None  # why the device can run no more rows (a sticky CUDA error)

    def add(self, what, value, unit, peak=None, target=None):
        self.rows.append(dict(what=what, value=value, unit=unit, peak=peak, target=target))
        v = f'{value:,.2f}' if isinstance(value, float) else value
        print(f'[{time.perf_counter() - self.t0:4.0f} s] {what.strip()}: {v} {unit}'
              + (f' (peak {peak:.2f} GiB)' if peak else ''), flush=True)

    def run(self, names, fn, estimate_s, skip=None):
        """fn() -> values for `names` (a list of (what, unit, target)); each row gets its peak
        memory. skip: a reason to leave them out; so is a budget the estimate would overrun."""
        left = self.budget_s - (time.perf_counter() - self.t0)
        skip = skip or self.broken
        if skip is None and estimate_s > left:
            skip = f'skipped (time budget: {left:.0f} s left, about {estimate_s:.0f} s needed)'
        if skip:
            for what, unit, target in names:
                self.add(what, skip, unit, target=target)
            return None
        reset_peak(self.rt)
        try:
            values = fn()
        except Exception as e:  # noqa: BLE001 -- one failed row must not lose the table
            traceback.print_exc()
            why = (str(e).strip().splitlines() or [''])[0][:120]
            values = [f'failed ({type(e).__name__}: {why})'] * len(names)
        try:  # after a sticky CUDA error (illegal address, device assert) these raise too
            release()
            peak = peak_gib(self.rt)  # the group's peak, shown on its first row
        except Exception as e:  # noqa: BLE001 -- the table so far is still written
            self.broken = f'skipped (the device failed: {type(e).__name__})'
            values, peak = [v if isinstance(v, str) else self.broken for v in values], None
        for k, ((what, unit, target), v) in enumerate(zip(names, values)):
            self.add(what, v, unit, peak if k == 0 and isinstance(v, float) else None, target)
        if self.out:  # what is measured so far, should the run be stopped from outside
            text = self.text(['(partial: the run was still going)'])
            C.atomic_write(self.out, lambda f: f.write(text))
        return values

    def text(self, tail):
        """The report: the header lines, the table, then `tail` (lines)."""
        return '\n'.join(['# bench-gpu', ''] + [f'- {h}' for h in self.header] + [''] +
                         self.markdown() + [''] + tail) + '\n'

    def markdown(self):
        out = ['| measurement | value | unit | peak memory | target | met? |',
               '|---|---|---|---|---|---|']
        for r in self.rows:
            v, t = r['value'], r['target']
            value = (f'{v:,.2f}' if v < 100 else f'{v:,.0f}') if isinstance(v, float) else v
            peak = f'{r["peak"]:.2f} GiB' if r['peak'] else ''
            target = '' if t is None else f'{"<=" if isinstance(t, AtMost) else ">="} {t:,g}'
            met = self.met(r)
            met = '' if met is None else 'not measured' if met == 'unmeasured' else \
                'n/a (tiny)' if not self.judge else 'yes' if met else 'NO'
            out.append(f'| {r["what"]} | {value} | {r["unit"]} | {peak} | {target} | {met} |')
        return out

    def met(self, r):
        """None without a target, 'unmeasured' when skipped or failed, else a bool."""
        if r['target'] is None:
            return None
        if not isinstance(r['value'], float):
            return 'unmeasured'
        if isinstance(r['target'], AtMost):
            return r['value'] <= r['target']
        return r['value'] >= r['target']

    def missed(self):
        return [r['what'].strip() for r in self.rows if self.met(r) is False]

    def unmeasured(self):
        return [r['what'].strip() for r in self.rows if self.met(r) == 'unmeasured']

    def verdict(self):
        if not self.judge:
            return 'targets: not judged for tiny shapes'
        missed, unmeasured = self.missed(), self.unmeasured()
        parts = ([f'targets missed: {"; ".join(missed)}'] if missed else []) + \
            ([f'not measured: {"; ".join(unmeasured)}'] if unmeasured else [])
        return '. '.join(parts) if parts else 'targets: all met'


def bench_aug(rt, cfg):
    """pairs/s of C.augment_views on a uint8 batch already on the device, as a step gets it."""
    x, _ = C.to_device(host_batch(rt, cfg['batch'], cfg['cache'], cfg['classes']), rt.device)
    views = C.preset_params('barlow_imagenet', size=cfg['size'])
    g = torch.Generator().manual_seed(0)
    rate, _ = measure(rt, lambda: C.augment_views(x, views, g), cfg['batch'], cfg['seconds'],
                      cfg['warmup'])
    return [rate]


def bench_bare(rt, cfg):
    """img/s of the backbone's forward + backward alone on ready float inputs (no augmentation,
    projector or optimizer step): the ceiling the Barlow Twins step is compared with."""
    backbone, _ = C.make_backbone(cfg['arch'])
    run, raw = C.wrap_model(rt, backbone)
    x, _ = C.to_device(host_batch(rt, cfg['batch'], cfg['cache'], cfg['classes']), rt.device)
    x = C.augment(x, C.preset_params('eval', size=cfg['size'])[0], None)  # (B, 3, S, S)

    def step():
        with torch.autocast(rt.device.type, dtype=rt.dtype, enabled=rt.dtype != torch.float32):
            loss = run(x).float().square().mean()
        raw.zero_grad(set_to_none=True)
        loss.backward()
    first_call(rt, step)
    return [measure(rt, step, cfg['batch'], cfg['seconds'], cfg['warmup'])[0]]


def barlow_step(rt, cfg, compile=False):
    """pretrain_barlow.py's step: SSLModel (Barlow Twins) through wrap_model, LARS over the
    backbone and projector groups, the two barlow_imagenet views, C.train_step with the
    per-step generator. Returns step(batch)."""
    backbone, width = C.make_backbone(cfg['arch'])
    model, raw = C.wrap_model(rt, C.SSLModel(backbone, width, cfg['projector'], 'barlow'),
                              compile)
    optimizer = C.make_optimizer({'backbone': raw.backbone, 'projector': raw.projector},
                                 'lars', 0.2, 0.0048, 1e-6, cfg['batch'])
    for g in optimizer.param_groups:  # an early warmup step's lr (lr_fn's job in fit)
        g['lr'] = g['peak_lr'] * C.lr_factor(1, 1000, 100)
    views = C.preset_params('barlow_imagenet', size=cfg['size'])
    scaler, count = C.grad_scaler(rt), [0]
    model.train()

    def step_fn(x, y, gen):  # (B, 3, S, S) uint8 -> two augmented views -> loss
        return model(*C.augment_views(x, views, gen))

    def step(batch):
        loss, _ = C.train_step(rt, step_fn, optimizer, scaler, batch,
                               C.step_generator(0, count[0], rt.rank))
        count[0] += 1
        return loss
    return step


def bench_barlow(rt, cfg, compile, during=None):
    """(pairs/s, first step s, host waits a step or None when compiled) of the step on one
    pinned host batch (no loader). during(s) is called just before the timed part (to read
    the clocks under load)."""
    step = barlow_step(rt, cfg, compile)
    batch = host_batch(rt, cfg['batch'], cfg['cache'], cfg['classes'])
    first = first_call(rt, lambda: step(batch))
    if during:
        during(cfg['seconds'])
    rate, _ = measure(rt, lambda: step(batch), cfg['batch'], cfg['seconds'], cfg['warmup'])
    return rate, first, None if compile else count_syncs(rt, lambda: step(batch))


def write_cache(folder, n, side, classes):
    """A uint8 cache as common.build_cache leaves it (the (N, S, S, 3) .npy and the dict)
    without decoding any files: n structured images of side px (1,024 distinct ones at most,
    repeated: the pixels do not change a timing)."""
    file = os.path.join(folder, f'bench-{side}.npy')
    arr = np.lib.format.open_memmap(file, mode='w+', dtype=np.uint8, shape=(n, side, side, 3))
    chunks = [images(min(256, n - s), side, seed=s).numpy() for s in range(0, min(n, 1024), 256)]
    for k, s in enumerate(range(0, n, 256)):
        arr[s:s + 256] = chunks[k % len(chunks)][:n - s]
    arr.flush()
    del arr
    labels = np.random.default_rng(0).integers(0, classes, n).tolist()
    return {'file': file, 'size': side, 'format': 'folder', 'root': folder,
            'classes': [f'c{k}' for k in range(classes)], 'ids': [f'{k:05d}' for k in range(n)],
            'labels': labels, 'groups': [None] * n, 'fingerprint': 'bench', 'bad': []}


def bench_e2e(rt, cfg, cache, workers):
    """pairs/s of the eager step fed by make_loader from the cache on disk, epoch after
    epoch as fit does (set_epoch, persistent workers, pinned batches)."""
    step = barlow_step(rt, cfg)
    loader = C.make_loader(cache, range(len(cache['ids'])), cfg['batch'], workers=workers,
                           pin=rt.device.type == 'cuda')

    def batches(loader):
        epoch = 0
        while True:
            loader.sampler.set_epoch(epoch)
            yield from loader
            epoch += 1
    it = batches(loader)
    first_call(rt, lambda: step(next(it)))  # starts the workers
    # warmup past the batches the workers buffer ahead (prefetch_factor 4 each): a full
    # buffer would hide a loader slower than the step for as many steps
    rate, _ = measure(rt, lambda: step(next(it)), cfg['batch'], cfg['seconds'],
                      cfg['warmup'] + 4 * workers)
    return rate  # the loader's workers stop with it


def finetune_task(rt, cfg, compile=False):
    """finetune.py's step: classifier_task on the finetune_skin view at ft_size, AdamW over
    the backbone and head groups. Returns (step(batch), raw model)."""
    backbone, width = C.make_backbone(cfg['arch'])
    view = C.preset_params('finetune_skin', size=cfg['ft_size'])[0]
    model, raw, step_fn = C.classifier_task(rt, backbone, width, cfg['classes'], view,
                                            compile=compile)
    optimizer = C.make_optimizer({'backbone': raw.backbone, 'head': raw.head}, 'adamw',
                                 4e-3, 4e-3, 0.0, cfg['ft_batch'])
    for g in optimizer.param_groups:
        g['lr'] = g['peak_lr'] * C.lr_factor(1, 1000, 250, 'onecycle')
    scaler, count = C.grad_scaler(rt), [0]
    model.train()

    def step(batch):
        loss, _ = C.train_step(rt, step_fn, optimizer, scaler, batch,
                               C.step_generator(0, count[0], rt.rank))
        count[0] += 1
        return loss
    return step, raw


def bench_finetune(rt, cfg, compile):
    """(img/s, first step s, host waits a step or None when compiled) of the fine-tuning step
    on one pinned host batch at ft_size."""
    step, _ = finetune_task(rt, cfg, compile)
    batch = host_batch(rt, cfg['ft_batch'], max(cfg['ft_size'], cfg['cache']), cfg['classes'])
    first = first_call(rt, lambda: step(batch))
    rate, _ = measure(rt, lambda: step(batch), cfg['ft_batch'], cfg['seconds'], cfg['warmup'])
    return rate, first, None if compile else count_syncs(rt, lambda: step(batch))


def bench_tta(rt, cfg, cache):
    """(img/s, host waits a call) of common.predict as finetune.py calls it after training:
    the raw model in eval mode, the eval view plus tta - 1 finetune_skin views, mean softmax,
    in-process loading."""
    _, raw = finetune_task(rt, cfg)
    raw.eval()
    eval_view = C.preset_params('eval', size=cfg['ft_size'])[0]
    view = C.preset_params('finetune_skin', size=cfg['ft_size'])[0]
    views = [eval_view] + [view] * (cfg['tta'] - 1)
    positions = list(range(len(cache['ids'])))
    batch = cfg['eval_batch']
    C.predict(rt, raw, cache, positions[:2 * batch], batch, views,
              softmax=True)  # warmup: cudnn autotuning of the eval shapes
    call = lambda: C.predict(rt, raw, cache, positions, batch, views, softmax=True)
    rate, _ = measure(rt, call, len(positions), cfg['seconds'], 0, min_reps=1)
    return rate, count_syncs(rt, call, calls=1, expected=1)


def paper_cost_lines(rates, tiny):
    """tests/paper_cost.py's table from the measured rates ({'ft', 'tta', 'bt', 'fit_s'}: the
    eager fine-tuning step, the test-time row, the Barlow Twins step end to end or else on
    synthetic input, {budget: seconds} of a probe seed), the DDP efficiency assumed; a line
    saying why when a rate is missing (the probe's time falls back to the assumed one)."""
    a = paper_cost.ASSUMED
    missing = [k for k in ('ft', 'tta', 'bt') if rates.get(k) is None]
    if missing:
        return [f'not computed: no {", ".join(missing)} rate was measured']
    note = ['(tiny shapes: the arithmetic only, not what make paper costs)', ''] if tiny else []
    fit_s = rates.get('fit_s')
    return note + paper_cost.table(rates['ft'], rates['tta'], rates['bt'],
                                   a['fit_s'] if fit_s is None else fit_s, a['ddp_efficiency'],
                                   source='measured above',
                                   fits='assumed' if fit_s is None else 'measured')


def probe_features(cfg):
    """Cached features as probe.py holds them (train: the eval view and `views` augmented
    views of the labelled images; val; test), shaped as the paper's split under ResNet-50
    (2,554 labelled, 16 views, 2,070 val, 18,633 test, 2,048 dimensions): class centres plus
    spread, non-negative like pooled ReLU outputs."""
    labelled, views, n_val, n_test = cfg['probe']
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(cfg['classes'], cfg['width'], generator=g)

    def part(n, *lead):
        y = torch.arange(n) % cfg['classes']
        return (centres[y] + torch.rand(*lead, n, cfg['width'], generator=g)).relu(), y
    x, y = part(labelled)
    x_aug, _ = part(labelled, views)
    feats = {'train': dict(ids=[f'i{k}' for k in range(labelled)], x=x, y=y, x_aug=x_aug)}
    for name, n in (('val', n_val), ('test', n_test)):
        feats[name] = dict(zip(('x', 'y'), part(n)), ids=[f'{name}{k}' for k in range(n)])
    return feats


def bench_probe_seed(rt, cfg):
    """Seconds of one probe seed (probe.run_seed: its L2 grid of fits, each scored on the val
    part, the test metrics and the kNN; the fits and the kNN on the device) with all the
    labelled images and with half of them, as make paper's two budgets."""
    feats = probe_features(cfg)
    args = argparse.Namespace(l2=probe.L2_GRID, max_iter=30, knn_k=20, size=cfg['ft_size'])
    ids = feats['train']['ids']
    out = []
    for labelled in (ids, ids[::2]):
        seed = lambda: probe.run_seed(args, {'seed': 0}, labelled, feats, cfg['classes'],
                                      rt.device)
        rate, _ = measure(rt, seed, 1, cfg['seconds'], 1, min_reps=1)
        out.append(1 / rate)
    return out


# --------------------------------------------------------------------------- main
def main():
    args = get_args()
    if args.device == 'cuda' and not torch.cuda.is_available():  # make bench-gpu's
        raise C.UserError('bench-gpu needs a CUDA GPU and none is visible; on the CPU, '
                          'tests/bench_gpu.py --tiny --device cpu checks the script itself')
    rt = C.setup_runtime(args.device, args.precision)
    cuda = rt.device.type == 'cuda'
    name = 'tiny' if args.tiny or not cuda else 'full'
    cfg = dict(CONFIGS[name], name=name)
    for k in ('seconds', 'warmup', 'images'):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    header = environment(rt, args, cfg)
    print('\n'.join(header), flush=True)
    table = Table(rt, judge=name == 'full', budget_s=60 * args.budget_minutes, out=args.out,
                  header=header, started=time.perf_counter() - since_start())
    row_s = 2 * cfg['seconds'] + 15  # a row's warmup and timing, roughly
    no_compile = 'skipped (--skip-compile)' if args.skip_compile else None
    B, S, P, arch = cfg['batch'], cfg['size'], cfg['projector'], cfg['arch']
    FB, FS = cfg['ft_batch'], cfg['ft_size']

    table.run([(f'batched two-view barlow_imagenet augmentation, {cfg["cache"]} px uint8 -> '
                f'{S} px, batch {B}', 'pairs/s', 20000)], lambda: bench_aug(rt, cfg), row_s)
    bare = table.run([(f'bare {arch} forward+backward, {S} px, batch {B}', 'img/s', None)],
                     lambda: bench_bare(rt, cfg), row_s)
    bare = bare[0] if bare and isinstance(bare[0], float) else None
    load = {}

    def clocks_under_load(seconds):
        if cuda:
            load['timer'], load['out'] = nvidia_smi_later(seconds / 2)

    def barlow(compile):
        rate, first, waits = bench_barlow(rt, cfg, compile,
                                          None if compile else clocks_under_load)
        return [rate, rate / (bare / 2) if bare else 'n/a (no bare row)', first] + \
            ([] if compile else [waits])
    tag = f'Barlow Twins step (projector {P}, LARS), batch {B}'
    waits = ('  its host waits for the device (sync debug mode)', 'syncs/step', AtMost(0))
    eager = table.run([(f'{tag}, synthetic input', 'pairs/s', 2500),
                       ('  its ratio to bare / 2', 'x', 0.9),
                       ('  its first step (allocation, cudnn autotuning)', 's', None), waits],
                      lambda: barlow(False), row_s)

    tmp = args.tmp or tempfile.mkdtemp(prefix='bench-gpu-')
    os.makedirs(tmp, exist_ok=True)
    try:
        t = time.perf_counter()
        cache = write_cache(tmp, cfg['images'], cfg['cache'], cfg['classes'])
        print(f'  wrote a {cfg["images"]}-image {cfg["cache"]} px uint8 cache to {tmp} in '
              f'{time.perf_counter() - t:.1f} s', flush=True)

        def e2e():
            rate = bench_e2e(rt, cfg, cache, args.workers)
            synthetic = eager[0] if eager and isinstance(eager[0], float) else None
            return [rate, rate / synthetic if synthetic else 'n/a (no synthetic row)']
        end = table.run([(f'{tag}, end to end from a {cfg["images"]}-image uint8 cache on '
                          f'disk (loader workers: {args.workers})', 'pairs/s', None),
                         ('  its ratio to the synthetic-input step', 'x', 0.9)], e2e, row_s)
        ft = f'fine-tuning step (finetune_skin, {FS} px, batch {FB}, AdamW)'
        tuned = table.run([(f'{ft}, eager', 'img/s', 2500), waits],
                          lambda: list(bench_finetune(rt, cfg, False)[::2]), row_s)
        tested = table.run([(f'test-time augmentation inference (common.predict, '
                             f'{cfg["tta"]} views, batch {cfg["eval_batch"]}, {FS} px)', 'img/s',
                             None),
                            ('  its host waits for the device (the copy back at the end)',
                             'syncs/call', AtMost(1))],
                           lambda: list(bench_tta(rt, cfg, cache)), row_s)
    finally:
        if not args.tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    labelled, views = cfg['probe'][:2]
    fitted = table.run([(f'probe, one seed of {labelled:,} labelled images x {1 + views} views '
                         f'({len(probe.L2_GRID)} L2 fits, kNN; probe.run_seed)', 's', None),
                        ('  the same with half of them', 's', None)],
                       lambda: bench_probe_seed(rt, cfg), 2 * row_s)

    # the compiled steps last: their compilation is the least predictable cost, and a row the
    # budget leaves out costs nothing else. The second's estimate is the first's compile time
    compiled = table.run([(f'{tag}, --compile', 'pairs/s', 2500),
                          ('  its ratio to bare (eager) / 2', 'x', 0.9),
                          ('  its first step (compilation)', 's', None)],
                         lambda: barlow(True), COMPILE_ESTIMATE_S + row_s, skip=no_compile)
    compile_s = compiled[2] if compiled and isinstance(compiled[2], float) else \
        COMPILE_ESTIMATE_S
    table.run([(f'{ft}, --compile', 'img/s', 2500),
               ('  its first step (compilation)', 's', None)],
              lambda: list(bench_finetune(rt, cfg, True)[:2]), compile_s + row_s,
              skip=no_compile)

    if 'timer' in load:
        load['timer'].join(30)
        header.insert(2, f'nvidia-smi during the eager Barlow Twins step: '
                         f'{load["out"].get("text", "(no reading)")}')
    wall = since_start()
    first = lambda values: values[0] if values and isinstance(values[0], float) else None
    rates = dict(ft=first(tuned), tta=first(tested), bt=first(end) or first(eager),
                 fit_s=None if first(fitted) is None else dict(zip((1.0, 0.5), fitted)))
    text = table.text([f'{table.verdict()} (wall {wall:.0f} s since the process started)', '',
                       "## make paper's cost from these rates", ''] +
                      paper_cost_lines(rates, tiny=name == 'tiny'))
    print('\n' + text, end='', flush=True)
    if args.out:
        C.atomic_write(args.out, lambda f: f.write(text))


if __name__ == '__main__':
    C.main_guard(main)
