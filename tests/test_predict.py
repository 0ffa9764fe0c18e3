"""The fine-tuned model in use: finetune.py --save-model keeps the classifier, and `python
common.py predict` on the split's test part gives back the result row's metrics (TTA 2, so the
random passes must be drawn as fine-tuning drew them); new images without labels give a CSV
and no metrics; bad input is refused in one line with exit status 2 and no CSV."""
import csv
import os
import shutil

import numpy as np
import pytest
import torch

import common
from conftest import ARCH, TINY
from test_scripts import rows

MODEL_KEYS = {'format', 'version', 'arch', 'classes', 'model', 'size', 'cache_size', 'mean',
              'std', 'tta', 'aug', 'batch_size', 'seed', 'result', 'lineage'}


@pytest.fixture(scope='module')
def saved(tmp_path_factory, imagefolder, run_script):
    """One fine-tuned seed (2 steps) from a random init, its classifier kept under models/."""
    d = tmp_path_factory.mktemp('predict')
    common._cli(['split', '--data', imagefolder, '--protocol', 'random',
                 '--out', str(d / 'split.json')])
    r = run_script('finetune.py', '--data', imagefolder, '--split', d / 'split.json', *TINY,
                   '--init-name', 'rand/x', '--labels-per-class', '4', '--seeds', '0',
                   '--epochs', '1', '--batch-size', '8', '--lr', '1e-3', '--tta', '2',
                   '--eval-batch-size', '5', '--max-steps', '2', '--results', d / 'results.jsonl',
                   '--cache-dir', d / 'cache', '--out', d / 'ft', '--save-model', d / 'models',
                   cwd=d)
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def model_file(saved):
    return saved / 'models' / 'rand_x-seed0.pt'  # the init name made file-safe


def read_preds(path):
    with open(path, newline='') as f:
        return list(csv.reader(f))


