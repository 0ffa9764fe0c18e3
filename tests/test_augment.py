"""Batched augmentations against torchvision.transforms.v2.functional (one op at a time, fixed
parameters), the statistics of the drawn parameters, determinism and the output contract."""
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode as IM

from common import (AUG_PRESETS, IMAGENET_MEAN, IMAGENET_STD, UserError, apply_params,
                      augment, augment_views, draw_params, preset_params)

# float32 rounding of a handful of ops on values in [0, 1], done in a different order or
# formula than torchvision's (lerp vs mul-add, separable vs 2-D kernel, branch-free HSV):
# measured up to 1.2e-6, a few ulps of 1.0 (1.2e-7 each). Resampling adds sample coordinates
# that differ by ~1e-6 px (our grid from float64 crop geometry vs torchvision's float32
# scale), times pixel steps up to 1 in noise images: measured up to 3.3e-6. 1e-5 covers both
# and is still 400x below one uint8 step (1/255), so any real convention slip (half a pixel,
# a swapped sign) fails by orders of magnitude.
TOL = 1e-5


def image(n=1, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def run(x, view=(), size=None, **drawn):
    """apply_params with everything off (the eval view: whole image at its own size) except
    the view keys in `view` and the drawn values in `drawn` (keys of draw_params' dict)."""
    view = {**preset_params('eval', size=size or x.shape[-1])[0], 'mean': None, 'std': None,
            **dict(view)}
    d = draw_params(view, x.shape[0], x.shape[2], x.shape[3], torch.Generator().manual_seed(0))
    for k, v in drawn.items():
        d[k] = torch.as_tensor(v, dtype=d[k].dtype).expand_as(d[k]).clone()
    return apply_params(x, view, d)


def close(a, b, tol=TOL):
    err = (a - b).abs().max().item()
    assert err <= tol, f'max abs error {err:.2e} > {tol:.0e}'


# --------------------------------------------------------------------------- colour ops
@pytest.mark.parametrize('op, factor', [('brightness', 0.6), ('brightness', 1.4),
                                        ('contrast', 0.6), ('contrast', 1.4),
                                        ('saturation', 0.0), ('saturation', 1.8),
                                        ('hue', -0.1), ('hue', 0.37)])
def test_jitter_op_matches_torchvision(op, factor):
    x = image(2)
    y = run(x, {'jitter_p': 1.0, op: 0.5}, jitter=True, **{op: factor})
    ref = getattr(TF, f'adjust_{op}')(x, factor)
    close(y, ref)


def test_jitter_order_per_batch_matches_torchvision_sequence():
    x = image(2, seed=1)
    f = dict(brightness=1.3, contrast=0.7, saturation=1.5, hue=0.2)
    order = [3, 0, 2, 1]
    view = dict(jitter_p=1.0, brightness=0.4, contrast=0.4, saturation=0.6, hue=0.3)
    y = run(x, view, jitter=True, order=order, **f)
    ref = x
    for op in order:
        name = ['brightness', 'contrast', 'saturation', 'hue'][op]
        ref = getattr(TF, f'adjust_{name}')(ref, f[name])
    close(y, ref)


def test_jitter_mask_leaves_other_samples_bitwise():
    x = image(4)
    y = run(x, dict(jitter_p=1.0, hue=0.5, brightness=0.5), jitter=[True, False, True, False],
            hue=0.3, brightness=1.2)
    assert torch.equal(y[1], x[1]) and torch.equal(y[3], x[3])
    assert not torch.equal(y[0], x[0])


def test_grayscale_matches_torchvision():
    x = image(2)
    close(run(x, dict(gray_p=1.0), gray=True), TF.rgb_to_grayscale(x, num_output_channels=3))


def test_solarize_matches_torchvision():
    x = image(2)
    # bitwise: the same comparison and 1 - x
    assert torch.equal(run(x, dict(solarize_p=1.0), solarize=True), TF.solarize(x, 0.5))


def test_solarize_threshold_is_128_for_uint8():
    x = torch.arange(120, 136, dtype=torch.uint8).view(1, 1, 4, 4).expand(1, 3, 4, 4)
    view = dict(preset_params('eval', size=8)[0], size=4, solarize_p=1.0, mean=None, std=None)
    y = augment(x.contiguous(), view, torch.Generator())
    ref = TF.solarize(x, 128).float() / 255
    close(y, ref, 1e-6)  # 255 - v and (255 - v) / 255 vs 1 - v / 255: float32 rounding


@pytest.mark.parametrize('size, sigma', [(32, 0.5), (32, 1.7), (64, 1.1)])
def test_blur_matches_torchvision(size, sigma):
    x = image(2, size)
    k = {32: 3, 64: 7}[size]  # odd, about 10% of the side
    ref = TF.gaussian_blur(x, [k, k], [sigma, sigma])
    close(run(x, dict(blur_p=1.0), blur=True, sigma=sigma), ref)


def test_blur_per_sample_sigma_and_mask():
    x = image(4)
    sig = [0.3, 1.0, 2.0, 1.5]
    y = run(x, dict(blur_p=1.0), blur=[True, True, False, True], sigma=sig)
    for i, s in enumerate(sig):
        if i == 2:
            assert torch.equal(y[i], x[i])  # not drawn: untouched
        else:
            close(y[i], TF.gaussian_blur(x[i], [3, 3], [s, s]))


def test_normalize_matches_torchvision():
    x = image(2)
    y = run(x, dict(mean=IMAGENET_MEAN, std=IMAGENET_STD))
    close(y, TF.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD)))


