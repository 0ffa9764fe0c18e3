"""Generic readers (ImageFolder, plain folder) and the uint8 cache: decoding of every odd image
kind, round trip, reuse, rebuild on change, bad files reported by name, the loader."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def expected(arr, size):
    """The cache's contract, computed independently: shorter side to size, centre crop."""
    im = Image.fromarray(arr)
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


# --------------------------------------------------------------------------- readers
def test_imagefolder_and_folder(tmp_path):
    for c in ('cat', 'dog'):
        (tmp_path / 'lab' / c / 'sub').mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rgb(12, 12, i)).save(tmp_path / 'lab' / c / f'{i}.png')
        Image.fromarray(rgb(12, 12, 9)).save(tmp_path / 'lab' / c / 'sub' / 'deep.jpg')
    (tmp_path / 'lab' / 'cat' / 'notes.txt').write_text('not an image')
    ds = C.read_dataset(str(tmp_path / 'lab'))
    assert ds['format'] == 'imagefolder' and ds['classes'] == ['cat', 'dog']
    assert len(ds['ids']) == 8 and ds['labels'].count(0) == 4
    assert 'cat/sub/deep.jpg' in ds['ids']
    flat = C.read_dataset(str(tmp_path / 'lab'), 'folder')  # labels ignored: unlabelled pool
    assert flat['format'] == 'folder' and set(flat['labels']) == {-1} and len(flat['ids']) == 8
    loose = tmp_path / 'loose'
    (loose / 'a').mkdir(parents=True)
    for ext in ('jpg', 'jpeg', 'png', 'bmp', 'tif', 'webp'):
        Image.fromarray(rgb(8, 8)).save(loose / 'a' / f'x.{ext}')
    Image.fromarray(rgb(8, 8)).save(loose / 'top.png')
    ds = C.read_dataset(str(loose))  # a loose image at the top: not an ImageFolder
    assert ds['format'] == 'folder' and len(ds['ids']) == 7


@pytest.mark.parametrize('case', ['missing', 'empty', 'no-images'])
def test_reader_errors(tmp_path, case):
    path = tmp_path / 'd'
    if case != 'missing':
        path.mkdir()
    if case == 'no-images':
        (path / 'readme.txt').write_text('x')
    with pytest.raises(C.UserError) as e:
        C.read_dataset(str(path))
    assert str(path) in str(e.value)
    with pytest.raises(C.UserError, match='--format bogus'):
        C.read_dataset(str(tmp_path), 'bogus')


# --------------------------------------------------------------------------- decoding
def test_odd_image_kinds_decode_to_rgb(tmp_path):
    base = rgb(30, 40)
    Image.fromarray(base).convert('L').save(tmp_path / 'gray.png')
    rgba = np.dstack([base, np.full((30, 40), 255, np.uint8)])
    rgba[:, :5, 3] = 0  # transparent strip: composited on white
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'rgba.png')
    Image.fromarray(base).convert('P').save(tmp_path / 'palette.png')
    Image.fromarray(base).convert('CMYK').save(tmp_path / 'cmyk.jpg')
    Image.fromarray(base[..., 0].astype(np.uint16) * 257).save(tmp_path / 'g16.png')
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(base).save(tmp_path / 'exif.jpg', exif=exif.tobytes(), quality=95)
    for name in ('gray.png', 'rgba.png', 'palette.png', 'cmyk.jpg', 'g16.png', 'exif.jpg'):
        im = C.load_image(str(tmp_path / name))
        assert im.mode == 'RGB', name
    assert C.load_image(str(tmp_path / 'exif.jpg')).size == (30, 40)  # transposed
    assert np.asarray(C.load_image(str(tmp_path / 'rgba.png')))[:, :5].min() == 255
    g16 = np.asarray(C.load_image(str(tmp_path / 'g16.png')))[..., 0]
    assert np.abs(g16.astype(int) - base[..., 0]).max() <= 1  # 16 bits scaled, not clipped
    gray = np.asarray(C.load_image(str(tmp_path / 'gray.png')))
    assert (gray[..., 0] == gray[..., 2]).all()


