"""Write the embedded default datasets: a procedural ImageNet stand-in and an ISIC 2019 look-alike.

    python make_synthetic.py                                  # data/source + data/skin, ~2 min
    python make_synthetic.py --grid docs/synthetic_grid.png   # also a contact sheet per class
    python make_synthetic.py --only skin --skin-count 6000 --force   # a bigger skin set
    python make_synthetic.py --size 128 --out data128         # finer detail, for bigger models
    python make_synthetic.py --out /tmp/tiny --size 32 --source-per-class 4 --skin-count 40
    make data                                                 # what the Makefile runs

Defaults (2,400 source + 2,500 skin images at 64 px; about 70 CPU-seconds, 2 min on two busy
cores) are sized so that the whole experiment runs in minutes on a CPU with resnet18 at 32 px.

data/source/<class>/<class>_00000.jpg  ImageFolder of 12 classes of procedural objects and
    textures (stripes, rings, spokes, cells, branches, stars...) under random colours, lighting,
    scale, rotation and position; pretraining on it teaches edges, blobs, lines, meshes, colour.
data/skin/  the ISIC 2019 layout: ISIC_2019_Training_Input/ISIC_0000000.jpg ...,
    ISIC_2019_Training_GroundTruth.csv (one-hot MEL..SCC, UNK) and _Metadata.csv (age, site,
    lesion_id, sex). Dermoscopy-like lesions of the 8 classes with an ISIC-like imbalance; a
    class is a distribution over size, asymmetry, border, colours and structures (STRUCTURES:
    network, globules, streaks, vessels, keratin...), and the classes overlap. Nuisances (skin
    tone, light, hair, vignette, bubbles, rulers, JPEG quality) vary independently; some lesions
    are photographed 2-3 times (same lesion_id, another rotation/scale/light).

Deterministic for --seed: every image draws from its own random stream, whatever --workers.
Each dataset is written to a hidden staging folder, stamped with .synthetic.json last, then
renamed into place: an interrupted run never looks finished, and a rerun with the same
settings leaves a finished dataset alone (--force rewrites it). Needs only numpy and pillow.
"""
import argparse
import colorsys
import csv
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from types import SimpleNamespace

import numpy as np
from PIL import Image, ImageDraw, ImageFont

VERSION = 2  # bump when the images change, so old stamps no longer match
STAMP = '.synthetic.json'
SOURCE_CLASSES = ['blobs', 'branches', 'cells', 'checkers', 'crosses', 'grid', 'polygons',
                  'rings', 'spokes', 'spots', 'stars', 'stripes']
SKIN_CLASSES = ['MEL', 'NV', 'BCC', 'AK', 'BKL', 'DF', 'VASC', 'SCC']  # ground-truth column order
ISIC_COUNTS = {'MEL': 4522, 'NV': 12875, 'BCC': 3323, 'AK': 867, 'BKL': 2624, 'DF': 239,
               'VASC': 253, 'SCC': 628}  # the real ISIC 2019 training set, 25,331 images (no UNK)
SKIN_DIR, SKIN_GT, SKIN_META = ('ISIC_2019_Training_Input', 'ISIC_2019_Training_GroundTruth.csv',
                                'ISIC_2019_Training_Metadata.csv')


def fail(msg):
    print(f'error: {msg}', file=sys.stderr)
    sys.exit(2)


# --------------------------------------------------------------------------- drawing helpers
# Images are rendered at R = 2 * size in float32 RGB in [0, 1], then box-downsampled (antialias).
def smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def grid(R):  # pixel-centre coordinates xx, yy
    return np.mgrid[0:R, 0:R][::-1].astype(np.float32) + 0.5


def noise(rng, R, cells):
    """Smooth value noise in [0, 1], (R, R): a random cells x cells grid upsampled bicubically."""
    a = np.asarray(Image.fromarray(rng.random((int(cells) + 1,) * 2).astype(np.float32), 'F')
                   .resize((R, R), Image.BICUBIC))
    return (a - a.min()) / (a.max() - a.min() + 1e-6)


def blur(a, sigma):
    """Separable Gaussian blur over the first two axes of a (R, R) or (R, R, 3) array."""
    if sigma < 0.3:
        return a
    k = int(3 * sigma + 0.5)
    w = np.exp(-np.arange(-k, k + 1) ** 2 / (2 * sigma ** 2))
    for ax in (0, 1):
        p = np.pad(a, [(k, k) if i == ax else (0, 0) for i in range(a.ndim)], mode='edge')
        a = sum(w[i] * np.take(p, range(i, i + a.shape[ax]), ax) for i in range(2 * k + 1))
    return (a / w.sum() ** 2).astype(np.float32)


def mask(R, fn):  # fn(ImageDraw) paints 1.0 on a black float canvas
    im = Image.new('F', (R, R), 0.0)
    fn(ImageDraw.Draw(im))
    return np.array(im, dtype=np.float32)


def disc(d, x, y, r, **kw):
    d.ellipse([x - r, y - r, x + r, y + r], **(kw or dict(fill=1.0)))


def voronoi(xx, yy, px, py):
    """Per pixel, half the gap between the nearest and the second-nearest seed: the distance to a
    cell wall (one seed at a time, so memory stays (R, R) whatever the size)."""
    d1, d2 = np.full(xx.shape, np.inf, np.float32), np.full(xx.shape, np.inf, np.float32)
    for x, y in zip(px.tolist(), py.tolist()):
        d = (xx - x) ** 2 + (yy - y) ** 2
        d1, d2 = np.minimum(d1, d), np.minimum(d2, np.maximum(d1, d))
    return (np.sqrt(d2) - np.sqrt(d1)) / 2


