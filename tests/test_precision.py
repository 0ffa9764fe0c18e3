"""The branches the scripts take on CUDA, exercised on the CPU where torch allows it: bf16
autocast through a Barlow Twins step (the loss still fp32), a fine-tuning seed and a probe
with --precision bf16 --device cpu; channels_last on the CPU; --compile on the CPU (slow)."""
import copy
import json
import math
import time

import pytest
import torch

import common as C
from conftest import ARCH, TINY

CL = torch.channels_last
# bf16 on a CPU without native bf16 instructions is ~10x slower than fp32: 16 px views of 20 px
# images keep those runs to seconds
SMALL = ['--size', '16', '--cache-size', '20']


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as the script runs get (OMP_NUM_THREADS=1): two shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_barlow(seed=0):
    torch.manual_seed(seed)
    backbone, width = C.make_backbone(ARCH)
    return C.SSLModel(backbone, width, '32-32', 'barlow')


def uint8_batch(n=8, side=20, seed=0):
    """(uint8 (n, S, S, 3), labels) as make_loader yields them."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8, generator=g),
            torch.randint(0, 3, (n,), generator=g))


def barlow_step(rt, model, raw, batch, optimizer='lars', size=16):
    """pretrain_barlow.py's step: the two barlow_imagenet views, C.train_step. -> loss."""
    opt = C.make_optimizer({'backbone': raw.backbone, 'projector': raw.projector}, optimizer,
                           0.2, 0.0048, 1e-6, len(batch[0]))
    for g in opt.param_groups:
        g['lr'] = g['peak_lr'] * 0.1
    views = C.preset_params('barlow_imagenet', size=size)
    loss, _ = C.train_step(rt, lambda x, y, gen: model(*C.augment_views(x, views, gen)), opt,
                           C.grad_scaler(rt), batch, C.step_generator(0, 0, 0))
    return loss


# --------------------------------------------------------------------------- bf16 autocast
def test_bf16_barlow_step_on_cpu_autocasts_and_keeps_the_loss_fp32():
    rt = C.setup_runtime('cpu', 'bf16')
    assert (rt.device.type, rt.dtype, rt.precision) == ('cpu', torch.bfloat16, 'bf16')
    assert not C.grad_scaler(rt).is_enabled()  # bf16 needs no loss scaling
    model, raw = C.wrap_model(rt, tiny_barlow())
    seen = {'conv1': [], 'projector': []}
    raw.backbone.conv1.register_forward_hook(lambda m, i, o: seen['conv1'].append(o.dtype))
    raw.projector[-1].register_forward_hook(lambda m, i, o: seen['projector'].append(o.dtype))
    before = {k: v.clone() for k, v in raw.state_dict().items()}
    batch = uint8_batch()
    loss = barlow_step(rt, model, raw, batch)
    # autocast ran the convolutions and the projector in bf16, for both views...
    assert seen == {'conv1': [torch.bfloat16] * 2, 'projector': [torch.bfloat16] * 2}
    # ...and the loss (normalisation, cross-correlation) in fp32
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    params = [p for p in raw.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)  # master weights stay fp32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    assert all(torch.isfinite(p.grad).all() for p in params)
    assert any(p.grad.abs().sum() > 0 for p in raw.backbone.parameters())
    after = raw.state_dict()
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    assert not torch.equal(before['backbone.conv1.weight'], after['backbone.conv1.weight'])

    # the same step in fp32 from the same weights and draws: bf16 changes the loss a little
    rt32 = C.setup_runtime('cpu', 'fp32')
    model32, raw32 = C.wrap_model(rt32, tiny_barlow())
    loss32 = barlow_step(rt32, model32, raw32, batch)
    assert loss.item() == pytest.approx(loss32.item(), rel=0.05)
    assert loss.item() != loss32.item()


