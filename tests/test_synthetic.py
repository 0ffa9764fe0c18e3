"""make_synthetic.py, run as a subprocess on tiny settings: layouts, determinism, reruns, errors."""
import csv
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'make_synthetic.py')
TINY = ['--size', '32', '--source-per-class', '3', '--skin-count', '60', '--workers', '1']
CLASSES = ['MEL', 'NV', 'BCC', 'AK', 'BKL', 'DF', 'VASC', 'SCC']


def run(*args, ok=True):
    p = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True,
                       timeout=120)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def files(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            with open(os.path.join(d, f), 'rb') as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = fh.read()
    return out


def read_csv(path):
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp('syn')
    p = run('--out', out, *TINY, '--grid', out / 'grid.png')
    return out, p.stdout


def test_source_is_an_imagefolder(tiny):
    out, _ = tiny
    src = out / 'source'
    classes = sorted(c for c in os.listdir(src) if not c.startswith('.'))
    assert len(classes) >= 10
    for c in classes:
        assert sorted(os.listdir(src / c)) == [f'{c}_{i:05d}.jpg' for i in range(3)]
        with Image.open(src / c / f'{c}_00000.jpg') as im:
            assert (im.format, im.mode, im.size) == ('JPEG', 'RGB', (32, 32))
    assert (src / '.synthetic.json').exists()


def test_skin_has_the_isic_2019_layout(tiny):
    out, stdout = tiny
    skin = out / 'skin'
    head, gt = read_csv(skin / 'ISIC_2019_Training_GroundTruth.csv')
    assert head == ['image', 'MEL', 'NV', 'BCC', 'AK', 'BKL', 'DF', 'VASC', 'SCC', 'UNK']
    assert len(gt) == 60
    for row in gt:
        assert all(v in ('0.0', '1.0') for v in row[1:]) and row[-1] == '0.0'
        assert sum(float(v) for v in row[1:]) == 1.0
    names = [r[0] for r in gt]
    assert names == sorted(names) and all(re.fullmatch(r'ISIC_\d{7}(_downsampled)?', n)
                                          for n in names)
    jpgs = sorted(os.listdir(skin / 'ISIC_2019_Training_Input'))
    assert jpgs == [n + '.jpg' for n in names]  # every CSV row has its JPEG, and nothing else
    with Image.open(skin / 'ISIC_2019_Training_Input' / jpgs[0]) as im:
        assert (im.format, im.mode, im.size) == ('JPEG', 'RGB', (32, 32))
    counts = {c: sum(r[1 + k] == '1.0' for r in gt) for k, c in enumerate(CLASSES)}
    assert min(counts.values()) >= 1  # all 8 classes
    assert counts['NV'] == max(counts.values()) and counts['MEL'] > counts['BCC'] > counts['DF']
    assert f'NV {counts["NV"]}' in stdout  # the progress line reports the counts

    head, meta = read_csv(skin / 'ISIC_2019_Training_Metadata.csv')
    assert head == ['image', 'age_approx', 'anatom_site_general', 'lesion_id', 'sex']
    assert [r[0] for r in meta] == names
    cls = {r[0]: r[1:9].index('1.0') for r in gt}
    by_lesion = {}
    for image, age, site, lesion, sex in meta:
        assert re.fullmatch(r'(\d+\.0)?', age) and sex in ('male', 'female', '')
        assert re.fullmatch(r'((HAM|BCN)_\d{7})?', lesion)
        if lesion:
            by_lesion.setdefault(lesion, []).append(image)
    repeated = [ims for ims in by_lesion.values() if len(ims) > 1]
    assert repeated, 'some lesions should be photographed more than once'
    for ims in repeated:  # one lesion, one diagnosis, but not the same picture twice
        assert len({cls[i] for i in ims}) == 1
        a, b = (np.asarray(Image.open(skin / 'ISIC_2019_Training_Input' / f'{i}.jpg'))
                for i in ims[:2])
        assert not np.array_equal(a, b)


def test_grid_is_written(tiny):
    out, _ = tiny
    with Image.open(out / 'grid.png') as im:
        assert im.format == 'PNG' and im.size[1] > (12 + 8) * 32


def test_same_seed_same_bytes_whatever_the_workers(tiny, tmp_path):
    out, _ = tiny
    run('--out', tmp_path, *TINY[:-1], '2')  # --workers 2 instead of 1
    expected = files(out)
    expected.pop('grid.png')
    assert files(tmp_path) == expected


def test_another_seed_gives_other_images(tiny, tmp_path):
    out, _ = tiny
    run('--out', tmp_path, *TINY, '--seed', '1')
    a, b = files(out), files(tmp_path)
    imgs = [k for k in a if k.endswith('.jpg') and k in b]
    assert imgs and sum(a[k] != b[k] for k in imgs) == len(imgs)


def test_rerun_leaves_a_finished_dataset_alone(tmp_path):
    args = ['--out', tmp_path, '--size', '16', '--source-per-class', '1', '--skin-count', '8',
            '--workers', '1']

    def stat():
        return {k: (os.stat(tmp_path / k).st_mtime_ns, os.stat(tmp_path / k).st_ino)
                for k in files(tmp_path)}
    run(*args)
    before = stat()
    p = run(*args)
    assert p.stdout.count('left alone') == 2 and stat() == before
    run(*args, '--force')
    assert stat() != before
    run(*args, '--seed', '5')  # other settings: rewritten, nothing left over
    assert sorted(os.listdir(tmp_path)) == ['skin', 'source']


def test_interrupted_run_is_not_finished_and_is_cleaned_up(tmp_path):
    partial = tmp_path / '.skin.partial'
    partial.mkdir()
    (partial / 'junk.jpg').write_bytes(b'half')
    run('--out', tmp_path, '--only', 'skin', '--size', '16', '--skin-count', '8', '--workers', '1')
    assert not partial.exists() and (tmp_path / 'skin' / '.synthetic.json').exists()
    assert not (tmp_path / 'source').exists()


def test_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path):
    (tmp_path / 'skin').mkdir()
    (tmp_path / 'skin' / 'mine.txt').write_text('keep me')
    p = run('--out', tmp_path, '--only', 'skin', '--size', '16', '--skin-count', '8', ok=False)
    assert p.returncode == 2 and 'not written by make_synthetic.py' in p.stderr
    assert (tmp_path / 'skin' / 'mine.txt').read_text() == 'keep me'


@pytest.mark.parametrize('flag', [['--size', '8'], ['--source-per-class', '0'],
                                  ['--skin-count', '0'], ['--size', 'big'], ['--only', 'both'],
                                  ['--no-such-flag']])
def test_bad_flag_is_one_line_and_exit_2(tmp_path, flag):
    p = run('--out', tmp_path, *flag, ok=False)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ')
    assert not os.listdir(tmp_path)  # nothing written
