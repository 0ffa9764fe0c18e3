"""common.py as a library: copied alone into another folder and driven by a short script of
a user's own, with no argparse and no other file of this project."""
import json
import os
import shutil

import torch

import forkrun
from conftest import ROOT, script_env

USER_SCRIPT = '''
import json, sys
import numpy as np
import torch
import common as C

out, max_steps = sys.argv[1], int(sys.argv[2])
rt = C.setup_runtime('cpu', 'fp32', seed=0)
# 48 random 40x40 RGB images in the cache format: one (N, S, S, 3) uint8 .npy
np.save(f'{out}/images.npy', np.random.default_rng(0).integers(0, 256, (48, 40, 40, 3), np.uint8))
cache = {'file': f'{out}/images.npy', 'labels': [i % 3 for i in range(48)]}
loader = C.make_loader(cache, range(48), batch_size=16, workers=0)

backbone, width = C.make_backbone('resnet10')
model, raw = C.wrap_model(rt, C.BarlowTwins(backbone, width, projector='32-32'))
views = C.preset_params('barlow_imagenet', size=32)
opt = C.make_optimizer({'backbone': raw.backbone, 'projector': raw.projector}, 'lars',
                       lr=0.2, lr_biases=0.0048, weight_decay=1e-6, batch_size=16)
total = 2 * len(loader)
step = C.fit(rt, model, raw, opt, loader,
             step_fn=lambda x, y, gen: model(*C.augment_views(x, views, gen)),
             out=f'{out}/run', total_steps=total,
             lr_fn=lambda s, g: g['peak_lr'] * C.lr_factor(s, total, warmup=1),
             config={'arch': 'resnet10'}, max_steps=max_steps, log_every=2, ckpt_every=2)

# a linear classifier on the frozen features, scored with the shared metrics
raw.eval()
x, y = C.predict(rt, raw.backbone, cache, range(48), 16, C.preset_params('eval', size=32))
head = torch.nn.Linear(width, 3)
sgd = torch.optim.SGD(head.parameters(), lr=0.1)
for _ in range(50):
    sgd.zero_grad()
    torch.nn.functional.cross_entropy(head(x), y).backward()
    sgd.step()
metrics = C.classification_metrics(torch.softmax(head(x), 1).detach(), y, 3)
torch.save(raw.backbone.state_dict(), f'{out}/backbone.pt')
print(json.dumps({'step': step, 'accuracy': metrics['accuracy']}))
'''


def test_common_py_alone_drives_a_user_script(tmp_path, torch_home):
    lib = tmp_path / 'lib'
    lib.mkdir()
    shutil.copy(os.path.join(ROOT, 'common.py'), lib / 'common.py')
    (lib / 'user.py').write_text(USER_SCRIPT)
    assert 'argparse' not in USER_SCRIPT and len(USER_SCRIPT.strip().splitlines()) <= 45
    env = script_env(torch_home, PYTHONPATH='')  # nothing of the project on the path

    def run(out, max_steps):
        os.makedirs(out, exist_ok=True)
        r = forkrun.Run(str(lib / 'user.py'), [out, max_steps], lib, env).wait(300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout, json.loads(r.stdout.strip().splitlines()[-1])

    _, whole = run(tmp_path / 'whole', 0)
    assert whole['step'] == 6 and 0 <= whole['accuracy'] <= 1
    _, first = run(tmp_path / 'split', 3)  # stop after 3 steps (checkpoint), then resume
    assert first['step'] == 3
    text, second = run(tmp_path / 'split', 0)
    assert 'resumed' in text and 'at step 3' in text and second['step'] == 6
    a = torch.load(tmp_path / 'whole' / 'backbone.pt', weights_only=True)
    b = torch.load(tmp_path / 'split' / 'backbone.pt', weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(os.listdir(lib)) == ['common.py', 'user.py']  # it needed nothing else