def test_bf16_finetune_seed_and_probe_end_to_end(tmp_path, imagefolder, run_scripts):
    """finetune.py (one seed, 2 steps, test-time augmentation) and probe.py (one seed, one
    augmented pass) with --precision bf16 --device cpu: exit 0, a finite result row each."""
    C._cli(['split', '--data', imagefolder, '--protocol', 'random',
            '--out', str(tmp_path / 'split.json')])
    common = ['--data', imagefolder, '--split', tmp_path / 'split.json', *TINY, *SMALL,
              '--precision', 'bf16', '--labels-per-class', '4', '--seeds', '0']
    ft, probe = run_scripts([
        ('finetune.py', [*common, '--epochs', '1', '--max-steps', '2', '--batch-size', '8',
                         '--lr', '1e-3', '--results', tmp_path / 'ft.jsonl',
                         '--cache-dir', tmp_path / 'cache-ft', '--out', tmp_path / 'ft']),
        ('probe.py', [*common, '--aug-views', '1', '--batch-size', '16', '--max-iter', '20',
                      '--knn-k', '5', '--results', tmp_path / 'probe.jsonl',
                      '--cache-dir', tmp_path / 'cache-probe']),
    ], cwd=tmp_path)
    for r, name in ((ft, 'ft'), (probe, 'probe')):
        assert r.returncode == 0, r.stderr[-3000:]
        assert 'note: --precision bf16 on CPU' in r.stdout
        rows = [json.loads(line) for line in (tmp_path / f'{name}.jsonl').read_text().splitlines()]
        assert len(rows) == 1 and rows[0]['seed'] == 0
        m = rows[0]['metrics']
        assert 0 <= m['accuracy'] <= 1 and 0 <= m['balanced_accuracy'] <= 1
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float)), m
    assert [json.loads((tmp_path / 'ft.jsonl').read_text())['steps']] == [2]


# --------------------------------------------------------------------------- channels_last
def test_channels_last_model_on_cpu_gives_the_same_step():
    rt = C.setup_runtime('cpu', 'fp32')
    plain = tiny_barlow()
    last = copy.deepcopy(plain).to(memory_format=CL)
    assert last.backbone.conv1.weight.is_contiguous(memory_format=CL)
    layouts = []
    last.backbone.layer1.register_forward_hook(
        lambda m, i, o: layouts.append(o.is_contiguous(memory_format=CL)))
    batch = uint8_batch(side=40)
    losses = [barlow_step(rt, m, m, batch, optimizer='sgd', size=32) for m in (plain, last)]
    assert layouts == [True, True]  # the convolutions ran in the channels_last layout
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-4, abs=1e-5)
    for (k, a), b in zip(plain.state_dict().items(), last.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), k


@pytest.mark.parametrize('preset', sorted(C.AUG_PRESETS))
def test_augmentations_return_channels_last_fp32_even_under_autocast(preset):
    x = uint8_batch(4, 40)[0].permute(0, 3, 1, 2)  # (B, 3, S, S), as to_device gives it
    g = torch.Generator().manual_seed(0)
    for size in (32, 40):  # 40 on 40 px: the eval view's copy path, nothing resampled
        for view in C.preset_params(preset, size=size):
            d = C.draw_params(view, 4, 40, 40, g)
            with torch.autocast('cpu', dtype=torch.bfloat16):
                y = C.apply_params(x.float() / 255, view, d)
            assert y.shape == (4, 3, size, size) and y.dtype == torch.float32
            assert y.is_contiguous(memory_format=CL), (preset, size)
    y1, y2 = C.augment_views(x.contiguous(), C.preset_params('barlow_imagenet', size=32), g)
    assert y1.is_contiguous(memory_format=CL) and y2.is_contiguous(memory_format=CL)


