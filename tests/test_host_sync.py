"""The host never waits for the device in the steady state (the GPU path, checked on the CPU).

The runs below go on torch's meta device: tensors with shapes and no data. Every operation of
a training step runs there, but anything that reads a value back to the host (`.item()`,
`.tolist()`, `bool(t)`, a copy to the CPU, an op whose output shape depends on the data such
as `nonzero` or a boolean mask) raises. On CUDA each of those makes the host wait for the GPU
queue to drain. So a step that runs on meta queues on a GPU without a wait, and the first
read of a run on meta is the first place a GPU run would stop the queue: these tests check it
is fit's check step (every --log-every or --ckpt-every steps), and for common.predict its
one copy of the outputs at the end.

Not covered by this: waits a run makes without reading a value (an explicit
torch.cuda.synchronize, a blocking host-to-device copy); `make bench-gpu` counts those on a GPU
with torch.cuda.set_sync_debug_mode.
"""
import types

import numpy as np
import pytest
import torch

import common as C
from conftest import ARCH

META_READ = 'meta'  # every message of a refused read names the meta device or meta tensors


@pytest.fixture
def meta(monkeypatch):
    """A runtime on the meta device. torch.autocast knows no 'meta' device type: it is
    given the CPU's (disabled for fp32, as the scripts' CPU runs), a no-op for meta tensors."""
    real = torch.autocast

    class autocast(real):
        def __init__(self, device_type, *a, **k):
            super().__init__('cpu' if device_type == 'meta' else device_type, *a, **k)
    monkeypatch.setattr(torch, 'autocast', autocast)
    return types.SimpleNamespace(device=torch.device('meta'), rank=0, local_rank=0, world=1,
                                 is_main=True, dtype=torch.float32, precision='fp32',
                                 seed_rank=0, seed_ranks=1)


@pytest.fixture
def cache(tmp_path):
    """A uint8 cache of 48 images of 40 px, 3 classes, as build_cache leaves it."""
    x = np.random.default_rng(0).integers(0, 256, (48, 40, 40, 3), np.uint8)
    np.save(tmp_path / 'x.npy', x)
    return {'file': str(tmp_path / 'x.npy'), 'labels': [k % 3 for k in range(48)],
            'classes': ['a', 'b', 'c']}


def ssl_task(rt, objective, optimizer, preset):
    """pretrain_barlow.py's model, optimizer and step (two views, stats for the log)."""
    torch.manual_seed(0)
    backbone, width = C.make_backbone(ARCH)
    model, raw = C.wrap_model(rt, C.SSLModel(backbone, width, '64-64', objective))
    opt = C.make_optimizer({'backbone': raw.backbone, 'projector': raw.projector}, optimizer,
                           0.2, 0.0048, 1e-6, 8)
    views = C.preset_params(preset, size=32)
    return model, raw, opt, lambda x, y, gen: model(*C.augment_views(x, views, gen), stats=True)


def classifier(rt, optimizer, preset):
    """pretrain_supervised.py's and finetune.py's model, optimizer and step."""
    torch.manual_seed(0)
    backbone, width = C.make_backbone(ARCH)
    view = C.preset_params(preset, size=32)[0]
    model, raw, step_fn = C.classifier_task(rt, backbone, width, 3, view)
    opt = C.make_optimizer({'backbone': raw.backbone, 'head': raw.head}, optimizer, 4e-3, 4e-3,
                           0.0, 8)
    return model, raw, opt, step_fn


TASKS = {  # the steps of the scripts' runs, with the optimizers make all and make paper use
    'barlow, LARS, barlow_imagenet views': lambda rt: ssl_task(rt, 'barlow', 'lars',
                                                               'barlow_imagenet'),
    'barlow, AdamW, barlow_skin views (further pretraining)': lambda rt: ssl_task(
        rt, 'barlow', 'adamw', 'barlow_skin'),
    'vicreg, LARS': lambda rt: ssl_task(rt, 'vicreg', 'lars', 'barlow_imagenet'),
    'simclr, LARS': lambda rt: ssl_task(rt, 'simclr', 'lars', 'barlow_imagenet'),
    'supervised, SGD': lambda rt: classifier(rt, 'sgd', 'supervised'),
    'fine-tuning, AdamW, finetune_skin view': lambda rt: classifier(rt, 'adamw',
                                                                    'finetune_skin'),
}