def test_cache_round_trip_sizes_and_reuse(tmp_path):
    src = tmp_path / 'imgs'
    src.mkdir()
    arrays = {'wide.png': rgb(20, 50, 1), 'tall.png': rgb(50, 20, 2), 'tiny.png': rgb(10, 10, 3)}
    for name, a in arrays.items():
        Image.fromarray(a).save(src / name)
    big = np.zeros((3000, 4000, 3), np.uint8)
    big[:, :2000] = (200, 30, 30)
    big[:, 2000:] = (20, 40, 220)
    Image.fromarray(big).save(src / 'big.jpg', quality=90)
    ds = C.read_dataset(str(src))
    index = C.build_cache(ds, 16, str(tmp_path / 'cache'), workers=2, verbose=False)
    arr = np.load(index['file'], mmap_mode='r')
    assert arr.shape == (4, 16, 16, 3) and arr.dtype == np.uint8
    assert index['ids'] == ds['ids'] and index['bad'] == []
    for k, i in enumerate(index['ids']):
        if i in arrays:  # resampling of the same picture: equal up to rounding
            assert np.abs(arr[k].astype(int) - expected(arrays[i], 16)).mean() < 2, i
    b = arr[index['ids'].index('big.jpg')]
    b = b.astype(int)
    assert tuple(b[8, 2]) == pytest.approx((200, 30, 30), abs=12)  # left half red
    assert tuple(b[8, 13]) == pytest.approx((20, 40, 220), abs=12)  # right half blue
    stamp = os.path.getmtime(index['file'])
    again = C.build_cache(ds, 16, str(tmp_path / 'cache'), workers=0, verbose=False)
    assert again == index and os.path.getmtime(index['file']) == stamp  # reused, not rebuilt
    # the same files, other labels (a corrected label CSV): the cache is not reused with the
    # old ones, which training and scoring read from it
    labelled = dict(ds, labels=[0, 1, 0, 1], classes=['a', 'b'])
    C.build_cache(labelled, 16, str(tmp_path / 'cache'), workers=0, verbose=False)
    relabelled = dict(labelled, labels=[1, 0, 1, 0])
    fresh = C.build_cache(relabelled, 16, str(tmp_path / 'cache'), workers=0, verbose=False)
    assert fresh['labels'] == [relabelled['labels'][ds['ids'].index(i)] for i in fresh['ids']]
    assert fresh['fingerprint'] != index['fingerprint']
    assert C.find_cache(ds, 16, str(tmp_path / 'cache')) is None  # the old labels: not it
    regrouped = dict(relabelled, groups=['one'] * len(ds['ids']))
    assert C.build_cache(regrouped, 16, str(tmp_path / 'cache'), workers=0,
                         verbose=False)['groups'] == ['one'] * len(ds['ids'])
    index = C.build_cache(ds, 16, str(tmp_path / 'cache'), workers=0, verbose=False)
    stamp = os.path.getmtime(index['file'])
    Image.fromarray(rgb(10, 10, 7)).save(src / 'tiny.png')  # the source changes
    os.utime(src / 'tiny.png', (stamp + 5, stamp + 5))
    ds = C.read_dataset(str(src))
    rebuilt = C.build_cache(ds, 16, str(tmp_path / 'cache'), workers=0, verbose=False)
    assert rebuilt['fingerprint'] != index['fingerprint']
    k = rebuilt['ids'].index('tiny.png')
    assert np.array_equal(np.load(rebuilt['file'])[k], expected(rgb(10, 10, 7), 16))
    leftovers = [f for f in os.listdir(tmp_path / 'cache') if 'tmp' in f]
    assert leftovers == []


