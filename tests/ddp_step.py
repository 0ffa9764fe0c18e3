"""One self-supervised step + LARS under DDP (gloo, CPU), for test_objectives.py's DDP test.
Not collected by pytest; run as

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_step.py \\
        OUTDIR [PROJECTOR:OBJECTIVE ...]

For each configuration (default 64-64:barlow; one launch takes them all, as the test does:
a launch imports torch three times) every rank builds the same model (same seed), takes its
contiguous share of a fixed global batch of two views, and takes one step through
common.wrap_model (DDP) and common.make_optimizer('lars'). OBJECTIVE is a key of
common.OBJECTIVES. PROJECTOR picks the Barlow Twins loss's path: with 64 outputs and a global
batch of 8 it goes through the Gram matrices, with 8 (64-8) through C. Rank 0 saves the loss
(and every rank's), the gradients and the updated parameters to
OUTDIR/ddp-OBJECTIVE-PROJECTOR.pt; the test computes the single-process reference."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402

GLOBAL_BATCH, SIZE, PROJECTOR, LAMBD = 8, 32, '64-64', 0.0051
LR, LR_BIASES, WD = 0.2, 0.0048, 1e-6


def global_views():
    """The fixed global batch: two views (B, 3, S, S) float, from a fixed seed."""
    g = torch.Generator().manual_seed(1234)
    return (torch.randn(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g),
            torch.randn(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g))


def build_model(projector=PROJECTOR, objective='barlow'):
    """The same model on every rank. The residual BN scales start at 1 +- 0.5 instead of
    zero_init_residual's 0, so that every parameter gets a gradient in the first step."""
    torch.manual_seed(0)
    backbone, width = C.make_backbone('resnet10')
    for m in backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    settings = dict(lambd=LAMBD) if objective == 'barlow' else {}
    return C.SSLModel(backbone, width, projector, objective, **settings)


def optimizer_for(raw):
    opt = C.make_optimizer({'backbone': raw.backbone, 'projector': raw.projector}, 'lars',
                           LR, LR_BIASES, WD, GLOBAL_BATCH)
    for g in opt.param_groups:
        g['lr'] = g['peak_lr']
    return opt


def result_file(out, projector, objective):
    return os.path.join(out, f'ddp-{objective}-{projector}.pt')


def main():
    out, configs = sys.argv[1], sys.argv[2:] or [f'{PROJECTOR}:barlow']
    torch.set_num_threads(1)
    rt = C.setup_runtime('cpu', 'fp32', seed=0)
    assert rt.world == 2, 'run under torchrun with 2 processes'
    for config in configs:
        projector, objective = config.split(':')
        step(rt, out, projector, objective)
    C.teardown(rt)


def step(rt, out, projector, objective):
    model, raw = C.wrap_model(rt, build_model(projector, objective))
    optimizer = optimizer_for(raw)
    y1, y2 = global_views()
    local = GLOBAL_BATCH // rt.world
    share = slice(rt.rank * local, (rt.rank + 1) * local)
    model.train()
    loss = model(y1[share], y2[share])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in raw.named_parameters()}
    optimizer.step()
    losses = [torch.zeros(()) for _ in range(rt.world)]  # every rank must report the same
    torch.distributed.all_gather(losses, loss.detach())
    if rt.is_main:
        params = {n: p.detach().clone() for n, p in raw.named_parameters()}
        C.torch_save(dict(loss=loss.detach(), losses=torch.stack(losses), grads=grads,
                          params=params), result_file(out, projector, objective))


if __name__ == '__main__':
    main()
