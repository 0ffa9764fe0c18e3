"""finetune.py details the script tests leave out: --lr auto (the range test), --class-weights,
and a run folder whose checkpoint belongs to another model."""
import os

import torch

from conftest import TINY


def test_lr_auto_and_class_weights(run_script, imagefolder, tmp_path):
    r = run_script('finetune.py', '--data', imagefolder, *TINY, '--protocol', 'random',
                   '--labels-per-class', '6', '--seeds', '0', '--epochs', '1', '--batch-size', '8',
                   '--lr', 'auto', '--class-weights', '--tta', '2', '--out', tmp_path / 'ft',
                   '--results', tmp_path / 'r.jsonl', '--cache-dir', tmp_path / 'c', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'lr range test chose' in r.stdout
    chosen = float(r.stdout.split('lr range test chose ')[1].split()[0])
    assert 1e-7 < chosen < 10 * 256 / 8  # inside the swept range, per 256 images


def test_resume_into_another_model_is_refused(run_script, imagefolder, tmp_path):
    out = tmp_path / 'bt'
    common = ['--data', imagefolder, *TINY, '--batch-size', '8', '--max-steps', '2',
              '--cache-dir', tmp_path / 'c', '--out', out]
    assert run_script('pretrain_barlow.py', *common, '--projector', '32-32',
                      cwd=tmp_path).returncode == 0
    state = torch.load(out / 'ckpt.pt', weights_only=True)
    assert state['step'] == 2
    r = run_script('pretrain_barlow.py', *common, '--projector', '64-64', cwd=tmp_path)
    assert r.returncode == 2
    assert 'does not fit this model' in r.stderr and 'Traceback' not in r.stderr
    assert torch.load(out / 'ckpt.pt', weights_only=True)['step'] == 2  # left as it was


def test_backbone_pretrained_without_the_test_part_held_out_is_refused(tmp_path):
    import json
    import common as C
    import pytest
    ds = {'root': str(tmp_path / 'skin')}
    split = {'test': ['a', 'b']}
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'backbone.pt').write_bytes(b'')
    for held_out, ok in ((C.split_sha(split), True), (None, False), ('other', False)):
        (run / 'meta.json').write_text(json.dumps({'data_root': ds['root'],
                                                   'held_out': held_out}))
        for init in (str(run / 'backbone.pt'), str(run)):  # a file or its run folder
            if ok:
                C.check_held_out(init, ds, split)
            else:
                with pytest.raises(C.UserError, match='same --split'):
                    C.check_held_out(init, ds, split)
    (run / 'meta.json').write_text(json.dumps({'data_root': '/elsewhere', 'held_out': None}))
    C.check_held_out(str(run), ds, split)  # pretrained on another dataset: nothing to leak