# --------------------------------------------------------------------------- geometry
def test_flip_matches_torchvision():
    x = image(2)
    # grid_sample at the mirrored pixel centres: off by float rounding of the coordinates only
    close(run(x, dict(flip_p=1.0), flip=True), TF.horizontal_flip(x))


def test_identity_is_exact():
    x = image(2)
    assert torch.equal(run(x), x)


@pytest.mark.parametrize('crop, size, interp, border', [
    ((5, 3, 40, 36), 24, 'bilinear', 0),  # downscale: every sample lies inside the crop
    ((10, 7, 20, 24), 32, 'bilinear', 1),  # upscale: edge samples reach past the crop
    ((5, 3, 40, 36), 24, 'bicubic', 2),  # bicubic taps reach 2 px past the sample
])
def test_resized_crop_matches_torchvision(crop, size, interp, border):
    # torchvision crops, then resizes the crop, clamping taps to the crop's edge; we sample the
    # full image, so taps past the crop read real neighbours: compare pixels whose taps stay
    # inside the crop (all of them when downscaling, bilinear). Same align_corners=False
    # pixel-centre convention, so the interior agrees to float rounding.
    x = image(2, 48)
    y = run(x, dict(interpolation=interp, antialias=False), size, crop=crop)
    mode = IM.BILINEAR if interp == 'bilinear' else IM.BICUBIC
    ref = TF.resized_crop(x, *crop, [size, size], interpolation=mode, antialias=False)
    if interp == 'bicubic':
        ref = ref.clamp(0, 1)  # we clamp bicubic overshoot; torchvision keeps it for floats
    s = slice(border, size - border)
    close(y[..., s, s], ref[..., s, s])


def test_rotate_matches_torchvision():
    x = image(3)
    y = run(x, dict(rotate_p=1.0, degrees=45.0), rotate=[True, False, True],
            angle=[30.0, 30.0, -40.0])
    # inside the inscribed circle less 1.5 px every bilinear tap is inside the rotated frame
    # and the two agree to float rounding; the ring at the frame's edge blends with the zero
    # fill slightly differently, the corners are zero in both
    r = (torch.arange(32) - 15.5).abs()
    inner = (r.view(-1, 1) ** 2 + r.view(1, -1) ** 2).sqrt() <= 16 - 1.5
    for i, angle in [(0, 30.0), (2, -40.0)]:
        ref = TF.rotate(x[i], angle, interpolation=IM.BILINEAR)
        close(y[i][..., inner], ref[..., inner])
        assert y[i, :, 0, 0].abs().max() == 0 and ref[:, 0, 0].abs().max() == 0
    close(y[1], x[1])  # not drawn: resampled at its own pixel centres, no zero fill