def test_bad_files_are_listed_and_skip_bad_records_them(tmp_path, capsys):
    src = tmp_path / 'imgs'
    src.mkdir()
    for i in range(3):
        Image.fromarray(rgb(12, 12, i)).save(src / f'good{i}.jpg')
    data = open(src / 'good0.jpg', 'rb').read()
    (src / 'truncated.jpg').write_bytes(data[:len(data) // 2])
    (src / 'fake.png').write_bytes(b'this is not a png at all')
    ds = C.read_dataset(str(src))
    with pytest.raises(C.UserError) as e:
        C.build_cache(ds, 8, str(tmp_path / 'cache'), workers=0, verbose=False)
    msg = str(e.value)
    assert 'truncated.jpg' in msg and 'fake.png' in msg and '--skip-bad' in msg
    assert not any(f.endswith('.npy') for f in os.listdir(tmp_path / 'cache'))
    index = C.build_cache(ds, 8, str(tmp_path / 'cache'), workers=2, skip_bad=True,
                          verbose=False)
    assert sorted(index['ids']) == ['good0.jpg', 'good1.jpg', 'good2.jpg']
    assert sorted(os.path.basename(b['path']) for b in index['bad']) == ['fake.png',
                                                                         'truncated.jpg']
    assert np.load(index['file']).shape[0] == 3
    on_disk = json.load(open(index['file'][:-4] + '.json'))
    assert len(on_disk['bad']) == 2


# --------------------------------------------------------------------------- loader
def test_loader_batches_follow_the_sampler(tmp_path):
    src = tmp_path / 'lab'
    for c in range(2):
        (src / f'c{c}').mkdir(parents=True)
        for i in range(10):
            a = np.full((8, 8, 3), c * 100 + i, np.uint8)  # the pixel value names the image
            Image.fromarray(a).save(src / f'c{c}' / f'{i}.png')
    ds = C.read_dataset(str(src))
    cache = C.build_cache(ds, 8, str(tmp_path / 'cache'), workers=0, verbose=False)
    positions = list(range(20))
    loader = C.make_loader(cache, positions, 4, rank=0, world=2, seed=3, workers=0)
    other = C.make_loader(cache, positions, 4, rank=1, world=2, seed=3, workers=0)
    sampler = loader.sampler
    assert len(loader) == 2  # 10 images per rank, batches of 4, the last one dropped
    seen = []
    for ld in (loader, other):
        ld.sampler.set_epoch(1)
        for x, y in ld:
            assert x.dtype == torch.uint8 and x.shape == (4, 8, 8, 3)
            values = x[:, 0, 0, 0].tolist()
            assert y.tolist() == [v // 100 for v in values]  # labels stay with their images
            seen += values
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 16  # two ranks, disjoint
    sampler.set_epoch(1)
    full = [x[:, 0, 0, 0].tolist() for x, _ in loader]
    sampler.set_epoch(1, skip=1)  # mid-epoch resume: the same epoch minus its first batch
    assert [x[:, 0, 0, 0].tolist() for x, _ in loader] == full[1:]
    sampler.set_epoch(2)
    assert [x[:, 0, 0, 0].tolist() for x, _ in loader] != full
    x, _ = next(iter(loader))
    xd, _ = C.to_device((x, torch.zeros(4, dtype=torch.long)), torch.device('cpu'))
    assert xd.shape == (4, 3, 8, 8) and xd.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(C.UserError, match='batch'):
        C.make_loader(cache, positions[:3], 4, workers=0)


def test_seeds_draw_their_own_epoch_orders():
    """Every (seed, epoch) shuffles the same images its own way: DistributedSampler's seed +
    epoch alone gave seed 1's epoch 0 the order of seed 0's epoch 1, so seeds of a run over
    the same images (every labelled image, a whole pool) shared their epochs' orders."""
    def order(seed, epoch):
        b = C.EpochBatches(40, 40, seed=seed)
        b.set_epoch(epoch)
        return tuple(next(iter(b)))
    orders = {(s, e): order(s, e) for s in range(8) for e in range(8)}
    assert len(set(orders.values())) == len(orders)
    assert order(3, 5) == orders[3, 5] and sorted(order(3, 5)) == list(range(40))
