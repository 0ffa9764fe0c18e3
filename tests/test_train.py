"""The training loop (common.fit) through the real pretrain_barlow.py, as subprocesses with tiny
settings: checkpoint contents, the hand-off files, CPU determinism, resume after SIGKILL and
SIGTERM (bitwise equal to an uninterrupted run), and the non-finite-loss stop."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision

from conftest import ARCH, TINY, script_env, script_path

STEPS = 12  # 90 images / batch 8 = 11 steps per epoch: the runs cross an epoch boundary


def barlow_args(data, out, cache, *extra, log_every=1):
    return ['--data', data, *TINY, '--projector', '32-32', '--batch-size', '8',
            '--max-steps', str(STEPS), '--ckpt-every', '3', '--log-every', str(log_every),
            '--seed', '0', '--cache-dir', cache, '--out', out, *extra]


def read_log(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith('\n')]


def last_step(out):
    return max([r['step'] for r in read_log(os.path.join(out, 'log.jsonl'))], default=0)


def backbone(out):
    return torch.load(os.path.join(out, 'backbone.pt'), weights_only=True)


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def wait_for(proc, cond, what, timeout=120):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f'the run ended (status {proc.returncode}) before {what}')
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail(f'timed out waiting for {what}')
        time.sleep(0.02)


@pytest.fixture(scope='module')
def base(tmp_path_factory, imagefolder, start_script):
    """Two identical uninterrupted runs (run concurrently to save time): 'a' and 'twin'."""
    d = tmp_path_factory.mktemp('train')
    procs = {}
    for name in ('a', 'twin'):
        with open(d / f'{name}.txt', 'w') as log:
            procs[name] = start_script('pretrain_barlow.py', *barlow_args(
                imagefolder, d / name, d / f'cache-{name}'), cwd=d, stdout=log,
                stderr=subprocess.STDOUT)
    for name, p in procs.items():
        assert p.wait(timeout=300) == 0, (d / f'{name}.txt').read_text()[-3000:]
    return d


# --------------------------------------------------------------------------- artifacts
def plain(x):
    """Only JSON-like values: what weights_only loading and meta.json can hold."""
    if isinstance(x, dict):
        return all(isinstance(k, str) and plain(v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return all(plain(v) for v in x)
    return x is None or isinstance(x, (bool, int, float, str))


def test_checkpoint_contents(base):
    ckpt = torch.load(base / 'a' / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == STEPS
    assert {'model', 'optimizer', 'scaler', 'step', 'config'} <= set(ckpt)
    assert plain(ckpt['config']) and ckpt['config']['arch'] == ARCH
    assert ckpt['config']['batch_size'] == 8 and ckpt['config']['projector'] == '32-32'
    assert all(torch.is_tensor(v) for v in ckpt['model'].values())
    assert not [k for k in ckpt['model'] if k.startswith(('module.', '_orig_mod.'))]
    assert ckpt['optimizer']['state'], 'LARS momentum buffers are saved'
    # the final checkpoint holds the same backbone as the hand-off file
    bb = {k[len('backbone.'):]: v for k, v in ckpt['model'].items() if k.startswith('backbone.')}
    assert_same_tensors(bb, backbone(base / 'a'))


def test_backbone_is_a_torchvision_state_dict(base):
    sd = backbone(base / 'a')
    m = {'resnet10': lambda: torchvision.models.resnet.ResNet(
        torchvision.models.resnet.BasicBlock, [1, 1, 1, 1]),
         'resnet18': torchvision.models.resnet18}[ARCH]()
    res = m.load_state_dict(sd, strict=False)
    assert sorted(res.missing_keys) == ['fc.bias', 'fc.weight']
    assert res.unexpected_keys == []
    for k, v in m.state_dict().items():
        if not k.startswith('fc.'):
            assert torch.equal(v, sd[k]), k


def test_meta_and_log(base):
    meta = json.loads((base / 'a' / 'meta.json').read_text())
    assert meta['args']['arch'] == ARCH and meta['args']['max_steps'] == STEPS
    assert meta['versions']['torch'] == torch.__version__
    assert meta['versions']['torchvision'] == torchvision.__version__
    # backbone_sha: sha1 over the sorted names and raw bytes of the tensors, 12 hex digits
    sd = backbone(base / 'a')
    h = hashlib.sha1()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].contiguous().numpy().tobytes())
    assert meta['backbone_sha'] == h.hexdigest()[:12]
    log = read_log(base / 'a' / 'log.jsonl')
    assert [r['step'] for r in log] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(r['loss'])) for r in log)
    assert {'step', 'epoch', 'loss', 'lr', 'img_s', 'eta_s'} <= set(log[-1])


def test_cpu_runs_are_bitwise_reproducible(base):
    assert_same_tensors(backbone(base / 'a'), backbone(base / 'twin'))
    a = json.loads((base / 'a' / 'meta.json').read_text())
    b = json.loads((base / 'twin' / 'meta.json').read_text())
    assert a['backbone_sha'] == b['backbone_sha']


# --------------------------------------------------------------------------- interruptions
@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(base, imagefolder, start_script,
                                                  run_script):
    out = base / 'killed'
    args = barlow_args(imagefolder, out, base / 'cache-a', log_every=2)
    p = start_script('pretrain_barlow.py', *args, cwd=base)
    # a checkpoint write is atomic (temp file + rename): whenever ckpt.pt exists it is whole
    wait_for(p, lambda: (out / 'ckpt.pt').exists() and last_step(out) >= 4,
             'a checkpoint and step 4')
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert not (out / 'backbone.pt').exists(), 'killed after the end: nothing was tested'
    mid = torch.load(out / 'ckpt.pt', weights_only=True)
    saved = mid['step']
    assert 3 <= saved < STEPS and saved % 3 == 0
    r = run_script('pretrain_barlow.py', *args, cwd=base)  # the same command
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'at step {saved}' in r.stdout and 'resumed' in r.stdout
    final = backbone(base / 'a')
    assert_same_tensors(backbone(out), final)
    # the comparison means something: the weights moved between the checkpoint and the end
    assert any(not torch.equal(mid['model']['backbone.' + k], v) for k, v in final.items()
               if k.endswith('weight'))


@pytest.mark.slow
def test_sigterm_checkpoints_exits_and_resumes(base, imagefolder, start_script, run_script):
    out = base / 'term'
    args = barlow_args(imagefolder, out, base / 'cache-a', log_every=2)
    with open(base / 'term.txt', 'w') as log:
        p = start_script('pretrain_barlow.py', *args, cwd=base, stdout=log,
                         stderr=subprocess.STDOUT)
        wait_for(p, lambda: last_step(out) >= 2, 'step 2')  # inside fit: the handler is set
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    text = (base / 'term.txt').read_text()
    # common.fit: checkpoint at the end of the current step, then exit 128 + signal number
    assert p.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert 'Traceback' not in text
    assert 'stopped by signal 15' in text
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    stopped = ckpt['step']
    assert 2 <= stopped < STEPS
    assert stopped == last_step(out)  # saved where it stopped: no step lost, none extra
    assert f'at step {stopped}' in text
    assert not (out / 'backbone.pt').exists()
    bb = {k[len('backbone.'):]: v for k, v in ckpt['model'].items() if k.startswith('backbone.')}
    final = backbone(base / 'a')
    assert any(not torch.equal(bb[k], final[k]) for k in final if k.endswith('weight'))
    r = run_script('pretrain_barlow.py', *args, cwd=base)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'resumed' in r.stdout and f'at step {stopped}' in r.stdout
    assert_same_tensors(backbone(out), final)


@pytest.mark.slow
def test_non_finite_loss_stops_with_last_good_checkpoint(base, imagefolder, run_script):
    out = base / 'nan'
    args = barlow_args(imagefolder, out, base / 'cache-a')
    args[args.index('--ckpt-every') + 1] = '2'
    args[args.index('--max-steps') + 1] = '8'
    r = run_script('pretrain_barlow.py', *args, '--nan-at-step', '5', cwd=base)
    assert r.returncode == 2, r.stderr[-3000:]
    assert 'Traceback' not in r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and 'loss' in err[0] and 'step 5' in err[0], r.stderr
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 4  # the last good one; step 5 was never applied
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())
    assert not (out / 'backbone.pt').exists()
    assert last_step(out) == 5  # steps 0-4 ran (logged as 1-5); step 5 (the 6th) did not


@pytest.mark.slow
def test_non_finite_loss_between_two_checks_keeps_the_last_good_checkpoint(base, imagefolder,
                                                                           run_script):
    """The host reads the loss only at check steps (every --log-every and --ckpt-every
    step): a NaN at step 4 is found at the check of step 6, after the poisoned update, and
    the run stops without writing: the checkpoint of step 3 stays, finite."""
    out = base / 'nan-between'
    args = barlow_args(imagefolder, out, base / 'cache-a', log_every=3)
    args[args.index('--max-steps') + 1] = '8'
    r = run_script('pretrain_barlow.py', *args, '--nan-at-step', '4', cwd=base)
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and 'not finite at step 4' in err[0] and '(step 3)' in err[0], err
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 3
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())
    assert [r['step'] for r in read_log(out / 'log.jsonl')] == [3]  # step 6 was never logged
    assert not (out / 'backbone.pt').exists()


def test_a_finite_loss_with_non_finite_gradients_is_never_checkpointed(tmp_path):
    """The losses a check reads were computed before each update; an update with NaN
    gradients (a finite loss: torch.where's untaken sqrt(-1) branch) is caught by the weights
    at the next check, before anything is saved: the checkpoint of the check before stays."""
    import numpy as np
    import common as C
    rt = C.setup_runtime('cpu', 'fp32', seed=0)
    np.save(tmp_path / 'x.npy', np.random.default_rng(0).integers(0, 256, (32, 8, 8, 3),
                                                                   np.uint8))
    cache = {'file': str(tmp_path / 'x.npy'), 'labels': [i % 2 for i in range(32)]}
    loader = C.make_loader(cache, range(32), batch_size=4, workers=0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 2))
    model, raw = C.wrap_model(rt, net)
    opt = C.make_optimizer({'net': raw}, 'adamw', 1e-3, 1e-3, 0.0, 4)
    steps = [0]

    def step_fn(x, y, gen):
        loss = torch.nn.functional.cross_entropy(model(x.float() / 255), y)
        steps[0] += 1
        if steps[0] == 6:  # step 5, the last before the check at 6: finite, NaN gradients
            w = raw[1].weight.sum()
            loss = loss + torch.where(w > -1e9, torch.zeros(()), torch.sqrt(-w.abs() - 1))
            assert torch.isfinite(loss)
        return loss
    with pytest.raises(C.UserError) as e:
        C.fit(rt, model, raw, opt, loader, step_fn, str(tmp_path / 'run'), 8,
              lambda s, g: g['peak_lr'], config={'k': 1}, log_every=3, ckpt_every=3)
    msg = str(e.value)
    assert msg.startswith('the weights are not finite after 6 steps (epoch 0): a step since '
                          'step 3 had non-finite gradients'), msg
    assert '(step 3) is intact' in msg, msg
    ckpt = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 3
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values())


def test_a_signal_after_the_last_check_is_not_lost(tmp_path):
    """SIGINT during the last epoch_fn (validation after the last step's check): the run
    saves its last step, then the handler it found (here the test's) gets the signal."""
    import numpy as np
    import common as C
    rt = C.setup_runtime('cpu', 'fp32', seed=0)
    np.save(tmp_path / 'x.npy', np.zeros((8, 8, 8, 3), np.uint8))
    loader = C.make_loader({'file': str(tmp_path / 'x.npy'), 'labels': [0, 1] * 4}, range(8),
                           batch_size=4, workers=0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 2))
    model, raw = C.wrap_model(rt, net)
    opt = C.make_optimizer({'net': raw}, 'adamw', 1e-3, 1e-3, 0.0, 4)
    step_fn = lambda x, y, gen: torch.nn.functional.cross_entropy(model(x.float()), y)

    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted(signum)

    def epoch_fn(epoch):
        if epoch == 2:  # the last epoch's validation, after the last check
            signal.raise_signal(signal.SIGINT)
        return {}
    old = signal.signal(signal.SIGINT, handler)
    try:
        with pytest.raises(Interrupted):
            C.fit(rt, model, raw, opt, loader, step_fn, str(tmp_path / 'run'), 4,
                  lambda s, g: g['peak_lr'], epoch_fn=epoch_fn, log_every=1)
        assert signal.getsignal(signal.SIGINT) is handler  # restored, then raised
    finally:
        signal.signal(signal.SIGINT, old)
    assert torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)['step'] == 4


@pytest.mark.slow
def test_ctrl_c_and_a_sigterm_to_the_whole_job_with_loader_workers(base, imagefolder,
                                                                   torch_home):
    """Ctrl-C reaches every process of the terminal's group, a scheduler's SIGTERM every
    process of the job: the loader workers among them. The main process checkpoints and
    exits (130, 143), the workers serve on until it stops them (before: they died at once
    and the run failed with "DataLoader worker exited unexpectedly", saving nothing), and
    the resumed run ends where an uninterrupted one does. A run of its own session, so the
    signal reaches its group only."""
    out = base / 'group'
    args = [sys.executable, script_path('pretrain_barlow.py'),
            *barlow_args(imagefolder, out, base / 'cache-group', log_every=2), '--workers', '2']
    stopped = 0
    for sig in (signal.SIGINT, signal.SIGTERM, None):
        with open(base / 'group.txt', 'w') as log:
            p = subprocess.Popen(args, cwd=base, env=script_env(torch_home), stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
            if sig is None:  # the last run: to the end
                assert p.wait(timeout=300) == 0, (base / 'group.txt').read_text()[-3000:]
                break
            wait_for(p, lambda: last_step(out) >= stopped + 2, f'step {stopped + 2}')
            os.killpg(p.pid, sig)  # from outside the job, as a terminal or a scheduler
            code = p.wait(timeout=120)
        text = (base / 'group.txt').read_text()
        assert code == 128 + sig, text[-3000:]
        assert f'stopped by signal {int(sig)}' in text and 'Traceback' not in text, text
        stopped, prev = torch.load(out / 'ckpt.pt', weights_only=True)['step'], stopped
        assert prev < stopped < STEPS
        t0 = time.time()  # and no worker outlives it
        while time.time() - t0 < 30:
            try:
                os.killpg(p.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail('a loader worker outlived its run')
    assert_same_tensors(backbone(out), backbone(base / 'a'))


def _tiny_fit(rt, base, out):
    """A Linear model's fit over 32 uint8 8x8 images in base/x.npy (made by the caller)."""
    import common as C
    loader = C.make_loader({'file': os.path.join(base, 'x.npy'), 'labels': [0, 1] * 16},
                           range(32), batch_size=4 // rt.world, rank=rt.rank, world=rt.world,
                           workers=0)
    torch.manual_seed(0)
    model, raw = C.wrap_model(rt, torch.nn.Sequential(torch.nn.Flatten(),
                                                      torch.nn.Linear(192, 2)))
    opt = C.make_optimizer({'net': raw}, 'adamw', 1e-3, 1e-3, 0.0, 4)
    step_fn = lambda x, y, gen: torch.nn.functional.cross_entropy(model(x.float() / 255), y)
    return C.fit(rt, model, raw, opt, loader, step_fn, out, 16, lambda s, g: g['peak_lr'],
                 config={'k': 1}, max_steps=2 if rt.world == 1 else 0, log_every=2)


def _rank_of_two(rank, base, port, conn):
    import common as C
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2',
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    try:
        rt = C.setup_runtime('cpu', 'fp32', seed=0)
        conn.send(f'trained {_tiny_fit(rt, base, os.path.join(base, f"rank{rank}"))} steps')
    except C.UserError as e:
        conn.send(str(e))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_a_checkpoint_only_some_ranks_see_is_refused_on_every_rank(tmp_path):
    """Rank 0 writes ckpt.pt and every rank resumes from it; a node that does not share --out
    with rank 0 would start its rank from step 0 while the others resume (DDP broadcast the
    weights before fit loaded them), and the first gradient all-reduce mixes two runs. Two
    gloo ranks whose --out differ, only rank 0's holding a checkpoint: both stop with one
    line, before any step."""
    import multiprocessing
    import socket

    import numpy as np

    import common as C
    np.save(tmp_path / 'x.npy', np.random.default_rng(0).integers(0, 256, (32, 8, 8, 3),
                                                                   np.uint8))
    rt = C.setup_runtime('cpu', 'fp32', seed=0)
    assert _tiny_fit(rt, str(tmp_path), str(tmp_path / 'rank0')) == 2
    before = (tmp_path / 'rank0' / 'ckpt.pt').read_bytes()
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context('fork')
    pipes = [ctx.Pipe() for _ in range(2)]
    procs = [ctx.Process(target=_rank_of_two, args=(r, str(tmp_path), port, pipes[r][1]),
                         daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.time() + 60  # a few seconds when it works
    said = [pipes[r][0].recv() if pipes[r][0].poll(max(0.0, deadline - time.time()))
            else 'nothing' for r in range(2)]
    for p in procs:  # a rank left waiting in a collective (the hang this test is about)
        p.join(5)
        if p.is_alive():
            p.kill()
    ckpt = [tmp_path / f'rank{r}' / 'ckpt.pt' for r in range(2)]  # each its own --out
    assert said == [f'{c} is there for some ranks and not for others: every node must see the '
                    f'same --out (a shared filesystem)' for c in ckpt], said
    assert ckpt[0].read_bytes() == before and not ckpt[1].exists()


def _head_then_all(base, out, max_steps=0, unfreeze=True):
    """fit with 4 head-only steps (phase_lr: the backbone's weights at lr 0), then 8 on all.
    Returns (step, optimizer, the backbone weight)."""
    import common as C
    rt = C.setup_runtime('cpu', 'fp32', seed=0)
    loader = C.make_loader({'file': os.path.join(base, 'x.npy'), 'labels': [0, 1] * 16},
                           range(32), batch_size=4, workers=0)
    torch.manual_seed(0)
    net = torch.nn.ModuleDict(dict(backbone=torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(192, 6), torch.nn.BatchNorm1d(6)),
        head=torch.nn.Linear(6, 2)))
    model, raw = C.wrap_model(rt, net)
    opt = C.make_optimizer({'backbone': raw['backbone'], 'head': raw['head']}, 'adamw', 1e-2,
                           1e-2, 0.0, 4)
    step_fn = lambda x, y, gen: torch.nn.functional.cross_entropy(
        model['head'](model['backbone'](x.float() / 255)), y)
    lr_fn = lambda step, g: C.phase_lr(step, g, 12, 2, 'onecycle', 4)
    step = C.fit(rt, model, raw, opt, loader, step_fn, out, 12, lr_fn, config={'k': 1},
                 max_steps=max_steps, log_every=2,
                 head_steps=4 if unfreeze else 0)
    return step, opt, raw['backbone'][1].weight


def test_weights_held_in_the_head_phase_start_the_rest_with_fresh_state(tmp_path):
    """The backbone's weights stay put in the head-only steps (lr 0) but AdamW built their
    moments from those steps' gradients; fastai's freeze gives them none. unfreeze zeroes
    their state when the head phase ends: their AdamW step count is the 8 steps on all, not
    12, the head's and BN's state runs on; and a run stopped at the phase's end and resumed
    ends bitwise where an uninterrupted one does."""
    import numpy as np

    import common as C
    np.save(tmp_path / 'x.npy', np.random.default_rng(0).integers(0, 256, (32, 8, 8, 3),
                                                                   np.uint8))
    start = _head_then_all(tmp_path, str(tmp_path / 'no-steps'), max_steps=1)[2].clone()
    step, opt, w = _head_then_all(tmp_path, str(tmp_path / 'a'))
    assert step == 12 and not torch.equal(w, start)
    held = C.held_in_head(opt)
    assert [p.shape for p in held] == [torch.Size([6, 192])]
    counts = {tuple(p.shape): float(opt.state[p]['step']) for g in opt.param_groups
              for p in g['params']}
    assert counts == {(6, 192): 8.0, (6,): 12.0, (2, 6): 12.0, (2,): 12.0}
    _, old, _ = _head_then_all(tmp_path, str(tmp_path / 'b'), unfreeze=False)
    assert float(old.state[C.held_in_head(old)[0]]['step']) == 12.0  # what it was
    assert _head_then_all(tmp_path, str(tmp_path / 'c'), max_steps=4)[0] == 4
    _, resumed, w2 = _head_then_all(tmp_path, str(tmp_path / 'c'))
    assert torch.equal(w2, w)
    for a, b in zip(C.held_in_head(resumed), held):
        assert all(torch.equal(resumed.state[a][k], opt.state[b][k]) for k in opt.state[b])