def predict(argv, capsys):
    """`python common.py predict argv` in-process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        common.main_guard(lambda: common._cli(['predict', *(str(a) for a in argv)]))
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def fast(tmp_path):
    return ['--device', 'cpu', '--workers', '0', '--cache-dir', tmp_path / 'cache']


def test_saved_model_file(saved):
    obj = torch.load(model_file(saved), weights_only=True)
    assert set(obj) == MODEL_KEYS
    assert obj['format'] == 'finetuned-classifier' and obj['version'] == 1
    assert (obj['arch'], obj['classes'], obj['size'], obj['cache_size']) == \
        (ARCH, ['c0', 'c1', 'c2'], 32, 40)
    assert (obj['tta'], obj['aug'], obj['batch_size'], obj['seed']) == (2, 'finetune_skin', 5, 0)
    assert obj['mean'] == list(common.IMAGENET_MEAN) and obj['std'] == list(common.IMAGENET_STD)
    assert {k.split('.')[0] for k in obj['model']} == {'backbone', 'head'}
    assert obj['model']['head.weight'].shape == (3, 512)
    (row,) = rows(saved / 'results.jsonl')
    assert common.result_key(obj['result']) == common.result_key(row)
    assert (row['tta'], row['eval_batch_size']) == (2, 5)
    m = common.Classifier(*common.make_backbone(ARCH), 3)
    m.load_state_dict(obj['model'])  # strict
    assert not (saved / 'ft').exists() or not os.listdir(saved / 'ft')  # run folder dropped


def test_predict_reproduces_finetune_test_metrics(saved, imagefolder, run_script):
    (row,) = rows(saved / 'results.jsonl')
    r = run_script('common.py', 'predict', '--model', model_file(saved), '--data', imagefolder,
                   '--split', saved / 'split.json', '--part', 'test', '--out', saved / 'p.csv',
                   '--device', 'cpu', '--workers', '0', '--cache-dir', saved / 'cache2', cwd=saved)
    assert r.returncode == 0, r.stderr[-3000:]
    m = row['metrics']
    assert (f'accuracy {m["accuracy"]:.4f} balanced {m["balanced_accuracy"]:.4f} macro-F1 '
            f'{m["macro_f1"]:.4f} ({m["n"]} labelled images)') in r.stdout, r.stdout
    assert '2 test-time pass(es)' in r.stdout
    header, *body = read_preds(saved / 'p.csv')
    assert header == ['id', 'predicted', 'c0', 'c1', 'c2']
    split = common.load_split(saved / 'split.json')
    assert [b[0] for b in body] == split['test']
    probs = np.array([[float(x) for x in b[2:]] for b in body])
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert [b[1] for b in body] == [header[2 + k] for k in probs.argmax(1)]
    labels = [int(i.split('/')[0][1:]) for i in split['test']]  # c<k>/img...
    got = common.classification_metrics(probs, labels, 3)
    for k in ('accuracy', 'balanced_accuracy', 'macro_f1', 'weighted_f1', 'confusion_matrix',
              'per_class_recall', 'n'):
        assert got[k] == m[k], k
    assert got['auroc'] == pytest.approx(m['auroc'], abs=1e-6)


def some_images(imagefolder, dst, n=3):
    os.makedirs(dst, exist_ok=True)
    for c in range(n):
        shutil.copy(os.path.join(imagefolder, f'c{c}', f'img{c}_00.png'), dst / f'new{c}.png')
    return dst


@pytest.mark.parametrize('layout', ['plain', 'other-classes'])
def test_predict_new_images_without_metrics(saved, imagefolder, layout, tmp_path, capsys):
    data = tmp_path / 'new'
    if layout == 'plain':
        some_images(imagefolder, data)
    else:  # an ImageFolder whose class names the model does not know
        some_images(imagefolder, data / 'x')
        some_images(imagefolder, data / 'y', 1)
    code, out, err = predict(['--model', model_file(saved), '--data', data, '--out',
                              tmp_path / 'p.csv', *fast(tmp_path)], capsys)
    assert code == 0, err
    assert 'accuracy' not in out
    assert ('no metrics' in out) == (layout == 'other-classes'), out
    header, *body = read_preds(tmp_path / 'p.csv')
    assert header == ['id', 'predicted', 'c0', 'c1', 'c2']
    assert len(body) == (3 if layout == 'plain' else 4)
    assert all(b[1] in header[2:] for b in body)


def bad_model(kind, saved, path):
    obj = torch.load(model_file(saved), weights_only=True)
    if kind == 'backbone.pt':
        torch.save({k[9:]: v for k, v in obj['model'].items() if k.startswith('backbone.')}, path)
    elif kind == 'ckpt.pt':
        torch.save(dict(model=obj['model'], optimizer={'state': {}, 'param_groups': []},
                        scaler={}, step=2, epoch=1, pos=0, config={'arch': ARCH}), path)
    elif kind == 'other-arch':
        torch.save(dict(obj, arch='resnet34'), path)
    elif kind == 'other-head':
        torch.save(dict(obj, classes=['a', 'b', 'c', 'd']), path)
    elif kind == 'not-torch':
        path.write_text('not a model\n')
    return path


BAD = {'backbone.pt': 'bare state dict', 'ckpt.pt': 'resumable training checkpoint',
       'other-arch': f"a {ARCH}'s", 'other-head': 'size mismatch for head.weight',
       'not-torch': 'not a fine-tuned classifier file', 'missing': 'no such file',
       'empty-folder': 'no images found', 'model-folder': 'a folder; pass one of its'}


@pytest.mark.parametrize('kind', list(BAD))
def test_predict_refuses_bad_input(saved, imagefolder, kind, tmp_path, capsys):
    model, data = tmp_path / 'model.pt', some_images(imagefolder, tmp_path / 'new')
    if kind == 'empty-folder':
        data = tmp_path / 'empty'
        data.mkdir()
        model = model_file(saved)
    elif kind == 'model-folder':  # the --save-model folder instead of a file in it
        model = os.path.dirname(model_file(saved))
    elif kind != 'missing':
        bad_model(kind, saved, model)
    code, out, err = predict(['--model', model, '--data', data, '--out', tmp_path / 'p.csv',
                              *fast(tmp_path)], capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and BAD[kind] in lines[0], err
    assert not (tmp_path / 'p.csv').exists()


@pytest.mark.parametrize('skip_bad', [False, True])
def test_predict_unreadable_image(saved, imagefolder, skip_bad, tmp_path, capsys):
    data = some_images(imagefolder, tmp_path / 'new', 2)
    (data / 'broken.png').write_bytes(b'\x89PNG not really')
    code, out, err = predict(['--model', model_file(saved), '--data', data, '--out',
                              tmp_path / 'p.csv', *fast(tmp_path)] + ['--skip-bad'] * skip_bad,
                             capsys)
    if skip_bad:
        assert code == 0, err
        assert [b[0] for b in read_preds(tmp_path / 'p.csv')[1:]] == ['new0.png', 'new1.png']
    else:  # build_cache's message: the count, then each file and why
        assert code == 2 and 'Traceback' not in err
        assert 'unreadable image' in err.splitlines()[0] and 'broken.png' in err
        assert not (tmp_path / 'p.csv').exists()


@pytest.mark.parametrize('flags', [['--tta', '0'], ['--batch-size', '0'], ['--workers', '-1'],
                                   ['--part', 'test']])
def test_predict_bad_flags(saved, flags, tmp_path, capsys):
    code, out, err = predict(['--model', model_file(saved), '--data', tmp_path, '--out',
                              tmp_path / 'p.csv', *flags], capsys)
    assert code == 2 and 'Traceback' not in err
    assert flags[0] in err.strip().splitlines()[-1], err
    assert not (tmp_path / 'p.csv').exists()


def test_predict_scores_the_part_its_fine_tuning_scored(saved, imagefolder, tmp_path, capsys):
    """A classifier fine-tuned with --eval-part val: --split without --part scores val, as
    its result row; before, test."""
    obj = torch.load(model_file(saved), weights_only=True)
    obj['result']['eval_part'] = 'val'
    torch.save(obj, tmp_path / 'val.pt')
    args = ['--model', tmp_path / 'val.pt', '--data', imagefolder, '--split',
            saved / 'split.json', '--out', tmp_path / 'p.csv', *fast(tmp_path)]
    code, out, err = predict(args, capsys)
    assert code == 0, err
    split = common.load_split(saved / 'split.json')
    assert [b[0] for b in read_preds(tmp_path / 'p.csv')[1:]] == split['val']
    code, out, err = predict(args + ['--part', 'test'], capsys)  # still yours to choose
    assert code == 0 and [b[0] for b in read_preds(tmp_path / 'p.csv')[1:]] == split['test']


def test_a_kept_classifier_as_an_init_carries_what_its_weights_have_seen(saved, imagefolder):
    """Its lineage ends with the fine-tuning, held out on its split's test part: as --init on
    another split of the same images (whose test part holds images it trained on) it is
    refused. Before, a classifier file counted as foreign weights and passed."""
    ds = common.read_dataset(imagefolder)
    split = common.load_split(saved / 'split.json', ds)
    (entry,) = torch.load(model_file(saved), weights_only=True)['lineage']  # random init: 1
    assert entry['script'] == 'finetune' and entry['held_out'] == common.split_sha(split)
    assert entry['roots'] == [os.path.realpath(imagefolder)]
    common.check_held_out(str(model_file(saved)), ds, split)  # the same test part: fine
    other = common.make_split(ds, 'random', seed=1)
    with pytest.raises(common.UserError, match='same --split'):
        common.check_held_out(str(model_file(saved)), ds, other)