def tree(d, x, y, ang, length, width, depth, rng, bend=0.25):
    """A line in three steps turning by about bend (hair, streak, vessel, twig), then while
    depth > 0 two thinner, shorter children."""
    pts = [(x, y)]
    for _ in range(3):
        ang += rng.normal(0, bend)
        x, y = x + math.cos(ang) * length / 3, y + math.sin(ang) * length / 3
        pts.append((x, y))
    d.line(pts, fill=1.0, width=max(1, round(width)), joint='curve')
    for side in (-1, 1)[:2 * (depth > 0)]:
        if rng.random() < 0.85:
            tree(d, x, y, ang + side * rng.uniform(0.3, 0.8), length * rng.uniform(0.55, 0.8),
                 width * 0.7, depth - 1, rng, bend)


def over(img, colour, alpha):  # colour (3,) or (R, R, 3), alpha (R, R)
    a = np.clip(alpha, 0, 1)[..., None]
    return img * (1 - a) + np.asarray(colour, np.float32) * a


def finish(img, rng, size, blur_p):
    """Camera: light gradient, white balance, blur, sensor noise; then to uint8 at `size`."""
    R, (xx, yy), ang = len(img), grid(len(img)), rng.uniform(0, 2 * np.pi)
    light = 1 + rng.uniform(0, 0.25) * ((xx * math.cos(ang) + yy * math.sin(ang)) / R - 0.5)
    temp, tint = rng.normal(0, 0.07), abs(rng.normal(0, 0.04))  # white balance: warm/cool, magenta
    img = img * (light * rng.uniform(0.75, 1.2))[..., None] * [1 + temp, 1 - tint, 1 - temp]
    if rng.random() < blur_p:
        img = blur(img, rng.uniform(0.5, 1.3) * R / 128)
    img = img + rng.normal(0, rng.uniform(0.004, 0.02), img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)).resize(
        (size, size), Image.BOX)


# ------------------------------------------------------------------- source (ImageNet stand-in)
def rand_colour(rng):
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.random() ** 0.7, rng.uniform(0.1, 1)),
                    np.float32)