def test_one_pass_equals_crop_flip_rotate_chain():
    # on an image linear in (row, col), bilinear interpolation is exact, so the one affine
    # resampling must equal torchvision's three passes wherever all taps are inside
    H = 48
    rr, cc = torch.meshgrid(torch.arange(H).float(), torch.arange(H).float(), indexing='ij')
    x = torch.stack([0.1 + rr * 0.012 + cc * 0.005, 0.9 - cc * 0.015, 0.3 + rr * 0.01])[None]
    crop, S, angle = (6, 2, 40, 44), 32, -25.0
    y = run(x, dict(rotate_p=1.0, degrees=45.0, flip_p=1.0, antialias=False), S, crop=crop,
            flip=True, rotate=True, angle=angle)
    ref = TF.resized_crop(x, *crop, [S, S], interpolation=IM.BILINEAR, antialias=False)
    ref = TF.rotate(TF.horizontal_flip(ref), angle, interpolation=IM.BILINEAR)
    r = (torch.arange(S) - (S - 1) / 2).abs()
    inner = (r.view(-1, 1) ** 2 + r.view(1, -1) ** 2).sqrt() <= S / 2 - 1.5
    close(y[..., inner], ref[..., inner])


def test_eval_is_antialiased_resize_and_not_random():
    x = image(3, 64)
    view = preset_params('eval', size=32)[0]
    y1 = augment(x, view, torch.Generator().manual_seed(1))
    y2 = augment(x, view, None)  # global RNG
    assert torch.equal(y1, y2)
    # the prefilter is torchvision's own antialiased resize to exactly 32 px, then grid_sample
    # at the pixel centres: float rounding of the coordinates only
    ref = TF.resize(x, [32, 32], antialias=True)
    close(y1, TF.normalize(ref, list(IMAGENET_MEAN), list(IMAGENET_STD)))


# --------------------------------------------------------------------------- drawn params
N = 4000


def rate_ok(mask, p):
    # 3 binomial standard deviations (and exact for p = 0 or 1)
    sd = math.sqrt(p * (1 - p) / mask.numel())
    assert abs(mask.float().mean().item() - p) <= 3 * sd, (mask.float().mean().item(), p)