# --------------------------------------------------------------------------- torch.compile
@pytest.mark.compile
def test_compile_on_cpu_pretrain_barlow(tmp_path, imagefolder, run_script):
    """pretrain_barlow.py --compile for 2 steps on the CPU (inductor's C++ backend): exit 0 and
    a backbone.pt without `_orig_mod.` keys. The shapes are tests/bench_gpu.py --tiny's, so
    the two share inductor's compiled-graph cache."""
    if not hasattr(torch, 'compile'):
        pytest.skip('this torch has no torch.compile')
    t = time.time()
    r = run_script('pretrain_barlow.py', '--data', imagefolder, *TINY, '--compile',
                   '--projector', '64-64', '--batch-size', '16', '--max-steps', '2',
                   '--cache-dir', tmp_path / 'cache', '--out', tmp_path / 'bt',
                   cwd=tmp_path, timeout=900)
    if r.returncode and any(s in r.stderr for s in ('InvalidCxxCompiler', 'CppCompileError',
                                                    'C++ compiler', 'No working C compiler')):
        pytest.skip(f'torch.compile needs a working C++ compiler on the CPU: '
                    f'{r.stderr.strip().splitlines()[-1][:200]}')
    assert r.returncode == 0, r.stderr[-3000:]
    sd = torch.load(tmp_path / 'bt' / 'backbone.pt', weights_only=True)
    assert not [k for k in sd if '_orig_mod.' in k or k.startswith('fc.')]
    backbone, _ = C.make_backbone(ARCH)
    backbone.load_state_dict(sd)  # strict: a plain torchvision-layout backbone
    assert all(torch.isfinite(v.float()).all() for v in sd.values())
    print(f'pretrain_barlow.py --compile, 2 steps on the CPU: {time.time() - t:.0f} s')


# --------------------------------------------------------------------------- fp16 loss scaling
@pytest.mark.parametrize('name', ['sgd', 'adamw', 'lars'])
def test_a_step_the_fp16_scaler_skips_leaves_the_optimizer_as_it_was(name):
    """The fp16 scaler skips a step whose gradients overflow (common at its initial scale of
    65536): the weights must not move then, nor afterwards differ from an optimizer that never
    saw that step. Before, make_optimizer's fused SGD kept uninitialised momentum buffers from
    the skipped first step, and the next step moved the weights by ~1e21."""
    def run(skip_first):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4))
        opt = C.make_optimizer({'net': net}, name, 0.4, 0.4, 1e-4, 256)
        for g in opt.param_groups:
            g['lr'] = g['peak_lr']
        scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 16)
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
        for k, poison in enumerate([True, False, False] if skip_first else [False, False]):
            opt.zero_grad(set_to_none=True)
            loss = net(x).square().mean() * (float('inf') if poison else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if poison:
                assert scaler.get_scale() == 2.0 ** 15  # the step was skipped
        return [p.detach().clone() for p in net.parameters()]
    # the fused kernels are what the CPU and CUDA get, and LARS takes the scale and the
    # overflow flag itself: the paths under test
    opt = C.make_optimizer({'n': torch.nn.Linear(2, 2)}, name, 0.1, 0.1, 0, 256)
    assert opt._step_supports_amp_scaling if name == 'lars' else opt.defaults['fused'] is True
    for a, b in zip(run(skip_first=True), run(skip_first=False)):
        assert torch.isfinite(a).all() and torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_fp16_lars_steps_read_nothing_back_and_equal_unscaled_ones(monkeypatch):
    """LARS unscales and drops an overflowing step on the device (the scaler's
    _step_supports_amp_scaling contract), where the scaler's own skip reads its overflow flag
    with .item() every step: a host wait on CUDA. Under a scale that is a power of 2 the steps
    equal bitwise those of LARS in fp32 given the unscaled gradients, the overflow skipped."""
    def net_and_opt():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4))
        opt = C.make_optimizer({'net': net}, 'lars', 0.4, 0.4, 1e-4, 256)
        for g in opt.param_groups:
            g['lr'] = g['peak_lr']
        return net, opt
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    poisons = [True, False, False, True, False]
    net, opt = net_and_opt()
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 16)

    def no_read(*_):
        raise AssertionError('a value was read back on the host')
    for poison in poisons:
        opt.zero_grad(set_to_none=True)
        loss = net(x).square().mean() * (float('inf') if poison else 1.0)
        scaler.scale(loss).backward()
        with monkeypatch.context() as m:
            for name in ('item', 'tolist', '__bool__', '__float__'):
                m.setattr(torch.Tensor, name, no_read)
            scaler.step(opt)
            scaler.update()
    assert scaler.get_scale() == 2.0 ** 14  # both overflows were seen
    ref, ref_opt = net_and_opt()
    for poison in poisons:
        if poison:
            continue
        ref_opt.zero_grad(set_to_none=True)
        ref(x).square().mean().backward()
        ref_opt.step()
    for a, b in zip(net.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(opt.state[a]['mu'], ref_opt.state[b]['mu'])
               for a, b in zip(net.parameters(), ref.parameters()))
