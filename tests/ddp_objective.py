"""One common.SSLModel + LARS step under DDP (gloo, CPU), for test_objectives.py's DDP test.
Not collected by pytest; run as

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_objective.py \\
        OUTDIR OBJECTIVE

OBJECTIVE is a key of common.OBJECTIVES. The rest is ddp_step.py's setting: the same fixed
global batch of two views (8 images of 32 px), resnet18 backbone and 64-64 projector, each
rank on its contiguous share, one step through common.wrap_model (DDP) and LARS. Rank 0 saves
the loss, the gradients and the updated parameters to OUTDIR/ddp.pt; the test computes the
single-process reference."""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
import ddp_step as D  # noqa: E402


def build_model(objective):
    """ddp_step's model (seeded; every parameter gets a gradient) trained with objective."""
    bt = D.build_model(D.PROJECTOR)
    model = C.SSLModel(bt.backbone, C.ARCHS['resnet18'], D.PROJECTOR, objective)
    model.projector = bt.projector
    return model


def main():
    out, objective = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    rt = C.setup_runtime(argparse.Namespace(device='cpu', precision='fp32',
                                            batch_size=D.GLOBAL_BATCH, seed=0))
    assert rt.world == 2, 'run under torchrun with 2 processes'
    model, raw = C.wrap_model(rt, build_model(objective))
    optimizer = D.optimizer_for(raw)
    y1, y2 = D.global_views()
    local = D.GLOBAL_BATCH // rt.world
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
                          params=params), os.path.join(out, 'ddp.pt'))
    C.teardown(rt)


if __name__ == '__main__':
    main()