@pytest.mark.parametrize('preset', ['barlow_skin', 'barlow_imagenet', 'finetune_skin'])
def test_probabilities_and_ranges(preset):
    views = preset_params(preset)
    g = torch.Generator().manual_seed(0)
    for v in views:
        d = draw_params(v, N, 256, 256, g)
        for op, key in [('flip', 'flip_p'), ('rotate', 'rotate_p'), ('jitter', 'jitter_p'),
                        ('gray', 'gray_p'), ('blur', 'blur_p'), ('solarize', 'solarize_p')]:
            rate_ok(d[op], v[key])
        assert d['angle'].abs().max() <= v['degrees']
        spans = [('angle', -v['degrees'], v['degrees']), ('hue', -v['hue'], v['hue']),
                 ('sigma', *v['sigma'])]
        for k, lo, hi in spans:  # both ends reached: a draw from half the range fails here
            if hi > lo:
                assert d[k].min() <= lo + 0.01 * (hi - lo), (k, d[k].min(), lo)
                assert d[k].max() >= hi - 0.01 * (hi - lo), (k, d[k].max(), hi)
        for k in ('brightness', 'contrast', 'saturation'):
            lo, hi = max(0, 1 - v[k]), 1 + v[k]
            assert lo - 1e-6 <= d[k].min() and d[k].max() <= hi + 1e-6
            assert d[k].min() <= lo + 0.01 * (hi - lo) and d[k].max() >= hi - 0.01 * (hi - lo)
        assert d['hue'].abs().max() <= v['hue'] + 1e-6
        assert v['sigma'][0] <= d['sigma'].min() and d['sigma'].max() <= v['sigma'][1]
        assert sorted(d['order'].tolist()) == [0, 1, 2, 3]
        top, left, h, w = d['crop'].double().unbind(1)
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + h <= 256).all() and (left + w <= 256).all()
        # w = round(sqrt(area * r)), h = round(sqrt(area / r)): exact bounds with the rounding
        (s0, s1), (r0, r1) = v['scale'], v['ratio']
        A = 256 * 256
        assert ((h - 0.5) * (w - 0.5) <= s1 * A).all() and ((h + 0.5) * (w + 0.5) >= s0 * A).all()
        assert ((w - 0.5) / (h + 0.5) <= r1).all() and ((w + 0.5) / (h - 0.5) >= r0).all()
    if preset.startswith('barlow'):  # the asymmetric views of the paper
        assert (views[0]['blur_p'], views[1]['blur_p']) == (1.0, 0.1)
        assert (views[0]['solarize_p'], views[1]['solarize_p']) == (0.0, 0.2)


def test_jitter_order_is_drawn_per_batch():
    v, g = preset_params('barlow_skin')[0], torch.Generator().manual_seed(0)
    orders = {tuple(draw_params(v, 2, 16, 16, g)['order'].tolist()) for _ in range(100)}
    assert len(orders) >= 20  # of 24: 100 draws miss 0.3 on average, more than 4 w.p. ~3e-5


def test_crop_distribution_matches_torchvision():
    from torchvision.transforms import RandomResizedCrop
    v = preset_params('barlow_imagenet')[0]
    d = draw_params(v, N, 64, 80, torch.Generator().manual_seed(0))
    torch.manual_seed(0)  # torchvision draws from the global generator
    img = torch.empty(3, 64, 80)
    ref = torch.tensor([RandomResizedCrop.get_params(img, list(v['scale']), list(v['ratio']))
                        for _ in range(N)]).double()
    ours = d['crop'].double()
    for stat in (lambda c: c[:, 2] * c[:, 3] / (64 * 80),  # area fraction
                 lambda c: (c[:, 3] / c[:, 2]).log(),  # log aspect ratio
                 lambda c: c[:, 0] + c[:, 2] / 2):  # centre row
        a, b = stat(ours), stat(ref)
        se = math.sqrt(a.var().item() / N + b.var().item() / N)
        assert abs(a.mean().item() - b.mean().item()) <= 4 * se  # two-sample z, 4 sigma
    # every position a crop can take, as torchvision's randint(0, H - h + 1): both edges
    top, left, h, w = ours.unbind(1)
    small = (h < 64) & (w < 80)
    assert (top[small] == 0).any() and (left[small] == 0).any()
    assert (top[small] == 64 - h[small]).any() and (left[small] == 80 - w[small]).any()


def test_crop_fallback_is_centred_whole_image():
    # a 2:1 aspect never fits a 32 x 32 image at full area: torchvision's fallback
    v = dict(preset_params('eval', size=16)[0], scale=(1.0, 1.0), ratio=(2.0, 3.0))
    d = draw_params(v, 5, 32, 32, torch.Generator())
    assert d['crop'].tolist() == [[8, 0, 16, 32]] * 5  # h = round(32 / 2), centred


# --------------------------------------------------------------------------- contract
def batch(n=6, size=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    # (B, H, W, 3) as the uint8 cache stores it, permuted: a channels_last (B, 3, H, W)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g
                         ).permute(0, 3, 1, 2)