def run_until_first_read(rt, task, cache, out, **fit_kw):
    """C.fit on meta over 48 images in batches of 8 (6 steps an epoch, 30 in all) until its
    first host read. Returns (steps taken by then, the statement of fit that read)."""
    model, raw, opt, step_fn = task(rt)
    calls = [0]

    def counted(x, y, gen):
        calls[0] += 1
        return step_fn(x, y, gen)
    loader = C.make_loader(cache, range(48), batch_size=8, workers=0)
    lr_fn = lambda step, g: C.phase_lr(step, g, 30, 6, 'onecycle', head_steps=6)
    with pytest.raises((RuntimeError, NotImplementedError), match=META_READ) as e:
        C.fit(rt, model, raw, opt, loader, counted, str(out), 30, lr_fn, config={'k': 1},
              **fit_kw)
    frames = [f for f in e.traceback if f.name == 'fit']
    return calls[0], str(frames[-1].statement).strip() if frames else None


@pytest.mark.parametrize('name', list(TASKS))
def test_training_steps_read_nothing_until_fit_checks(meta, cache, tmp_path, name):
    """Steps 1-6 queue with no read (an epoch boundary and the head-only phase's end at step 6
    included); the first read is fit's check of step 7 (--log-every 7), in the line that reads
    its flags."""
    steps, where = run_until_first_read(meta, TASKS[name], cache, tmp_path / 'run',
                                        log_every=7)
    assert steps == 7, (name, steps, where)
    assert where is not None and 'tolist' in where, where


def test_a_checkpoint_step_is_a_check_too(meta, cache, tmp_path):
    """--ckpt-every 3 under --log-every 10: the first read is at step 3, where the checkpoint
    is to be written after the check passed, never before."""
    steps, where = run_until_first_read(meta, TASKS['fine-tuning, AdamW, finetune_skin view'],
                                        cache, tmp_path / 'run', log_every=10, ckpt_every=3)
    assert (steps, 'tolist' in where) == (3, True), (steps, where)
    assert not (tmp_path / 'run' / 'ckpt.pt').exists()


def test_the_meta_device_refuses_what_a_gpu_would_wait_for(meta):
    """The premise of this file: each kind of host read raises on meta."""
    t = torch.ones(4, device='meta')
    for read in (lambda: t.sum().item(), lambda: t.tolist(), lambda: bool(t.sum() > 0),
                 lambda: t.cpu(), lambda: t.nonzero(), lambda: t[t > 0]):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()


def test_predict_reads_once_after_every_batch_and_view(meta, cache):
    """Test-time augmentation (finetune.py's: the eval view and two random ones) over 48
    images in batches of 8: all 6 batches x 3 views are queued before the one read, the copy
    of the outputs at the end."""
    torch.manual_seed(0)
    backbone, width = C.make_backbone(ARCH)
    net = C.Classifier(backbone, width, 3).to('meta').eval()
    calls = [0]

    def fn(x):
        calls[0] += 1
        return net(x)
    views = [C.preset_params('eval', size=32)[0]] + \
        [C.preset_params('finetune_skin', size=32)[0]] * 2
    with pytest.raises((RuntimeError, NotImplementedError), match=META_READ) as e:
        C.predict(meta, fn, cache, list(range(48)), 8, views, softmax=True, seed=3)
    assert calls[0] == 6 * 3
    frames = [f for f in e.traceback if f.name == 'predict']
    assert frames and 'cpu()' in str(frames[-1].statement), e.traceback[-1]