def source_mask(cls, rng, R, u, v, s, z0):
    """Where the object is, (R, R) in [0, 1]. u, v: its frame (about +-1 over the object), scaled
    by s, centred on z0 (complex pixel coordinates) for the drawn shapes."""
    r, a, f = np.hypot(u, v), np.arctan2(v, u), rng.uniform(1.5, 5)
    wave = lambda x: smoothstep(-0.25, 0.25, np.sin(np.pi * f * x) + rng.uniform(-0.4, 0.4))
    disc_ = smoothstep(1.05, 0.95, r / rng.uniform(0.5, 1.5))
    if cls == 'stripes':  # straight or wavy
        return wave(u + rng.uniform(0, 0.3) * np.sin(v * rng.uniform(2, 9)) * (rng.random() < .4))
    if cls == 'checkers':
        return smoothstep(-0.1, 0.1, np.sin(np.pi * f * u) * np.sin(np.pi * f * v))
    if cls == 'rings':
        return wave(r) * disc_
    if cls == 'spokes':
        return wave(a * rng.integers(2, 8) / np.pi / f * 2) * disc_ * (r > rng.uniform(0, 0.2))
    if cls == 'grid':
        w = rng.uniform(0.03, 0.1)
        return smoothstep(w, w / 2, np.minimum(*[abs(f * x - np.round(f * x)) / f for x in (u, v)]))
    if cls == 'crosses':
        L, W = rng.uniform(0.5, 0.9), rng.uniform(0.1, 0.25)
        arm = lambda a, b: smoothstep(0.03, -0.03, np.maximum(np.abs(a) - L, np.abs(b) - W))
        return np.maximum(arm(u, v), arm(v, u))
    if cls == 'cells':
        sp = rng.uniform(0.12, 0.3) * R * s
        g = np.arange(-sp, R + sp, sp)
        px, py = [x.ravel() + rng.uniform(-.35, .35, x.size) * sp for x in np.meshgrid(g, g)]
        w = sp * rng.uniform(0.04, 0.12)
        return smoothstep(w, w * 0.5, voronoi(*grid(R), px, py))
    if cls == 'blobs':  # one to three amoebas: wobbly outlines
        m = 0
        for _ in range(rng.integers(1, 4)):
            ox, oy = rng.uniform(-0.5, 0.5, 2)
            rho = rng.uniform(0.3, 0.6) * (1 + sum(rng.uniform(0, .25 / k) * np.cos(
                k * np.arctan2(v - oy, u - ox) + rng.uniform(0, 6.3)) for k in range(1, 6)))
            m = np.maximum(m, smoothstep(1.05, 0.95, np.hypot(u - ox, v - oy) / rho))
        return m
    if cls in ('polygons', 'stars'):
        n = rng.integers(3, 9) if cls == 'polygons' else 2 * rng.integers(5, 10)
        radii = (rng.uniform(0.45, 0.75) * rng.uniform(0.85, 1.15, n) if cls == 'polygons' else
                 rng.uniform(0.5, 0.8) * np.tile([1, rng.uniform(0.3, 0.55)], n // 2))
        z = z0 + radii * s * R / 2 * np.exp(1j * (rng.uniform(0, 7) + np.arange(n) * 2 * np.pi / n))
        return mask(R, lambda d: d.polygon([(p.real, p.imag) for p in z.tolist()], fill=1.0))
    if cls == 'spots':
        xyr = rng.uniform([0, 0, .02 * R * s], [R, R, .09 * R * s], (rng.integers(4, 30), 3))
        return mask(R, lambda d: [disc(d, x, y, q) for x, y, q in xyr])
    return mask(R, lambda d: [tree(d, *rng.uniform(0.1, 0.9, 2) * R, rng.uniform(0, 2 * np.pi),
                                   rng.uniform(0.25, 0.45) * R * s, rng.uniform(0.02, 0.05) * R,
                                   3, rng) for _ in range(rng.integers(1, 4))])  # branches


def source_image(cls, rng, R):
    xx, yy = grid(R)
    # background: solid, gradient or two-colour noise, with fine grain
    b1, b2, kind = rand_colour(rng), rand_colour(rng), rng.integers(3)
    t = xx * 0 if kind == 0 else xx / R if kind == 1 else noise(rng, R, rng.integers(2, 7))
    img = (b1 + (b2 - b1) * t[..., None]) * (1 + 0.08 * (noise(rng, R, R // 6)[..., None] - .5))
    # the object's frame: rotation th, scale s, centre z0
    th, s = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.3)
    z0 = complex(*rng.uniform(0.3, 0.7, 2) * R)
    z = (xx + 1j * yy - z0) / (R / 2) * np.exp(-1j * th) / s
    m = source_mask(cls, rng, R, z.real, z.imag, s, z0)
    # foreground: the most contrasting of five colours, maybe a gradient, with a noisy fill
    f = max([rand_colour(rng) for _ in range(5)], key=lambda c: abs(c.mean() - img.mean()))
    if rng.random() < 0.3:
        f = f + (rand_colour(rng) - f) * (z.real.clip(-1, 1)[..., None] * 0.5 + 0.5)
    f = f * (1 + 0.15 * (noise(rng, R, rng.integers(3, 12))[..., None] - 0.5))
    img = over(img, f, m * rng.uniform(0.75, 1.0))
    if rng.random() < 0.25:  # distractors: a few thin curves, as hair will be on skin
        img = over(img, rand_colour(rng), mask(R, lambda d: [tree(
            d, *rng.uniform(0, R, 2), rng.uniform(0, 7), R * rng.uniform(.3, 1), 1, 0, rng)
            for _ in range(rng.integers(1, 4))]))
    return img


# ------------------------------------------------------------------ skin (ISIC 2019 look-alike)
# Pigment colours are factors on the skin tone (a lesion on darker skin is darker); others absolute.
PIGMENT = {'tan': (.86, .74, .64), 'light': (.72, .55, .43), 'brown': (.52, .36, .26),
           'dark': (.30, .20, .14)}
COLOUR = {'black': (.10, .08, .08), 'bluegrey': (.45, .48, .55), 'slate': (.30, .33, .40),
          'veil': (.70, .71, .73), 'red': (.80, .22, .25), 'pink': (.92, .60, .62),
          'white': (.95, .93, .91), 'scar': (.87, .86, .84), 'keratin': (.95, .90, .77),
          'purple': (.50, .17, .32), 'maroon': (.36, .08, .14), 'crust': (.40, .16, .10)}

# Shape: uniform ranges. Radius is a fraction of half the image; asymmetry and border are the
# amplitudes of the low and high harmonics of the outline; colours: how many in the body.
#          radius       asymmetry    border       edge soft    colours  body opacity
SHAPE = {
    'MEL': ((.45, .80), (.06, .20), (.03, .07), (.02, .08), (2, 5), (.85, 1.0)),
    'NV': ((.35, .75), (.00, .05), (.00, .02), (.04, .14), (1, 2), (.75, 1.0)),
    'BCC': ((.35, .70), (.03, .12), (.02, .06), (.05, .14), (1, 3), (.60, .95)),
    'AK': ((.40, .80), (.04, .14), (.02, .05), (.12, .25), (1, 2), (.60, .90)),
    'BKL': ((.40, .80), (.04, .14), (.03, .08), (.01, .04), (1, 3), (.80, 1.0)),
    'DF': ((.35, .65), (.00, .07), (.00, .03), (.10, .22), (1, 2), (.70, .95)),
    'VASC': ((.30, .60), (.00, .10), (.01, .04), (.02, .05), (1, 2), (.85, 1.0)),
    'SCC': ((.40, .75), (.05, .15), (.02, .06), (.06, .15), (1, 3), (.60, .95)),
}
# Body colour: the base drawn with these weights (classes overlap on purpose: pigmented BCC,
# AK and SCC exist, and a colour mean alone should not give the class away), then extra colours,
# in soft zones, concentric with probability ZONES (else .15: DF's pale centre, NV's rings).
BASE_NAMES = ['tan', 'light', 'brown', 'dark', 'pink', 'red', 'purple']
BASE = {'MEL': (.15, .30, .30, .20, .05, .00, .00), 'NV': (.25, .30, .25, .17, .03, .00, .00),
        'BCC': (.15, .25, .20, .05, .35, .00, .00), 'AK': (.20, .30, .15, .05, .25, .05, .00),
        'BKL': (.20, .30, .25, .20, .05, .00, .00), 'DF': (.20, .35, .25, .05, .15, .00, .00),
        'VASC': (.00, .05, .10, .15, .10, .30, .30), 'SCC': (.20, .30, .15, .05, .25, .05, .00)}
EXTRA = {'MEL': ['black', 'dark', 'dark', 'bluegrey', 'bluegrey', 'tan', 'red', 'white'],
         'NV': ['dark', 'brown', 'tan'], 'BCC': ['bluegrey', 'pink', 'white', 'brown'],
         'AK': ['pink', 'red', 'light'], 'BKL': ['dark', 'brown', 'keratin', 'black'],
         'DF': ['pink', 'brown'], 'VASC': ['purple', 'maroon', 'black'],
         'SCC': ['white', 'keratin', 'red', 'light']}
ZONES = {'NV': .85, 'DF': .8}


# A lesion is a namespace L in its own frame, points as complex numbers x + iy (centre L.c): the
# border radius L.rho(angle), L.d (0 at the centre, 1 on the border), windows L.win (where a
# structure may show) and a premultiplied RGBA layer L.P, L.A that the primitives paint in turn.
def pick(rng, v):
    """A table value: a (lo, hi) range draws uniformly, a tuple of names picks one, else as is."""
    if isinstance(v, tuple):
        return str(rng.choice(v)) if isinstance(v[0], str) else rng.uniform(*v)
    return v


def colour(L, name):  # jittered; pigments on the skin tone
    c = np.array(PIGMENT[name]) * L.skin if name in PIGMENT else np.array(COLOUR[name])
    return np.clip(c * L.rng.normal(1, 0.04, 3), 0, 1).astype(np.float32)


def paint(L, c, alpha, win='all'):
    a = np.clip(alpha * L.win[win], 0, 1).astype(np.float32)
    L.P, L.A = over(L.P, colour(L, c) if isinstance(c, str) else c, a), L.A * (1 - a) + a


def points(L, n, t=(0, .85), sector=None):
    """n points at normalised radius in t, all round or in a sector that wide (radians) at a
    random angle: on one side, as atypical structures are."""
    rng = L.rng
    a = (rng.uniform(0, 2 * np.pi, n) if sector is None else
         rng.uniform(0, 2 * np.pi) + rng.uniform(-.5, .5, n) * pick(rng, sector))
    return L.c + np.sqrt(rng.uniform(t[0] ** 2, t[1] ** 2, n)) * L.rho(a) * np.exp(1j * a)


def lattice(L, sp, jitter, tmax):
    """A jittered hexagonal lattice of spacing sp, the points within tmax of the border."""
    g = np.arange(-1.6 * L.rad, 1.6 * L.rad, sp)
    z = (g[None] + (np.arange(len(g))[:, None] % 2) * sp / 2 + 0.866j * g[:, None]).ravel()
    z = z + (L.rng.normal(0, jitter * sp, z.size) + 1j * L.rng.normal(0, jitter * sp, z.size))
    return z[np.abs(z) / L.rho(np.angle(z)) < tmax] + L.c


# --------------------------------------------------------------------------- lesion primitives
def spots(L, c, r, n=(5, 15), t=(0, .85), sector=None, sp=None, jit=.2, ring=0, soft=0,
          op=(.7, .95), win='all'):
    """Discs (rings ring * R wide if ring), n of radius r * R at random, or on a lattice of
    spacing sp * R with radius r * spacing; a tuple of colours: one per spot."""
    rng, R = L.rng, L.R
    if sp:
        s = pick(rng, sp) * R
        z = lattice(L, s, jit, t[1])
        rs = pick(rng, r) * s * rng.uniform(0.85, 1.15, len(z))
    else:
        z = points(L, rng.integers(n[0], n[1] + 1), t, sector)
        rs = rng.uniform(*r, len(z)) * R
    names, alpha = rng.choice(c if isinstance(c, tuple) else [c], len(z)), pick(rng, op)
    kw = dict(outline=1.0, width=max(1, round(ring * R))) if ring else {}
    for name in sorted(set(names.tolist())):  # sorted: set order varies per process
        m = mask(R, lambda d: [disc(d, p.real, p.imag, q, **kw)
                               for p, q in zip(z[names == name], rs[names == name])])
        paint(L, name, blur(m, soft * R) * alpha, win)


def net(L, c, sp, w, jit=.2, soft=.005, op=(.5, .8), win='all'):
    """A network: the walls of a jittered lattice's cells, spacing sp * R, width w * spacing."""
    s = pick(L.rng, sp) * L.R
    z = lattice(L, s, jit, 1.2)
    width = pick(L.rng, w) * s * (0.7 + 0.6 * noise(L.rng, L.R, 6))
    walls = smoothstep(width, width * 0.3, voronoi(L.xx, L.yy, z.real, z.imag))
    paint(L, pick(L.rng, c), blur(walls, soft * L.R) * pick(L.rng, op), win)


def patch(L, c, size=0, t=(0, .5), soft=0, op=(.6, .9), win='all'):
    """A ragged blot of radius size * lesion radius around a point at t; size 0: all of win."""
    rng, m = L.rng, 1.0
    if size:
        r = np.abs(L.xx + 1j * L.yy - points(L, 1, t)) / (pick(rng, size) * L.rad)
        m = blur(smoothstep(1, .7, r + .6 * (noise(rng, L.R, rng.integers(4, 9)) - .5)), soft * L.R)
    paint(L, pick(rng, c), m * pick(rng, op), win)


def lines(L, c, n, length, w, t=(.4, .95), out=False, sector=None, depth=0, op=(.8, 1)):
    """n strokes w * R wide, length * lesion radius long, from points at t: outwards across the
    border (streaks) or inwards, branching depth times (vessels)."""
    rng = L.rng

    def draw(d):
        for p in points(L, rng.integers(n[0], n[1] + 1), t, sector).tolist():
            ang = np.angle(p - L.c) + (rng.normal(0, .2) if out else math.pi + rng.normal(0, .8))
            tree(d, p.real, p.imag, ang, L.rad * pick(rng, length), L.R * pick(rng, w), depth, rng,
                 0.05 if out else 0.25)
    paint(L, pick(rng, c), mask(L.R, draw) * pick(rng, op), 'any' if out else 'all')


def body(L):
    """The pigmented body: a few colours in soft zones, mottled."""
    rng, g = L.rng, SHAPE[L.cls]
    k = rng.integers(g[4][0], g[4][1] + 1)
    names = [rng.choice(BASE_NAMES, p=BASE[L.cls])] + list(rng.choice(EXTRA[L.cls], k - 1))
    if L.cls == 'MEL':  # at least one of black, dark brown, blue-grey
        names[1] = rng.choice(['black', 'dark', 'bluegrey'])
    fields = np.stack([noise(rng, L.R, rng.integers(2, 5)) for _ in range(k)])
    if rng.random() < ZONES.get(L.cls, .15):
        centres = np.sort(rng.uniform(0, 1, k))[::-1 if L.cls == 'DF' else 1]
        fields = 0.2 * fields - np.abs(L.d[None] - centres[:, None, None])
    wt = np.exp(rng.uniform(10, 30) * (fields - fields.max(0)))  # soft zones, soft edges
    c = np.einsum('kyx,kc->yxc', wt / wt.sum(0), np.stack([colour(L, n) for n in names]))
    mottle = 0.8 * noise(rng, L.R, L.R // 12) + 0.2 * noise(rng, L.R, L.R // 4)
    paint(L, c * (0.85 + 0.3 * mottle)[..., None], rng.uniform(*g[5]))


# Each structure: the percent chance that a lesion of each class shows it, then the primitive
# that draws it and its parameters; drawn in this order. Sizes are fractions of R (of the lesion
# radius: line lengths, patch sizes); (lo, hi) ranges draw per lesion; a tuple of colours picks
# one (spots: one per spot). Detail far below a pixel at the trained 32 px is left out.
STRUCTURES = {  # MEL NV BCC AK BKL DF VASC SCC
    'erythema':   (' 5  0 25 75  5 10 10 55', patch,  # sun-damaged pink halo
                   dict(c='pink', win='halo', op=(.2, .45))),
    'body':       ('100 ' * 8, body, {}),  # pigment in colour zones
    'periph_net': (' 0  0  0  0  0 80  0  0', net,  # delicate network at the rim (DF)
                   dict(c='brown', sp=(.10, .13), w=.08, win='rim', op=(.35, .6))),
    'network':    (' 5 65  0  0  5  0  0  0', net,  # regular reticular network
                   dict(c=('brown', 'dark'), sp=(.11, .15), w=.12, win='centre', op=(.5, .75))),
    'atyp_net':   ('70  8  0  0  5  0  0  0', net,  # thick, broken, irregular network
                   dict(c=('dark', 'black'), sp=(.12, .18), w=(.12, .2), jit=.35, win='patchy')),
    'veil':       ('45  2 10  0  3  0  0  0', patch,  # blue-white veil
                   dict(c='veil', size=(.3, .6), soft=.02, op=(.55, .85))),
    'regression': ('40  2  5  0  3  0  0  0', patch,  # white scar-like area
                   dict(c='scar', size=(.3, .55), t=(.2, .7), op=(.4, .7))),
    'white_centre': (' 3  2  3  0  0 90  0  5', patch,  # DF's central white patch
                     dict(c='white', size=(.35, .6), t=(0, .15), soft=.02, op=(.65, .9))),
    'globules':   (' 5 50  0  0  0  0  0  0', spots,  # regular cobblestone globules
                   dict(c=('brown', 'dark'), sp=(.085, .11), r=(.25, .35), op=(.5, .8))),
    'dots':       ('60  8  5  0  8  0  0  0', spots,  # irregular dots on one side
                   dict(c=('black', 'dark', 'bluegrey'), n=(8, 30), r=(.015, .04), t=(.5, 1),
                        sector=(1.5, 4.5), op=(.7, 1))),
    'nests':      (' 8  2 75  0  3  0  0  0', spots,  # blue-grey ovoid nests (BCC)
                   dict(c=('bluegrey', 'slate'), n=(2, 8), r=(.05, .11), t=(0, .9), soft=.01)),
    'streaks':    ('45  0  0  0  0  0  0  0', lines,  # radial streaks on one side
                   dict(c=('dark', 'black'), n=(5, 15), length=(.3, .45), w=(.018, .028),
                        t=(.8, .8), out=True, sector=(1, 3))),
    'starburst':  (' 0  6  0  0  0  0  0  0', lines,  # streaks all round (Spitz/Reed naevus)
                   dict(c=('dark', 'black'), n=(14, 24), length=(.3, .45), w=(.018, .028),
                        t=(.8, .8), out=True)),
    'fissures':   (' 0  3  0  0 60  0  0  0', net,  # cerebriform ridges (seborrhoeic keratosis)
                   dict(c='dark', sp=(.18, .25), w=(.15, .25), jit=.45, win='centre')),
    'comedo':     (' 0  3  0  0 65  0  0  0', spots,  # comedo-like openings
                   dict(c=('dark', 'black', 'crust'), n=(2, 10), r=(.03, .05))),
    'milia':      (' 0  5  5  0 80  0  0  0', spots,  # milia-like cysts, glowing
                   dict(c=('white', 'keratin'), n=(2, 10), r=(.025, .045), soft=.012, op=(.8, 1))),
    'lacunae':    (' 0  0  0  0  0  0 95  0', spots,  # red-purple lacunae
                   dict(c=('red', 'red', 'purple', 'maroon'), sp=(.11, .16), r=(.4, .55), jit=.12,
                        t=(0, 1), soft=.006, op=1)),
    'strawberry': (' 0  0  0 80  0  0  0 10', net,  # red pseudo-network (AK)
                   dict(c='red', sp=(.10, .14), w=.3, jit=.3, soft=.01)),
    'scale':      (' 0  0  2 70 15  0  0 30', spots,  # white-yellow surface scale
                   dict(c=('white', 'keratin'), n=(30, 80), r=(.015, .035), t=(0, .95),
                        sector=(2, 4), soft=.006, op=(.5, .85))),
    'keratin':    (' 0  0  0 15 10  0  0 80', patch,  # central keratin mass
                   dict(c='keratin', size=(.35, .65), t=(0, .3), op=(.75, .95))),
    'follicles':  (' 0  0  0 50  0  0  0 55', spots,  # white circles round follicles
                   dict(c='white', n=(5, 15), r=(.03, .05), t=(0, .9), ring=.015, op=(.7, .9))),
    'ulceration': (' 5  0 30  2  0  0  5 35', patch,  # blood crust
                   dict(c=('crust', 'red', 'maroon'), size=(.2, .4), t=(0, .7), op=(.8, .95))),
    'arborizing': (' 3  0 90  5  3  0  0  8', lines,  # branching vessels (BCC)
                   dict(c='red', n=(1, 3), length=(.4, .6), w=(.025, .035), depth=3)),
    'dotted':     ('10  2  5 40  5 10  0 45', spots,  # dotted vessels
                   dict(c=('red', 'maroon'), n=(15, 50), r=(.012, .02), t=(0, .95), op=(.7, .9))),
    'glomerular': (' 0  0  0 10  3  0  0 65', spots,  # coiled vessels (SCC)
                   dict(c='red', n=(8, 24), r=(.015, .03), t=(0, .9), ring=.012, op=(.8, 1))),
    'hairpin':    (' 0  0  0  5 25  0  0 20', lines,  # looped vessels
                   dict(c='red', n=(4, 12), length=(.1, .2), w=(.012, .018), t=(.3, .9))),
}


def make_lesion(cls, rng, R):
    """One lesion in its own frame (centre R/2), its structures painted. Rendered once per
    lesion id, then photographed once per image, so repeated photos show the same lesion."""
    g = SHAPE[cls]
    L = SimpleNamespace(cls=cls, rng=rng, R=R, c=R / 2 * (1 + 1j), rad=rng.uniform(*g[0]) * R / 2)
    # border radius rho(angle) = rad * (1 + sum_k amp_k cos(k angle + phase_k)): harmonics 1-3
    # make the lesion asymmetric, 4-14 make its border irregular (Python floats: float32 stays)
    amp = (rng.uniform(*g[1]) * rng.dirichlet(np.ones(3))).tolist() + (
        rng.uniform(*g[2]) * rng.random(11) * 2 / np.sqrt(np.arange(4, 15))).tolist()
    phase = rng.uniform(0, 2 * np.pi, 14).tolist()
    L.rho = lambda a: L.rad * (1 + sum(amp[k] * np.cos((k + 1) * a + phase[k]) for k in range(14)))
    soft, t = rng.uniform(*g[3]), rng.beta(1.2, 3)  # skin tone: mostly fair, as in ISIC
    L.skin = (np.array([.95, .80, .74]) * (1 - t) + np.array([.42, .28, .20]) * t
              ) * rng.normal(1, 0.03, 3)
    L.xx, L.yy = grid(R)
    z = L.xx + 1j * L.yy - L.c
    L.d = np.abs(z) / L.rho(np.angle(z))
    inside = smoothstep(1 + soft, 1 - soft, L.d)
    L.win = dict(any=1, all=inside, halo=smoothstep(1.8, 0.9, L.d),  # halo: round it too
                 centre=inside * smoothstep(1.0, 0.6, L.d), rim=inside * smoothstep(0.4, 0.7, L.d),
                 patchy=inside * smoothstep(0.35, 0.5, noise(rng, R, rng.integers(3, 6))))
    L.P, L.A = np.zeros((R, R, 3), np.float32), np.zeros((R, R), np.float32)
    for pct, draw, params in STRUCTURES.values():
        if rng.random() * 100 < int(pct.split()[SKIN_CLASSES.index(cls)]):
            draw(L, **params)
    return L


def photograph(L, rng, size):
    """One dermoscopy image of a lesion: pose, skin, hair, bubbles, ruler, vignette, camera."""
    R = L.R
    # pose: rotate, scale, shift, maybe mirror (PIL's affine maps output pixels to input pixels)
    a, s = rng.uniform(0, 2 * np.pi), rng.uniform(0.85, 1.15)
    m = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) / s
    m[:, 0] *= rng.choice([-1, 1])
    off = R / 2 - m @ (R / 2 + rng.uniform(-.08, .08, 2) * R)
    P, A = [np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(ch), 'F').transform(
        (R, R), Image.AFFINE, (*m[0], off[0], *m[1], off[1]), Image.BILINEAR))
        for ch in np.moveaxis(X, -1, 0)], -1) for X in (L.P, L.A[..., None])]
    # skin: tone with blotchy redness and fine texture
    skin = L.skin * (1 + 0.07 * (noise(rng, R, rng.integers(3, 7)) - .5))[..., None]
    skin = over(skin, COLOUR['pink'], noise(rng, R, 4) * rng.uniform(0, .3))
    img = skin * (1 + 0.05 * (noise(rng, R, R // 5) - .5))[..., None] * (1 - A) + P
    if rng.random() < 0.35:  # hair: long dark curves across the field
        hair = mask(R, lambda d: [tree(d, *rng.uniform(-.1, 1.1, 2) * R, rng.uniform(0, 7),
                                       R * rng.uniform(.5, 1.5), R * rng.uniform(.005, .011), 0,
                                       rng, .15) for _ in range(min(12, rng.geometric(.3)))])
        img = over(img, np.array([.25, .2, .17]) * rng.uniform(.3, 1), hair * .9)
    if rng.random() < 0.15:  # gel bubbles: bright rim and a specular highlight
        b = rng.uniform([0, 0, .03 * R], [R, R, .12 * R], (rng.integers(1, 5), 3))
        rim = mask(R, lambda d: [disc(d, x, y, r, outline=1.0, width=max(1, round(R / 100)))
                                 for x, y, r in b])
        spec = mask(R, lambda d: [disc(d, x - r * .4, y - r * .4, r * .15) for x, y, r in b])
        img = over(img, (1, 1, 1), blur(rim, .7) * .6 + spec * .8)
    if rng.random() < 0.08:  # a ruler along one edge: a light strip with ticks
        w, sp, k = R * .08, R * rng.uniform(.035, .05), rng.integers(4)
        strip = mask(R, lambda d: d.rectangle([0, 0, R, w - 1], fill=1.0))
        ticks = mask(R, lambda d: [d.line([(x, 0), (x, w * (.5 + .4 * (j % 2 == 0)))], fill=1.0)
                                   for j, x in enumerate(np.arange(sp / 2, R, sp))])
        img = over(over(img, (.9, .9, .85), np.rot90(strip, k) * .85), (.1, .1, .1),
                   np.rot90(ticks, k))
    r = np.hypot(L.xx - R / 2, L.yy - R / 2) / (R / 2)
    img = img * (1 - 0.25 * rng.random() * r ** 2)[..., None]  # lens falloff
    if rng.random() < 0.45:  # the dermatoscope's round field: dark corners
        edge = rng.uniform(1.0, 1.35)
        img = img * smoothstep(edge + .08, edge - rng.uniform(.05, .15), r)[..., None]
    return finish(img, rng, size, blur_p=0.3)


def class_counts(n):
    """ISIC 2019's class proportions for n images, every class at least 3% (DF and VASC would
    otherwise get too few to learn and test on), NV absorbing the rounding."""
    floor, total = max(1, round(0.03 * n)), sum(ISIC_COUNTS.values())
    counts = {k: max(floor, round(n * v / total)) for k, v in ISIC_COUNTS.items()}
    counts['NV'] += n - sum(counts.values())
    return counts


SITES = ['anterior torso', 'posterior torso', 'lateral torso', 'upper extremity',
         'lower extremity', 'head/neck', 'palms/soles', 'oral/genital', '']
SITE_P = {True: [.05, .05, .02, .1, .08, .6, .02, .01, .07],  # AK, SCC, BCC: sun-exposed skin
          False: [.25, .25, .05, .15, .18, .05, .02, .01, .04]}
AGE = {'MEL': 60, 'NV': 42, 'BCC': 67, 'AK': 70, 'BKL': 62, 'DF': 45, 'VASC': 48, 'SCC': 72}


def skin_plan(n, seed):
    """The images, sorted by name: class, metadata, lesion key, image key (1-3 per lesion)."""
    rng, lesions = np.random.default_rng([seed, 1, 0]), []
    for cls, k in class_counts(n).items():
        while k > 0:
            views = min(k, rng.choice([1, 2, 3], p=[.7, .2, .1]))
            k -= views
            site = rng.choice(SITES, p=SITE_P[cls in ('AK', 'SCC', 'BCC')])
            age = float(np.clip(5 * round(rng.normal(AGE[cls], 14) / 5), 5, 85))
            age = '' if rng.random() < .03 else f'{age:.1f}'  # '55.0' as in the real file
            sex = rng.choice(['male', 'female', ''], p=[.52, .45, .03])
            lesions.append(dict(cls=cls, views=views, site=site, age=age, sex=sex))
    order = rng.permutation(len(lesions))  # lesion numbers and ids don't reveal the class
    numbers = rng.choice(10 * len(lesions), len(lesions), replace=False)
    for j, k in enumerate(order):  # as in ISIC 2019, some single images have no lesion id
        lesions[k].update(key=j, lesion_id='' if lesions[k]['views'] == 1 and rng.random() < .2
                          else f'{"HAM" if rng.random() < .7 else "BCN"}_{numbers[j]:07d}')
    photos = [lesions[k] for k in order for _ in range(lesions[k]['views'])]
    images = []
    for i, p in enumerate(rng.permutation(len(photos))):
        down = photos[p]['cls'] in ('NV', 'MEL') and rng.random() < .03  # the paper drops these
        images.append(dict(photos[p], image=f'ISIC_{i:07d}' + '_downsampled' * down, key_img=i))
    return sorted(images, key=lambda im: im['image'])


# --------------------------------------------------------------------------- writing
def render_job(job):
    """Render and write one image (in a worker); its own random stream [seed, kind, keys] makes
    the bytes independent of the order. job: (dataset, path, size, seed, keys)."""
    kind, path, size, seed, keys = job
    if kind == 'source':
        rng = np.random.default_rng([seed, 0, *keys])
        im, q = finish(source_image(SOURCE_CLASSES[keys[0]], rng, 2 * size), rng, size, .2), 75
    else:
        les = make_lesion(keys[0], np.random.default_rng([seed, 2, keys[1]]), 2 * size)
        rng = np.random.default_rng([seed, 3, keys[2]])
        im, q = photograph(les, rng, size), 70
    im.save(path, 'JPEG', quality=int(rng.integers(q, 96)))


def stage(root, force, settings):
    """None when root already holds this dataset; else a fresh hidden staging folder."""
    stamp = os.path.join(root, STAMP)
    if os.path.exists(root) and not os.path.exists(stamp) and (
            not os.path.isdir(root) or os.listdir(root)):
        fail(f'{root} exists and was not written by make_synthetic.py (no {STAMP}); '
             f'move it away or pass another --out')
    try:
        with open(stamp) as f:
            if not force and json.load(f).get('settings') == settings:
                return None
    except (OSError, ValueError):
        pass
    tmp = os.path.join(os.path.dirname(root), f'.{os.path.basename(root)}.partial')
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def publish(tmp, root, stamp):
    """Stamp the staging folder last, then swap it in place of root."""
    with open(os.path.join(tmp, STAMP + '.tmp'), 'w') as f:
        json.dump(stamp, f, indent=1)
    os.replace(os.path.join(tmp, STAMP + '.tmp'), os.path.join(tmp, STAMP))
    old = os.path.join(os.path.dirname(root), f'.{os.path.basename(root)}.old')
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(root):
        os.replace(root, old)
    os.replace(tmp, root)
    shutil.rmtree(old, ignore_errors=True)


def write_csv(path, rows):
    with open(path, 'w', newline='') as f:
        csv.writer(f, lineterminator='\n').writerows(rows)


def write_dataset(args, pool, name):
    """Write OUT/source or OUT/skin, unless it is there already with these settings."""
    root, n = os.path.join(args.out, name), args.source_per_class
    settings = dict(version=VERSION, size=args.size, seed=args.seed, **(
        dict(per_class=n) if name == 'source' else dict(count=args.skin_count)))
    tmp = stage(root, args.force, settings)
    if tmp is None:
        print(f'{name}: {root} is complete with these settings, left alone (--force rewrites it)')
        return
    if name == 'source':
        for cls in SOURCE_CLASSES:
            os.makedirs(os.path.join(tmp, cls))
        jobs = [(name, os.path.join(tmp, cls, f'{cls}_{i:05d}.jpg'), args.size, args.seed, (k, i))
                for k, cls in enumerate(SOURCE_CLASSES) for i in range(n)]
        stamp, detail = dict(classes={c: n for c in SOURCE_CLASSES}), f'12 classes x {n}'
    else:
        images = skin_plan(args.skin_count, args.seed)
        os.makedirs(os.path.join(tmp, SKIN_DIR))
        jobs = [(name, os.path.join(tmp, SKIN_DIR, im['image'] + '.jpg'), args.size, args.seed,
                 (im['cls'], im['key'], im['key_img'])) for im in images]
        write_csv(os.path.join(tmp, SKIN_GT), [['image', *SKIN_CLASSES, 'UNK']] + [
            [im['image']] + ['1.0' if im['cls'] == c else '0.0' for c in SKIN_CLASSES] + ['0.0']
            for im in images])
        write_csv(os.path.join(tmp, SKIN_META), [
            ['image', 'age_approx', 'anatom_site_general', 'lesion_id', 'sex']] + [
            [im[k] for k in ('image', 'age', 'site', 'lesion_id', 'sex')] for im in images])
        counts = {c: sum(im['cls'] == c for im in images) for c in SKIN_CLASSES}
        stamp = dict(classes=counts, lesions=len({im['key'] for im in images}))
        detail = ' '.join(f'{c} {k}' for c, k in counts.items())
    t0 = time.time()
    for done, _ in enumerate(pool.imap_unordered(render_job, jobs, chunksize=8) if pool else
                             map(render_job, jobs), 1):
        if sys.stdout.isatty() and done % 50 == 0:
            print(f'\r{name}: {done}/{len(jobs)}', end='', flush=True)
    publish(tmp, root, dict(settings=settings, generator='make_synthetic.py', images=len(jobs),
                            **stamp))
    print(f'\r{name}: {len(jobs)} images ({detail}), {args.size} px -> {root} '
          f'({time.time() - t0:.1f} s)')


# --------------------------------------------------------------------------- contact sheet
def write_grid(path, out, only, cols=6):
    """One PNG: a labelled row of samples per class, for each dataset written under out."""
    rows = []  # (label, [image paths]); a section's title has no images
    src, skin = os.path.join(out, 'source'), os.path.join(out, 'skin')
    if only in (None, 'source') and os.path.isdir(src):
        rows += [('source (ImageFolder)', [])] + [(c, [os.path.join(src, c, f) for f in sorted(
            os.listdir(os.path.join(src, c)))[:cols]]) for c in SOURCE_CLASSES]
    if only in (None, 'skin') and os.path.isdir(skin):
        with open(os.path.join(skin, SKIN_GT)) as f:
            gt = list(csv.DictReader(f))
        rows += [('skin (ISIC 2019 layout)', [])] + [(c, [os.path.join(
            skin, SKIN_DIR, r['image'] + '.jpg') for r in gt if r[c] == '1.0'][:cols])
            for c in SKIN_CLASSES]
    if not rows:
        fail(f'--grid: no datasets under {out} to show')
    cell = Image.open(rows[1][1][0]).size[0]
    cell *= max(1, round(96 / cell))  # a whole-pixel zoom to about 96 px
    try:
        font = ImageFont.load_default(size=max(12, cell // 7))
    except TypeError:  # pillow < 10.1
        font = ImageFont.load_default()
    heights = [cell if paths else cell // 3 for _, paths in rows]
    sheet, y = Image.new('RGB', ((cols + 1) * cell, sum(heights)), 'white'), 0
    for (label, paths), h in zip(rows, heights):
        ImageDraw.Draw(sheet).text((4, y + h // 2 - cell // 10), label, fill='black', font=font)
        for k, p in enumerate(paths):
            with Image.open(p) as im:
                sheet.paste(im.convert('RGB').resize((cell, cell), Image.NEAREST),
                            ((k + 1) * cell, y))
        y += h
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path + '.tmp', 'PNG')
    os.replace(path + '.tmp', path)
    print(f'grid: {path}')


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.error, add = fail, ap.add_argument  # errors: one line on stderr, exit status 2
    add('--out', default='data', help='root folder; writes OUT/source and OUT/skin (default: data)')
    add('--only', choices=['source', 'skin'], help='write just one dataset (default: both)')
    add('--size', type=int, default=64, help='image side in pixels; structures scale with it '
        '(default 64: the experiment trains at 32)')
    add('--source-per-class', type=int, default=200, help='images per source class (default 200)')
    add('--skin-count', type=int, default=2500, help='skin images, in ISIC 2019 proportions with '
        'every class at least 3%% (default 2500: NV 1156 ... DF, VASC, SCC 75 each)')
    add('--seed', type=int, default=0, help='same seed, same bytes (default 0)')
    add('--workers', type=int, default=min(2, os.cpu_count() or 1),
        help='processes rendering images; the bytes do not depend on it (default: 2)')
    add('--force', action='store_true', help='rewrite a dataset even if it is there already')
    add('--grid', metavar='PATH', help='also write a PNG contact sheet, a row per class')
    args = ap.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        fail(f'--out {args.out}: is a file; pass a folder')
    for flag, low in (('size', 16), ('source_per_class', 1), ('skin_count', len(SKIN_CLASSES)),
                      ('workers', 1)):
        if getattr(args, flag) < low:
            fail(f'--{flag.replace("_", "-")} {getattr(args, flag)}: must be at least {low}')
    return args


def main():
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    pool = mp.Pool(args.workers) if args.workers > 1 else None
    try:
        for name in ('source', 'skin'):
            if args.only in (None, name):
                write_dataset(args, pool, name)
    finally:
        if pool:
            pool.close()
            pool.join()
    if args.grid:
        write_grid(args.grid, args.out, args.only)


if __name__ == '__main__':
    main()