@pytest.mark.parametrize('preset', list(AUG_PRESETS))
def test_output_contract(preset):
    x = batch()
    x0 = x.clone()
    views = preset_params(preset, size=32)
    ys = augment_views(x, views, torch.Generator().manual_seed(0))
    assert len(ys) == len(views)
    for v, y in zip(views, ys):
        assert y.dtype == torch.float32 and y.shape == (6, 3, 32, 32)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(y).all()
        if v['mean'] is None:
            assert y.min() >= 0 and y.max() <= 1
    assert torch.equal(x, x0)


def test_preset_name_at_default_size():
    ys = augment_views(batch(1), 'barlow_skin', torch.Generator())
    assert [y.shape for y in ys] == [(1, 3, 256, 256)] * 2


def test_seed_reproduces_batch_bitwise():
    x = batch()
    views = preset_params('barlow_skin', size=32)
    a = augment_views(x, views, torch.Generator().manual_seed(3))
    b = augment_views(x, views, torch.Generator().manual_seed(3))
    c = augment_views(x, views, torch.Generator().manual_seed(4))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not any(torch.equal(p, q) for p, q in zip(a, c))
    assert not torch.equal(a[0], a[1])  # the two views differ


def test_uint8_equals_float_input():
    x = batch()
    views = preset_params('barlow_imagenet', size=32)
    a = augment_views(x, views, torch.Generator().manual_seed(5))
    b = augment_views(x.float() / 255, views, torch.Generator().manual_seed(5))
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_augment_equals_augment_views_view_by_view():
    x = batch()
    views = preset_params('barlow_skin', size=32)
    a = augment_views(x, views, torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(6)
    assert all(torch.equal(y, augment(x, v, g)) for y, v in zip(a, views))


def test_fp32_under_autocast():
    x = batch()
    view = preset_params('barlow_skin', size=32)[0]
    ref = augment(x, view, torch.Generator().manual_seed(7))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = augment(x, view, torch.Generator().manual_seed(7))
    assert y.dtype == torch.float32 and torch.equal(y, ref)


# --------------------------------------------------------------------------- presets
def test_preset_params_overrides_and_copies():
    assert [len(preset_params(n)) for n in ('barlow_imagenet', 'barlow_skin',
                                            'finetune_skin', 'eval')] == [2, 2, 1, 1]
    views = preset_params('barlow_skin', size=64, blur_p=0.5, scale=[0.5, 1.0], hue=None)
    assert all(v['size'] == 64 and v['blur_p'] == 0.5 and v['scale'] == (0.5, 1.0)
               for v in views)
    assert views[0]['hue'] == 0.06  # None = flag not given: keep the preset's value
    views[0]['size'] = 1
    assert preset_params('barlow_skin')[0]['size'] == 256  # the preset itself is untouched
    skin = preset_params('barlow_skin')[0]
    assert (skin['brightness'], skin['contrast'], skin['saturation'], skin['hue']) == \
        (0.24, 0.24, 0.12, 0.06)
    for name in AUG_PRESETS:  # every view normalises as the pretrained weights expect
        assert all(v['mean'] == IMAGENET_MEAN and v['std'] == IMAGENET_STD
                   for v in preset_params(name))
    ft = preset_params('finetune_skin')[0]
    assert (ft['flip_p'], ft['rotate_p'], ft['degrees'], ft['jitter_p']) == (0.25, 0.25, 45, 0)


def test_preset_params_errors_name_the_choices():
    with pytest.raises(UserError, match="'nope'.*barlow_imagenet.*eval"):
        preset_params('nope')
    with pytest.raises(UserError, match='blurp.*blur_p'):
        preset_params('eval', blurp=0.5)
    with pytest.raises(UserError, match='flip_p'):
        preset_params('eval', flip_p=1.5)
    with pytest.raises(UserError, match='interpolation'):
        preset_params('eval', interpolation='nearest')
