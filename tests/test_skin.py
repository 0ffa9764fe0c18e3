"""Skin-lesion readers and splits, on tiny fixtures written in each real on-disk layout."""
import argparse
import csv
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from common import (UserError, labelled_subset, load_split, make_dataset,  # noqa: E402
                    make_split, read_dataset, save_split, split_path)

ISIC19 = ['MEL', 'NV', 'BCC', 'AK', 'BKL', 'DF', 'VASC', 'SCC']
HAM = ['akiec', 'bcc', 'bkl', 'df', 'mel', 'nv', 'vasc']


# --------------------------------------------------------------------------- fixtures
def jpeg(path, v=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new('RGB', (8, 8), (v % 256, 40, 90)).save(path, quality=90)


def write_csv(path, header, rows):
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def isic2019(root, n=24, downsampled=2, unk=1, meta=True, drop_col=None, rows_extra=()):
    """n images, class i % 8; images i and i+8 (i < 8) share lesion IL_i; plus downsampled
    copies and UNK rows; an extra unknown column 'note'."""
    img = os.path.join(root, 'ISIC_2019_Training_Input')
    header = ['image'] + ISIC19 + ['UNK', 'note']
    rows, mrows = [], []
    names = [f'ISIC_{i:07d}' for i in range(n)]
    names += [f'ISIC_{100 + i:07d}_downsampled' for i in range(downsampled)]
    for i, name in enumerate(names):
        onehot = [1.0 if k == i % 8 else 0.0 for k in range(8)]
        rows.append([name] + onehot + [0.0, 'x'])
        jpeg(os.path.join(img, name + '.jpg'), i)
        mrows.append([name, 50, 'torso', f'IL_{i % 8}' if i < 16 else '', 'male'])
    for i in range(unk):
        rows.append([f'ISIC_{900 + i:07d}'] + [0.0] * 8 + [1.0, 'x'])
    rows += list(rows_extra)
    if drop_col:
        k = header.index(drop_col)
        header = header[:k] + header[k + 1:]
        rows = [r[:k] + r[k + 1:] for r in rows]
    write_csv(os.path.join(root, 'ISIC_2019_Training_GroundTruth.csv'), header, rows)
    if meta:
        write_csv(os.path.join(root, 'ISIC_2019_Training_Metadata.csv'),
                  ['image', 'age_approx', 'anatom_site_general', 'lesion_id', 'sex'], mrows)
    return str(root)


def isic2020(root, n=20, bad_target=None):
    """image i of patient P_{i//3}; every 4th malignant; diagnosis nevus/melanoma/unknown."""
    header = ['image_name', 'patient_id', 'sex', 'age_approx', 'anatom_site_general_challenge',
              'diagnosis', 'benign_malignant', 'target', 'extra_col']
    rows = []
    for i in range(n):
        t = int(i % 4 == 0)
        diag = 'melanoma' if t else ('nevus' if i % 2 else 'unknown')
        rows.append([f'ISIC_{i:07d}', f'P_{i // 3}', 'female', 40, 'torso', diag,
                     ['benign', 'malignant'][t], t, 'y'])
        jpeg(os.path.join(root, 'jpeg', 'train', f'ISIC_{i:07d}.jpg'), i)
    if bad_target is not None:
        rows[1][7] = bad_target
    write_csv(os.path.join(root, 'train.csv'), header, rows)
    return str(root)


def ham10000(root, folders=('HAM10000_images_part_1', 'HAM10000_images_part_2'), n=21,
             dx_override=None, missing=0):
    """image i has dx HAM[i % 7] and lesion HAML_{i % 7}_{i // 14}: one class per lesion,
    two images per lesion for the first 14; an extra 'dataset' column as in newer copies."""
    header = ['lesion_id', 'image_id', 'dx', 'dx_type', 'age', 'sex', 'localization', 'dataset']
    rows = []
    for i in range(n):
        dx = HAM[i % 7]
        rows.append([f'HAML_{i % 7}_{i // 14}', f'ISIC_{i:07d}', dx, 'histo', 50, 'male',
                     'back', 'vidir_modern'])
        if i >= missing:
            jpeg(os.path.join(root, folders[i % len(folders)], f'ISIC_{i:07d}.jpg'), i)
    if dx_override:
        rows[2][2] = dx_override
    write_csv(os.path.join(root, 'HAM10000_metadata.csv'), header, rows)
    return str(root)


def dermamnist(path, sizes=(10, 4, 6), side=8, drop_key=None, bad_label=False):
    rng = np.random.default_rng(0)
    arrays = {}
    for part, n in zip(('train', 'val', 'test'), sizes):
        arrays[f'{part}_images'] = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
        arrays[f'{part}_labels'] = (np.arange(n) % 7).reshape(n, 1).astype(np.uint8)
    if bad_label:
        arrays['val_labels'][1, 0] = 9
    if drop_key:
        del arrays[drop_key]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez_compressed(path, **arrays)
    return str(path), arrays


def fake(labels, groups=None, official=None, classes=('A', 'B', 'C')):
    """An in-memory dataset for the split tests (splits never open the files)."""
    ids = [f'img{i:05d}' for i in range(len(labels))]
    return make_dataset('imagefolder', '/data/fake', list(classes), ids, [f'/x/{i}' for i in ids],
                        labels, groups, official)


def error(fn, *words):
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert '\n' not in msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


# --------------------------------------------------------------------------- ISIC 2019
def test_isic2019_reads_counts_labels_groups(tmp_path, capsys):
    root = isic2019(tmp_path / 'isic19')
    ds = read_dataset(root)  # auto-detected
    assert ds['format'] == 'isic2019' and ds['classes'] == ISIC19
    assert len(ds['ids']) == 26  # 24 + 2 downsampled, the UNK row left out
    assert 'ISIC_0000900' not in ds['ids']
    assert 'UNK' in capsys.readouterr().out
    k = ds['ids'].index('ISIC_0000011')
    assert ds['labels'][k] == 3 and ds['groups'][k] == 'IL_3'
    assert ds['groups'][ds['ids'].index('ISIC_0000020')] == 'ISIC_0000020'  # empty lesion_id
    assert ds['groups'][ds['ids'].index('ISIC_0000003')] == 'IL_3'
    assert os.path.isfile(ds['paths'][k]) and ds['official'] is None
    assert common.load_image(ds['paths'][k]).size == (8, 8)
    # --data pointing at the CSV itself
    ds2 = read_dataset(os.path.join(root, 'ISIC_2019_Training_GroundTruth.csv'))
    assert ds2['ids'] == ds['ids'] and ds2['root'] == ds['root']


def test_isic2019_drop_downsampled_and_no_metadata(tmp_path):
    root = isic2019(tmp_path / 'i', meta=False)
    ds = read_dataset(root, 'isic2019', drop_downsampled=True)
    assert len(ds['ids']) == 24 and not any('downsampled' in i for i in ds['ids'])
    assert ds['groups'] == ds['ids']


def test_isic2019_errors(tmp_path):
    root = isic2019(tmp_path / 'a', drop_col='BCC')
    error(lambda: read_dataset(root, 'isic2019'), 'missing column', 'BCC')
    root = isic2019(tmp_path / 'b', rows_extra=[['ISIC_0000777'] + [1.0, 1.0] + [0.0] * 7 + ['']])
    error(lambda: read_dataset(root), 'sum to 1', 'ISIC_0000777', 'MEL+NV')
    root = isic2019(tmp_path / 'c', rows_extra=[['ISIC_0000778'] + [0.0] * 9 + ['']])
    error(lambda: read_dataset(root), 'sum to 1', 'ISIC_0000778 (none)')
    root = isic2019(tmp_path / 'e', rows_extra=[['ISIC_0000779', 'yes'] + [0.0] * 8 + ['']])
    error(lambda: read_dataset(root), 'sum to 1', 'ISIC_0000779 (not numbers)')
    root = isic2019(tmp_path / 'd')
    os.remove(os.path.join(root, 'ISIC_2019_Training_Input', 'ISIC_0000005.jpg'))
    error(lambda: read_dataset(root), 'missing', 'ISIC_0000005.jpg', '1 image')


# --------------------------------------------------------------------------- ISIC 2020
def test_isic2020_target_and_diagnosis(tmp_path):
    root = isic2020(tmp_path / 'isic20')
    ds = read_dataset(root)
    assert ds['format'] == 'isic2020' and ds['classes'] == ['benign', 'malignant']
    assert len(ds['ids']) == 20 and sum(ds['labels']) == 5
    assert ds['labels'][ds['ids'].index('ISIC_0000008')] == 1
    assert ds['groups'][ds['ids'].index('ISIC_0000007')] == 'P_2'
    dd = read_dataset(root, 'isic2020', label='diagnosis')
    assert dd['classes'] == ['melanoma', 'nevus', 'unknown']
    assert dd['labels'][:4] == [0, 1, 2, 1]
    error(lambda: read_dataset(root, 'isic2020', label='sex'), 'target or diagnosis')


def test_isic2020_errors(tmp_path):
    root = isic2020(tmp_path / 'a', bad_target='2')
    error(lambda: read_dataset(root), 'unknown target', 'ISIC_0000001', "'2'")
    root = isic2020(tmp_path / 'b')
    os.remove(os.path.join(root, 'jpeg', 'train', 'ISIC_0000003.jpg'))
    error(lambda: read_dataset(root), 'ISIC_0000003.jpg', 'missing')
    error(lambda: read_dataset(root, 'isic2020', label='diagnosis'), 'missing')


# --------------------------------------------------------------------------- HAM10000
@pytest.mark.parametrize('folders', [
    ('HAM10000_images_part_1', 'HAM10000_images_part_2'),
    ('HAM10000_images_part1', 'HAM10000_images_part2'),
    ('HAM10000_images',)])
def test_ham10000_folder_namings(tmp_path, folders):
    root = ham10000(tmp_path / 'ham', folders)
    ds = read_dataset(root)
    assert ds['format'] == 'ham10000' and ds['classes'] == HAM
    assert len(ds['ids']) == 21
    assert ds['labels'][:8] == [0, 1, 2, 3, 4, 5, 6, 0]
    assert ds['groups'][15] == 'HAML_1_1' and ds['groups'][1] == ds['groups'][8]
    assert all(os.path.isfile(p) for p in ds['paths'])


def test_ham10000_errors(tmp_path):
    root = ham10000(tmp_path / 'a', dx_override='melanoma')
    error(lambda: read_dataset(root), 'unknown dx', 'ISIC_0000002', "'melanoma'")
    root = ham10000(tmp_path / 'b', missing=3)
    error(lambda: read_dataset(root), '3 image', 'ISIC_0000000', 'missing')
    root = ham10000(tmp_path / 'c', folders=('images',))
    error(lambda: read_dataset(root), 'HAM10000_images_part_1')


# --------------------------------------------------------------------------- DermaMNIST
@pytest.mark.parametrize('name', ['dermamnist.npz', 'dermamnist_64.npz', 'dermamnist_224.npz'])
def test_dermamnist_file_and_folder(tmp_path, name):
    file, arrays = dermamnist(tmp_path / 'd' / name)
    for path in (file, str(tmp_path / 'd')):
        ds = read_dataset(path)
        assert ds['format'] == 'dermamnist' and ds['classes'] == HAM
        assert len(ds['ids']) == 20 and ds['ids'][10] == 'val_0'
        assert ds['official'] == ['train'] * 10 + ['val'] * 4 + ['test'] * 6
        assert ds['labels'][:8] == [0, 1, 2, 3, 4, 5, 6, 0]
        assert ds['root'] == os.path.abspath(file)
        assert ds['paths'][12] == f'{os.path.abspath(file)}:val_images:2'
        img = np.asarray(common.load_image(ds['paths'][12]))
        assert np.array_equal(img, arrays['val_images'][2])
    assert split_path(ds, 'official') == os.path.join('splits', name[:-4] + '-official.json')


def test_dermamnist_picks_largest_and_errors(tmp_path, capsys):
    dermamnist(tmp_path / 'd' / 'dermamnist.npz')
    big, _ = dermamnist(tmp_path / 'd' / 'dermamnist_128.npz', sizes=(3, 2, 2))
    ds = read_dataset(str(tmp_path / 'd'))
    assert ds['root'] == os.path.abspath(big) and len(ds['ids']) == 7
    assert 'dermamnist_128.npz' in capsys.readouterr().out
    file, _ = dermamnist(tmp_path / 'e' / 'dermamnist.npz', drop_key='test_labels')
    error(lambda: read_dataset(file), 'missing array', 'test_labels')
    file, _ = dermamnist(tmp_path / 'f' / 'dermamnist.npz', bad_label=True)
    error(lambda: read_dataset(file), 'unknown class', 'val_1 (9)')


def damaged(file, member, at, n):
    """A copy of the .npz with n bytes of one member's compressed data flipped (its zip
    directory intact, so the file still opens)."""
    import zipfile
    data = bytearray(open(file, 'rb').read())
    info = zipfile.ZipFile(file).getinfo(member)
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + at
    data[start:start + n] = bytes(b ^ 0xFF for b in data[start:start + n])
    out = os.path.join(os.path.dirname(file), 'damaged', 'dermamnist.npz')
    os.makedirs(os.path.dirname(out), exist_ok=True)
    open(out, 'wb').write(bytes(data))
    return out


def test_a_damaged_dermamnist_file_is_one_line(tmp_path):
    """Before: a damaged labels array was a zlib traceback; a damaged images array was one
    error line per image (about 7,000 for the real train_images), each decompressing it
    again."""
    file, _ = dermamnist(tmp_path / 'labels' / 'dermamnist.npz', sizes=(400, 4, 6))
    error(lambda: read_dataset(damaged(file, 'train_labels.npy', 5, 20)), 'not a readable .npz')
    file, _ = dermamnist(tmp_path / 'images' / 'dermamnist.npz', sizes=(400, 4, 6))
    ds = read_dataset(damaged(file, 'train_images.npy', 2000, 50))  # the labels still read
    for workers in (0, 2):
        error(lambda: common.build_cache(ds, 8, str(tmp_path / f'c{workers}'), workers=workers,
                                         verbose=False),
              'its train_images array cannot be read', 'download it again')
        assert not [f for f in os.listdir(tmp_path / f'c{workers}') if 'tmp' in f]


def test_auto_detection_keeps_generic_formats_last(tmp_path):
    assert list(common.READERS)[-2:] == ['imagefolder', 'folder']
    for c in ('cat', 'dog'):
        jpeg(str(tmp_path / 'if' / c / 'a.jpg'))
    jpeg(str(tmp_path / 'plain' / 'a.jpg'))
    assert read_dataset(str(tmp_path / 'if'))['format'] == 'imagefolder'
    assert read_dataset(str(tmp_path / 'plain'))['format'] == 'folder'


# --------------------------------------------------------------------------- splits
def check_invariants(split, ds):
    parts = [set(split[p]) for p in ('train', 'val', 'test')]
    assert sum(map(len, parts)) == len(set.union(*parts))  # disjoint
    labelled = {i for i, l in zip(ds['ids'], ds['labels']) if l >= 0}
    assert set.union(*parts) == (labelled or set(ds['ids']))  # covering
    assert set(split['pretrain']) >= parts[0] | parts[1]
    assert not set(split['pretrain']) & parts[2]
    g = dict(zip(ds['ids'], ds['groups']))
    test_groups = {g[i] for i in split['test']}
    assert not test_groups & {g[i] for i in split['pretrain']}
    assert not {g[i] for i in split['train']} & {g[i] for i in split['val']}


def test_paper_rule_caps_classes_in_seeded_walk_order():
    rng = np.random.default_rng(1)
    labels = rng.permutation([0] * 700 + [1] * 300 + [2] * 40).tolist()
    ds = fake(labels)
    split = make_split(ds, 'paper', seed=3, per_class={'A': 500, 'B': 250, 'C': 30},
                       val_fraction=0.1)
    walk = [ds['ids'][k] for k in np.random.default_rng(3).permutation(len(labels))]
    lab = dict(zip(ds['ids'], labels))
    expect = set()
    for c, k in ((0, 500), (1, 250), (2, 30)):
        expect |= set([i for i in walk if lab[i] == c][:k])
    assert set(split['train']) == expect
    assert split['how']['counts']['train'] == {'A': 500, 'B': 250, 'C': 30}
    assert split['how']['counts']['val'] == {'A': 20, 'B': 5, 'C': 1}
    assert split['how']['counts']['test'] == {'A': 180, 'B': 45, 'C': 9}
    assert split['train'] == sorted(split['train'])  # dataset order inside a part
    check_invariants(split, ds)
    assert split['protocol'] == 'paper' and split['how']['seed'] == 3
    assert split['how']['per_class'] == {'A': 500, 'B': 250, 'C': 30}
    assert 'fewer than per_class' in split['how']['rule']


def test_paper_rule_refuses_a_class_left_without_test_images():
    """Before: at 500 a class, ISIC 2019's DF (239) and VASC (253) went wholly to train, and
    the test metrics quietly left them out."""
    rng = np.random.default_rng(1)
    ds = fake(rng.permutation([0] * 700 + [1] * 300 + [2] * 40).tolist())
    error(lambda: make_split(ds, 'paper', seed=3, per_class=500),
          'leaves no test image of B (300 images), C (40 images)', '--per-class CLASS=N')
    error(lambda: make_split(ds, 'paper', per_class={'A': 5, 'B': 5}), 'no count for C')
    error(lambda: make_split(ds, 'paper', per_class={'A': 5, 'B': 5, 'C': 5, 'D': 1}),
          'D not among the classes')
    assert common.per_class_arg('paper') == common.PAPER_PER_CLASS
    assert sum(common.PAPER_PER_CLASS.values()) == 2554  # the paper's labelled images
    assert common.per_class_arg('A=3, B=4') == {'A': 3, 'B': 4} and common.per_class_arg('7') == 7
    for bad in ('A=0', 'A=3,A=4', 'A=x', '=3', '0'):
        with pytest.raises(argparse.ArgumentTypeError):
            common.per_class_arg(bad)


def test_paper_rule_keeps_whole_groups():
    labels = [k % 2 for k in range(60)]
    groups = [f'L{k % 20}' for k in range(60)]  # 20 lesions of 3 images, one class each
    ds = fake(labels, groups, classes=('A', 'B'))
    split = make_split(ds, 'paper', seed=0, per_class=4)
    # a lesion is kept while its class has < 4 kept: two lesions = 6 images per class
    assert split['how']['counts']['train'] == {'A': 6, 'B': 6}
    check_invariants(split, ds)


def test_random_split_group_aware_stratified_deterministic():
    rng = np.random.default_rng(0)
    lesion_class = rng.integers(0, 3, 150)
    groups = [f'L{g}' for g in rng.integers(0, 150, 600)]
    labels = [int(lesion_class[int(g[1:])]) for g in groups]
    ds = fake(labels, groups)
    a = make_split(ds, 'random', seed=0)
    check_invariants(a, ds)
    assert a == make_split(ds, 'random', seed=0)
    b = make_split(ds, 'random', seed=1)
    check_invariants(b, ds)
    assert a['test'] != b['test']
    n = _counts_by_class(ds, ds['ids'])
    t = a['how']['counts']['test']
    for c in 'ABC':  # about 20% of each class, up to one lesion over
        assert 0.2 * n[c] - 1 <= t[c] <= 0.2 * n[c] + 10
    assert abs(len(a['val']) - 0.1 * (600 - len(a['test']))) <= 20


def _counts_by_class(ds, ids):
    lab = dict(zip(ds['ids'], ds['labels']))
    out = {c: 0 for c in ds['classes']}
    for i in ids:
        out[ds['classes'][lab[i]]] += 1
    return out


def test_unlabelled_and_mixed_datasets():
    ds = fake([-1] * 50, [f'g{k // 2}' for k in range(50)], classes=())
    s = make_split(ds, 'random', seed=0)
    check_invariants(s, ds)
    assert len(s['test']) == 10 and s['how']['counts']['test'] == {'unlabelled': 10}
    error(lambda: make_split(ds, 'paper'), 'needs labels')
    # unlabelled images of a labelled dataset: pretrain only, never beside a test group
    labels = [k % 3 if k < 60 else -1 for k in range(80)]
    groups = [f'g{k % 40}' for k in range(80)]
    ds = fake(labels, groups)
    s = make_split(ds, 'random', seed=0)
    check_invariants(s, ds)
    unl = {i for i, l in zip(ds['ids'], ds['labels']) if l < 0}
    assert not unl & set(s['train'] + s['val'] + s['test'])
    assert unl & set(s['pretrain'])
    assert s['how']['unlabelled_in_pretrain'] == len(unl & set(s['pretrain']))


def test_official_split(tmp_path):
    file, _ = dermamnist(tmp_path / 'dermamnist.npz')
    ds = read_dataset(file)
    s = make_split(ds, 'official')
    assert s['train'] == [f'train_{k}' for k in range(10)]
    assert s['val'] == [f'val_{k}' for k in range(4)]
    assert s['test'] == [f'test_{k}' for k in range(6)]
    assert s['pretrain'] == s['train'] + s['val']
    error(lambda: make_split(fake([0, 1, 2]), 'official'), 'no official split')
    error(lambda: make_split(fake([0, 1, 2]), 'bogus'), 'bogus', 'paper')


def test_split_on_real_layout_and_extra(tmp_path):
    root = isic2019(tmp_path / 'ISIC2019')
    ds = read_dataset(root, drop_downsampled=True)
    extra = str(tmp_path / 'more')
    jpeg(os.path.join(extra, 'x.jpg'))
    s = make_split(ds, 'paper', seed=0, per_class=1, extra=[extra])
    check_invariants(s, ds)
    assert s['extra'] == [os.path.abspath(extra)] and s['format'] == 'isic2019'
    assert s['dataset'] == os.path.abspath(root)
    assert split_path(ds, 'paper') == os.path.join('splits', 'ISIC2019-paper.json')
    path = str(tmp_path / split_path(ds, 'paper'))
    save_split(path, s)
    assert load_split(path, ds) == json.loads(json.dumps(s))
    error(lambda: make_split(ds, 'random', extra=[str(tmp_path / 'nope')]), 'nope')


def test_load_split_detects_tampering(tmp_path):
    groups = [f'L{k // 3}' for k in range(90)]
    ds = fake([(k // 3) % 3 for k in range(90)], groups)
    s = make_split(ds, 'random', seed=0)
    path = str(tmp_path / 's.json')
    save_split(path, s)
    load_split(path, ds)

    def tampered(change):
        t = json.loads(json.dumps(s))
        change(t)
        with open(path, 'w') as f:
            json.dump(t, f)
        return lambda: load_split(path, ds)

    i = s['test'][0]
    error(tampered(lambda t: t['train'].append(i)), 'both train and test', i)
    # move one image of a test lesion to train (out of test too): the lesion crosses sides
    j = s['test'][0]

    def move(t):
        t['test'].remove(j)
        t['train'].append(j)
        t['pretrain'].append(j)
    g = ds['groups'][ds['ids'].index(j)]
    error(tampered(move), 'two sides', g)
    error(tampered(lambda t: t['val'].append('ghost')), 'missing from pretrain', 'ghost')
    error(tampered(lambda t: t['pretrain'].append('ghost')), 'not in', 'ghost')
    error(tampered(lambda t: t.pop('test')), 'missing test')
    with open(path, 'w') as f:
        f.write('{not json')
    error(lambda: load_split(path), 'not valid JSON')


# --------------------------------------------------------------------------- labelled subsets
def test_labelled_subset_per_class_and_fraction():
    labels = [0] * 40 + [1] * 20 + [2] * 5 + [-1] * 10
    ds = fake(labels)
    ids = ds['ids']
    a = labelled_subset(ds, ids, seed=0, per_class=10)
    assert _counts_by_class(ds, a) == {'A': 10, 'B': 10, 'C': 5}
    assert a == labelled_subset(ds, ids, seed=0, per_class=10)
    assert a != labelled_subset(ds, ids, seed=1, per_class=10)
    f = labelled_subset(ds, ids, seed=0, fraction=0.1)
    assert _counts_by_class(ds, f) == {'A': 4, 'B': 2, 'C': 1}  # at least one per class
    every = labelled_subset(ds, ids, seed=0)
    assert len(every) == 65 and every == [i for i, l in zip(ids, labels) if l >= 0]
    assert set(a) <= set(every) and a == [i for i in ids if i in set(a)]  # input order
    error(lambda: labelled_subset(ds, ids, 0, per_class=3, fraction=0.1), 'not both')
    error(lambda: labelled_subset(ds, ['nope'], 0), 'nope')


def test_labelled_subset_group_aware():
    groups = [f'L{k // 4}' for k in range(80)]  # lesions of 4, one class each
    ds = fake([(k // 4) % 2 for k in range(80)], groups, classes=('A', 'B'))
    for seed in range(3):
        s = labelled_subset(ds, ds['ids'], seed, per_class=10)
        assert _counts_by_class(ds, s) == {'A': 8, 'B': 8}  # never above the budget
        gs = {ds['groups'][ds['ids'].index(i)] for i in s}
        assert len(s) == 4 * len(gs)  # whole lesions only
    s = labelled_subset(ds, ds['ids'], 0, per_class=2)  # every lesion is over budget
    assert _counts_by_class(ds, s) == {'A': 4, 'B': 4}


def test_get_split_with_the_paper_protocol(tmp_path, monkeypatch):
    """finetune.py / probe.py --protocol paper without --split: ISIC 2019's classes get the
    paper's counts; other classes, when 500 a class leaves one untested, the line says how
    to make a split (those scripts have no --per-class)."""
    monkeypatch.chdir(tmp_path)
    names = list(common.PAPER_PER_CLASS)
    big = {c: n + 20 for c, n in common.PAPER_PER_CLASS.items()}  # 20 left to test a class
    labels = [k for k, c in enumerate(names) for _ in range(big[c])]
    split, path = common.get_split(fake(labels, classes=names), protocol='paper')
    assert split['how']['per_class'] == common.PAPER_PER_CLASS
    assert sum(split['how']['counts']['train'].values()) == 2554 and os.path.exists(path)
    (tmp_path / 'other').mkdir()
    monkeypatch.chdir(tmp_path / 'other')  # no split file of that name there yet
    error(lambda: common.get_split(fake([0] * 30 + [1] * 600), protocol='paper'),
          'leaves no test image of A (30 images)', 'python common.py split --protocol paper',
          'then pass --split FILE')
