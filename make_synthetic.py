"""Write the embedded default datasets: a procedural ImageNet stand-in and an ISIC 2019 look-alike.

    python make_synthetic.py                                  # data/source + data/skin, ~30 s
    python make_synthetic.py --grid docs/synthetic_grid.png   # also a contact sheet per class
    python make_synthetic.py --only skin --skin-count 6000 --force   # a bigger skin set
    python make_synthetic.py --size 128 --out data128         # finer detail, for bigger models
    python make_synthetic.py --out /tmp/tiny --size 32 --source-per-class 4 --skin-count 40
    make data                                                 # what the Makefile runs

Defaults (2,400 source + 2,500 skin images at 64 px, ~30 s on two cores) are sized so that the
whole experiment runs in minutes on a CPU with resnet18 at 32 px.

data/source/<class>/<class>_00000.jpg  ImageFolder of 12 classes of procedural objects and
    textures (stripes, rings, spokes, cells, branches, stars...) under random colours, lighting,
    scale, rotation and position; pretraining on it teaches edges, blobs, lines, meshes, colour.
data/skin/  the ISIC 2019 layout: ISIC_2019_Training_Input/ISIC_0000000.jpg ...,
    ISIC_2019_Training_GroundTruth.csv (one-hot MEL..SCC, UNK) and _Metadata.csv (age, site,
    lesion_id, sex). Dermoscopy-like lesions of the 8 classes with an ISIC-like imbalance; each
    class is a distribution over what a dermatologist looks at (asymmetry, border, colours,
    network, globules, streaks, vessels, keratin, cysts, ...) and the classes overlap. Nuisances
    (skin tone, light, hair, vignette, bubbles, rulers, JPEG quality) vary independently; some
    lesions are photographed 2-3 times (same lesion_id, another rotation/scale/light).

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

import numpy as np
from PIL import Image, ImageDraw, ImageFont

VERSION = 1  # bump when the images change, so old stamps no longer match
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

def rng_for(seed, *keys):
    """An independent random stream per (seed, dataset, image): results don't depend on order."""
    return np.random.default_rng([seed, *keys])


def smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def pixel_grid(R):
    yy, xx = np.mgrid[0:R, 0:R].astype(np.float32) + 0.5
    return xx, yy


def noise(rng, R, cells):
    """Smooth value noise in [0, 1], (R, R): a random cells x cells grid upsampled bicubically."""
    g = rng.random((int(cells) + 1, int(cells) + 1)).astype(np.float32)
    a = np.asarray(Image.fromarray(g, 'F').resize((R, R), Image.BICUBIC), dtype=np.float32)
    return (a - a.min()) / (a.max() - a.min() + 1e-6)


def blur(a, sigma):
    """Separable Gaussian blur over the first two axes of a (R, R) or (R, R, 3) array."""
    if sigma < 0.3:
        return a
    k = int(3 * sigma + 0.5)
    w = np.exp(-np.arange(-k, k + 1) ** 2 / (2 * sigma ** 2))
    w /= w.sum()
    for ax in (0, 1):
        p = np.moveaxis(a, ax, 0)
        n = p.shape[0]
        p = np.concatenate([p[:1].repeat(k, 0), p, p[-1:].repeat(k, 0)])
        a = np.moveaxis(sum(w[i] * p[i:i + n] for i in range(2 * k + 1)), 0, ax)
    return a.astype(np.float32)


def mask(R, fn):
    """A float (R, R) mask: fn(ImageDraw) paints on a black 'F' canvas with fill=1.0."""
    im = Image.new('F', (R, R), 0.0)
    fn(ImageDraw.Draw(im))
    return np.array(im, dtype=np.float32)


def ellipse_pts(cx, cy, a, b, ang, n=18):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = a * np.cos(t), b * np.sin(t)
    c, s = math.cos(ang), math.sin(ang)
    return list(zip((cx + c * x - s * y).tolist(), (cy + s * x + c * y).tolist()))


def disc(d, x, y, r):
    d.ellipse([x - r, y - r, x + r, y + r], fill=1.0)


def voronoi(xx, yy, px, py):
    """Per pixel: distance to the nearest and the second-nearest seed (one seed at a time, so
    memory stays (R, R) whatever the size)."""
    d1 = np.full(xx.shape, np.inf, np.float32)
    d2 = d1.copy()
    for x, y in zip(px.tolist(), py.tolist()):
        d = (xx - x) ** 2 + (yy - y) ** 2
        d2 = np.minimum(d2, np.maximum(d1, d))
        d1 = np.minimum(d1, d)
    return np.sqrt(d1), np.sqrt(d2)


def tree(d, x, y, ang, length, width, depth, rng, wiggle=0.25):
    """A branching line (vessel, twig): three jittered steps, then two thinner, shorter children."""
    pts = [(x, y)]
    for _ in range(3):
        ang += rng.normal(0, wiggle)
        x, y = x + math.cos(ang) * length / 3, y + math.sin(ang) * length / 3
        pts.append((x, y))
    d.line(pts, fill=1.0, width=max(1, round(width)), joint='curve')
    if depth > 0:
        for side in (-1, 1):
            if rng.random() < 0.85:
                tree(d, x, y, ang + side * rng.uniform(0.3, 0.8), length * rng.uniform(0.55, 0.8),
                     width * 0.7, depth - 1, rng, wiggle)


def over(img, colour, alpha):
    """Paint colour (3,) or (R, R, 3) over img with alpha (R, R)."""
    a = np.clip(alpha, 0, 1)[..., None]
    return img * (1 - a) + np.asarray(colour, np.float32) * a


def finish(img, rng, R, size, blur_p):
    """Camera: light gradient, white balance, blur, sensor noise; then to uint8 at `size`."""
    xx, yy = pixel_grid(R)
    ang = rng.uniform(0, 2 * np.pi)
    grad = 1 + rng.uniform(0, 0.25) * ((xx * math.cos(ang) + yy * math.sin(ang)) / R - 0.5)
    temp, tint = rng.normal(0, 0.07), abs(rng.normal(0, 0.04))  # white balance: warm/cool, magenta
    wb = np.array([1 + temp, 1 - tint, 1 - temp], np.float32)
    img = img * (grad * rng.uniform(0.75, 1.2))[..., None] * wb
    if rng.random() < blur_p:
        img = blur(img, rng.uniform(0.5, 1.3) * R / 128)
    img = img + rng.normal(0, rng.uniform(0.004, 0.02), img.shape)
    im = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    return im.resize((size, size), Image.BOX if R == 2 * size else Image.LANCZOS)


# ------------------------------------------------------------------- source (ImageNet stand-in)
def rand_colour(rng):
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.random() ** 0.7, rng.uniform(0.1, 1)),
                    np.float32)


def source_image(cls, rng, R):
    xx, yy = pixel_grid(R)
    # background: solid, gradient or two-colour noise, with fine grain
    b1, b2 = rand_colour(rng), rand_colour(rng)
    kind = rng.integers(3)
    t = (0 if kind == 0 else (xx / R) if kind == 1 else noise(rng, R, rng.integers(2, 7)))
    img = b1 + (b2 - b1) * np.asarray(t, np.float32)[..., None] * np.ones((R, R, 1), np.float32)
    img = img * (1 + 0.08 * (noise(rng, R, R // 6)[..., None] - 0.5))
    # the object frame: rotation, scale, position jitter; u, v about +-1 over the object
    th, s = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.3)
    cx, cy = rng.uniform(0.3, 0.7, 2) * R
    x, y = (xx - cx) / (R / 2), (yy - cy) / (R / 2)
    u = (x * math.cos(th) + y * math.sin(th)) / s
    v = (-x * math.sin(th) + y * math.cos(th)) / s
    r = np.hypot(u, v)
    region = 1.0  # textures sometimes fill only a soft blob, like a pattern on an object
    if cls in ('stripes', 'checkers', 'grid', 'cells', 'blobs', 'spots') and rng.random() < 0.35:
        region = smoothstep(1.0, 0.85, r / rng.uniform(0.6, 1.1) + 0.4 * noise(rng, R, 4))
    m = SOURCE_PATTERNS[cls](rng, R, u, v, r, th, s, cx, cy)
    m = m * region
    # foreground: one colour, a two-colour gradient or a noisy fill, contrasted with the background
    f1 = rand_colour(rng)
    for _ in range(5):
        if abs(f1.mean() - img.mean()) > 0.15:
            break
        f1 = rand_colour(rng)
    if rng.random() < 0.3:
        f1 = f1 + (rand_colour(rng) - f1) * (u.clip(-1, 1)[..., None] * 0.5 + 0.5)
    fill = f1 * (1 + 0.15 * (noise(rng, R, rng.integers(3, 12))[..., None] - 0.5))
    img = over(img, fill, m * rng.uniform(0.75, 1.0))
    if rng.random() < 0.25:  # distractors: a few thin curves, as hair will be on skin
        img = over(img, rand_colour(rng), mask(R, lambda d: [d.line(
            [tuple(p) for p in rng.uniform(0, R, (3, 2))], fill=1.0, width=1, joint='curve')
            for _ in range(rng.integers(1, 4))]))
    return img


def _stripes(rng, R, u, v, r, th, s, cx, cy):
    w = u + (rng.uniform(0, 0.3) * np.sin(v * rng.uniform(2, 9)) if rng.random() < 0.4 else 0)
    return smoothstep(-0.25, 0.25, np.sin(np.pi * rng.uniform(1.5, 5) * w) + rng.uniform(-.4, .4))


def _checkers(rng, R, u, v, r, th, s, cx, cy):
    f = rng.uniform(1.5, 4)
    return smoothstep(-0.1, 0.1, np.sin(np.pi * f * u) * np.sin(np.pi * f * v))


def _rings(rng, R, u, v, r, th, s, cx, cy):
    m = smoothstep(-0.25, 0.25, np.sin(np.pi * rng.uniform(2, 6) * r) + rng.uniform(-.4, .4))
    return m * smoothstep(1.05, 0.95, r / rng.uniform(0.5, 1.5))


def _spokes(rng, R, u, v, r, th, s, cx, cy):
    n = rng.integers(4, 16)
    m = smoothstep(-0.25, 0.25, np.sin(n * np.arctan2(v, u)) + rng.uniform(-.4, .4))
    return m * smoothstep(1.05, 0.95, r / rng.uniform(0.5, 1.5)) * (r > rng.uniform(0, .2))


def _grid(rng, R, u, v, r, th, s, cx, cy):
    f, w = rng.uniform(1.5, 4.5), rng.uniform(0.03, 0.1)
    line = lambda a: smoothstep(w, w * 0.5, np.abs(f * a - np.round(f * a)) / f)
    return np.maximum(line(u), line(v))


def _cells(rng, R, u, v, r, th, s, cx, cy):
    xx, yy = pixel_grid(R)
    sp = rng.uniform(0.12, 0.3) * R * s
    g = np.arange(-sp, R + sp, sp)
    px, py = [a.ravel() + rng.uniform(-.35, .35, a.size) * sp for a in np.meshgrid(g, g)]
    d1, d2 = voronoi(xx, yy, px, py)
    w = sp * rng.uniform(0.04, 0.12)
    return smoothstep(w, w * 0.5, (d2 - d1) / 2)


def _spots(rng, R, u, v, r, th, s, cx, cy):
    if rng.random() < 0.5:  # polka lattice
        sp = rng.uniform(0.15, 0.3) * R * s
        g = np.arange(-sp, R + sp, sp)
        pts = [(x + (k % 2) * sp / 2, y) for k, y in enumerate(g) for x in g]
        rad = [sp * rng.uniform(0.2, 0.35)] * len(pts)
    else:
        pts = rng.uniform(0, R, (rng.integers(4, 30), 2)).tolist()
        rad = (rng.uniform(0.02, 0.09, len(pts)) * R * s).tolist()
    return mask(R, lambda d: [disc(d, x, y, q) for (x, y), q in zip(pts, rad)])


def _shape(rng, R, th, s, cx, cy, radii):
    n = len(radii)
    a = th + np.arange(n) * 2 * np.pi / n
    pts = list(zip((cx + np.cos(a) * radii * s * R / 2).tolist(),
                   (cy + np.sin(a) * radii * s * R / 2).tolist()))
    if rng.random() < 0.75:
        return mask(R, lambda d: d.polygon(pts, fill=1.0))
    return mask(R, lambda d: d.line(pts + pts[:1], fill=1.0, width=int(R * rng.uniform(.03, .08)),
                                    joint='curve'))


def _polygons(rng, R, u, v, r, th, s, cx, cy):
    n = rng.integers(3, 9)
    return _shape(rng, R, th, s, cx, cy, rng.uniform(0.45, 0.75) * rng.uniform(0.85, 1.15, n))


def _stars(rng, R, u, v, r, th, s, cx, cy):
    n, big = rng.integers(5, 10), rng.uniform(0.5, 0.8)
    return _shape(rng, R, th, s, cx, cy, np.tile([big, big * rng.uniform(0.3, 0.55)], n))


def _crosses(rng, R, u, v, r, th, s, cx, cy):
    L, W = rng.uniform(0.5, 0.9), rng.uniform(0.1, 0.25)
    arm = lambda a, b: smoothstep(0.03, -0.03, np.maximum(np.abs(a) - L, np.abs(b) - W))
    return np.maximum(arm(u, v), arm(v, u))


def _branches(rng, R, u, v, r, th, s, cx, cy):
    def draw(d):
        for _ in range(rng.integers(1, 4)):
            tree(d, *rng.uniform(0.1, 0.9, 2) * R, rng.uniform(0, 2 * np.pi),
                 rng.uniform(0.25, 0.45) * R * s, rng.uniform(0.02, 0.05) * R, 3, rng)
    return mask(R, draw)


def _blobs(rng, R, u, v, r, th, s, cx, cy):
    if rng.random() < 0.5:  # camouflage
        t = rng.uniform(0.35, 0.65)
        return smoothstep(t - 0.03, t + 0.03, noise(rng, R, rng.integers(3, 9)))
    m = 0
    for _ in range(rng.integers(1, 4)):  # amoebas
        ox, oy = rng.uniform(-0.5, 0.5, 2)
        a = np.arctan2(v - oy, u - ox)
        wobble = sum(rng.uniform(0, .25 / k) * np.cos(k * a + rng.uniform(0, 6.3))
                     for k in range(1, 6))
        rho = rng.uniform(0.3, 0.6) * (1 + wobble)
        m = np.maximum(m, smoothstep(1.05, 0.95, np.hypot(u - ox, v - oy) / rho))
    return m


SOURCE_PATTERNS = {'blobs': _blobs, 'branches': _branches, 'cells': _cells,
                   'checkers': _checkers, 'crosses': _crosses, 'grid': _grid,
                   'polygons': _polygons, 'rings': _rings, 'spokes': _spokes, 'spots': _spots,
                   'stars': _stars, 'stripes': _stripes}


# ------------------------------------------------------------------ skin (ISIC 2019 look-alike)
# Pigment colours are factors on the skin tone (a lesion on darker skin is darker); others absolute.
PIGMENT = {'tan': (.86, .74, .64), 'light': (.72, .55, .43), 'brown': (.52, .36, .26),
           'dark': (.30, .20, .14)}
COLOUR = {'black': (.10, .08, .08), 'bluegrey': (.45, .48, .55), 'red': (.80, .22, .25),
          'pink': (.92, .60, .62), 'white': (.95, .93, .91), 'keratin': (.95, .90, .77),
          'purple': (.50, .17, .32), 'maroon': (.36, .08, .14), 'crust': (.40, .16, .10),
          'septa': (.92, .76, .78)}

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
# AK and SCC exist, and a colour mean alone should not give the class away), then extra colours.
BASE = {  # tan light brown dark pink red purple
    'MEL': (.15, .30, .30, .20, .05, .00, .00),
    'NV': (.25, .30, .25, .17, .03, .00, .00),
    'BCC': (.15, .25, .20, .05, .35, .00, .00),
    'AK': (.20, .30, .15, .05, .25, .05, .00),
    'BKL': (.20, .30, .25, .20, .05, .00, .00),
    'DF': (.20, .35, .25, .05, .15, .00, .00),
    'VASC': (.00, .05, .10, .15, .10, .30, .30),
    'SCC': (.20, .30, .15, .05, .25, .05, .00),
}
BASE_NAMES = ['tan', 'light', 'brown', 'dark', 'pink', 'red', 'purple']
EXTRA = {'MEL': ['black', 'dark', 'dark', 'bluegrey', 'bluegrey', 'tan', 'red', 'white'],
         'NV': ['dark', 'brown', 'tan'], 'BCC': ['bluegrey', 'pink', 'white', 'brown'],
         'AK': ['pink', 'red', 'light'], 'BKL': ['dark', 'brown', 'keratin', 'black'],
         'DF': ['pink', 'brown'], 'VASC': ['purple', 'maroon', 'black'],
         'SCC': ['white', 'keratin', 'red', 'light']}

# Probability that a lesion of each class shows each dermoscopic structure (drawn in this order).
#                  MEL  NV   BCC  AK   BKL  DF   VASC SCC
STRUCTURES = {
    'erythema':   (.05, .00, .25, .75, .05, .10, .10, .55),  # sun-damaged pink halo
    'body':       (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0),  # pigment, colour variegation
    'periph_net': (.00, .00, .00, .00, .00, .80, .00, .00),  # delicate network at the rim (DF)
    'network':    (.05, .65, .00, .00, .05, .00, .00, .00),  # regular reticular network
    'atyp_net':   (.70, .08, .00, .00, .05, .00, .00, .00),  # thick, broken, irregular network
    'veil':       (.45, .02, .10, .00, .03, .00, .00, .00),  # blue-white veil
    'regression': (.40, .02, .05, .00, .03, .00, .00, .00),  # white scar + blue peppering
    'central_white': (.03, .02, .03, .00, .00, .90, .00, .05),  # DF's central white patch
    'globules':   (.05, .50, .00, .00, .00, .00, .00, .00),  # regular cobblestone globules
    'dots':       (.60, .08, .05, .00, .08, .00, .00, .00),  # irregular peripheral dots
    'nests':      (.08, .02, .75, .00, .03, .00, .00, .00),  # blue-grey ovoid nests (BCC)
    'streaks':    (.45, .06, .00, .00, .00, .00, .00, .00),  # radial streaks / pseudopods
    'fissures':   (.00, .03, .00, .00, .60, .00, .00, .00),  # cerebriform ridges (seb. keratosis)
    'comedo':     (.00, .03, .00, .00, .65, .00, .00, .00),  # comedo-like openings
    'milia':      (.00, .05, .05, .00, .80, .00, .00, .00),  # milia-like cysts
    'lacunae':    (.00, .00, .00, .00, .00, .00, .95, .00),  # red-purple lacunae, pale septa
    'strawberry': (.00, .00, .00, .80, .00, .00, .00, .10),  # red pseudo-network + follicles
    'scale':      (.00, .00, .02, .70, .15, .00, .00, .30),  # white-yellow surface scale
    'keratin':    (.00, .00, .00, .15, .10, .00, .00, .80),  # central keratin mass
    'white_circles': (.00, .00, .00, .50, .00, .00, .00, .55),  # white rings round follicles
    'ulceration': (.05, .00, .30, .02, .00, .00, .05, .35),  # blood crust
    'arborizing': (.03, .00, .90, .05, .03, .00, .00, .08),  # branching sharp vessels (BCC)
    'dotted':     (.10, .02, .05, .40, .05, .10, .00, .45),  # dotted vessels
    'glomerular': (.00, .00, .00, .10, .03, .00, .00, .65),  # coiled vessel clusters (SCC)
    'hairpin':    (.00, .00, .00, .05, .25, .00, .00, .20),  # hairpin vessels with white halo
    'shiny_white': (.15, .00, .35, .00, .00, .10, .00, .10),  # short white crossing lines
}


class Lesion:
    """One lesion in its own frame (centre R/2): shape, skin tone and a premultiplied RGBA layer
    that the structures paint over in order. Rendered once per lesion id and then photographed
    (rotated, scaled, lit) once per image, so repeated photos show the same lesion."""

    def __init__(self, cls, rng, R):
        g = SHAPE[cls]
        self.cls, self.rng, self.R, self.c = cls, rng, R, R / 2
        self.rad = rng.uniform(*g[0]) * R / 2
        # border radius rho(angle) = rad * (1 + sum_k amp_k cos(k angle + phase_k)):
        # harmonics 1-3 make the lesion asymmetric, 4-14 make its border irregular
        self.ks = np.arange(1, 15)
        self.amp = np.concatenate([rng.uniform(*g[1]) * rng.dirichlet(np.ones(3)),
                                   rng.uniform(*g[2]) * rng.random(11) * 2 / np.sqrt(self.ks[3:])])
        self.phase = rng.uniform(0, 2 * np.pi, 14)
        self.soft = rng.uniform(*g[3])
        t = rng.beta(1.2, 3)  # skin tone: mostly fair, as in ISIC; 0 light .. 1 dark
        self.skin = np.array([.95, .80, .74]) * (1 - t) + np.array([.42, .28, .20]) * t
        self.skin = self.skin * rng.normal(1, 0.03, 3)
        self.xx, self.yy = pixel_grid(R)
        dx, dy = self.xx - self.c, self.yy - self.c
        self.th = np.arctan2(dy, dx)
        self.d = np.hypot(dx, dy) / self.rho(self.th)  # 0 at the centre, 1 on the border
        self.inside = smoothstep(1 + self.soft, 1 - self.soft, self.d)
        self.P = np.zeros((R, R, 3), np.float32)  # premultiplied colour
        self.A = np.zeros((R, R), np.float32)
        k = SKIN_CLASSES.index(cls)
        for name, probs in STRUCTURES.items():
            if rng.random() < probs[k]:
                getattr(self, name)()

    # ---- geometry
    def rho(self, th):
        th = np.asarray(th)[..., None]
        return self.rad * (1 + (self.amp * np.cos(self.ks * th + self.phase)).sum(-1))

    def points(self, n, t=(0, .85), sector=None):
        """n points inside the lesion, at normalised radius in t, optionally in an angle sector."""
        rng = self.rng
        a = rng.uniform(0, 2 * np.pi, n) if sector is None else \
            sector[0] + rng.uniform(-.5, .5, n) * sector[1]
        q = np.sqrt(rng.uniform(t[0] ** 2, t[1] ** 2, n)) * self.rho(a)
        return self.c + q * np.cos(a), self.c + q * np.sin(a)

    def lattice(self, sp, jitter, tmax=0.95):
        g = np.arange(self.c - 1.6 * self.rad, self.c + 1.6 * self.rad, sp)
        px, py = np.meshgrid(g, g * 0.866)
        px = px + (np.arange(len(g))[:, None] % 2) * sp / 2
        py = py + self.c * (1 - 0.866)
        px, py = [a.ravel() + self.rng.normal(0, jitter * sp, a.size) for a in (px, py)]
        q = np.hypot(px - self.c, py - self.c) / self.rho(np.arctan2(py - self.c, px - self.c))
        return px[q < tmax], py[q < tmax]

    def patch(self, size, t=(0, .5)):
        """An irregular region of radius ~size * lesion radius around a point inside."""
        px, py = self.points(1, t)
        r = np.hypot(self.xx - px, self.yy - py) / (size * self.rad)
        wobble = noise(self.rng, self.R, self.rng.integers(4, 9)) - .5
        return smoothstep(1.0, 0.7, r + 0.6 * wobble)

    def col(self, name):
        c = np.array(PIGMENT[name]) * self.skin if name in PIGMENT else np.array(COLOUR[name])
        return np.clip(c * self.rng.normal(1, 0.04, 3), 0, 1).astype(np.float32)

    def paint(self, colour, alpha):
        a = np.clip(alpha, 0, 1).astype(np.float32)
        self.P = over(self.P, colour, a)
        self.A = self.A * (1 - a) + a

    def discs(self, xs, ys, rs):
        return mask(self.R, lambda d: [disc(d, x, y, r) for x, y, r in zip(xs, ys, rs)])

    # ---- structures (named as in STRUCTURES)
    def erythema(self):
        self.paint(self.col('pink'), smoothstep(1.8, 0.9, self.d) * self.rng.uniform(.2, .45))

    def body(self):
        rng, g = self.rng, SHAPE[self.cls]
        k = rng.integers(g[4][0], g[4][1] + 1)
        names = [rng.choice(BASE_NAMES, p=BASE[self.cls])]
        names += list(rng.choice(EXTRA[self.cls], k - 1))
        if self.cls == 'MEL':  # at least one of black, dark brown, blue-grey
            names[1] = rng.choice(['black', 'dark', 'bluegrey'])
        cols = np.stack([self.col(n) for n in names])
        fields = np.stack([noise(rng, self.R, rng.integers(2, 5)) for _ in range(k)])
        if rng.random() < {'NV': .85, 'DF': .8}.get(self.cls, .15):  # concentric zones
            centres = np.sort(rng.uniform(0, 1, k))[::-1 if self.cls == 'DF' else 1]
            fields = 0.2 * fields - np.abs(self.d[None] - centres[:, None, None])
        w = np.exp(rng.uniform(10, 30) * (fields - fields.max(0)))  # soft zones, soft edges
        colour = np.einsum('kyx,kc->yxc', w / w.sum(0), cols)
        mottle = 0.8 * noise(rng, self.R, self.R // 12) + 0.2 * noise(rng, self.R, self.R // 4)
        colour = colour * (0.85 + 0.3 * mottle)[..., None]
        self.paint(colour, self.inside * rng.uniform(*g[5]))

    def _net(self, window, sp, jitter, width, colour, op):
        px, py = self.lattice(sp, jitter, 1.2)
        d1, d2 = voronoi(self.xx, self.yy, px, py)
        w = width * sp * (0.7 + 0.6 * noise(self.rng, self.R, 6))
        lines = blur(smoothstep(w, w * 0.3, (d2 - d1) / 2), self.R / 200)
        self.paint(self.col(colour), lines * window * op)

    def periph_net(self):
        self._net(self.inside * smoothstep(.4, .7, self.d), self.R * self.rng.uniform(.1, .13),
                  .2, .08, 'brown', self.rng.uniform(.35, .6))

    def network(self):
        self._net(self.inside * smoothstep(1.0, 0.6, self.d), self.R * self.rng.uniform(.11, .15),
                  .2, .12, self.rng.choice(['brown', 'dark']), self.rng.uniform(.5, .75))

    def atyp_net(self):
        rng = self.rng
        patchy = smoothstep(.35, .5, noise(rng, self.R, rng.integers(3, 6)))
        width = rng.uniform(.12, .2) * (0.6 + noise(rng, self.R, 4))
        self._net(self.inside * patchy, self.R * rng.uniform(.12, .18), .35, width,
                  rng.choice(['dark', 'black']), rng.uniform(.6, .9))

    def veil(self):
        c = (self.col('bluegrey') + self.col('white')) / 2
        self.paint(c, blur(self.patch(self.rng.uniform(.3, .6)), self.R * .02) * self.inside
                   * self.rng.uniform(.55, .85))

    def regression(self):
        rng = self.rng
        m = self.patch(rng.uniform(.3, .55), t=(.2, .7)) * self.inside
        self.paint(self.col('white') * .92, m * rng.uniform(.4, .7))
        xs, ys = self.points(rng.integers(40, 120), (0, 1))
        keep = m[ys.astype(int).clip(0, self.R - 1), xs.astype(int).clip(0, self.R - 1)] > .4
        self.paint(self.col('bluegrey') * .8, self.discs(xs[keep], ys[keep],
                   rng.uniform(.004, .009, keep.sum()) * self.R) * .8)

    def central_white(self):
        m = blur(self.patch(self.rng.uniform(.35, .6), t=(0, .15)), self.R * .02) * self.inside
        self.paint(self.col('white'), m * self.rng.uniform(.65, .9))

    def globules(self):
        rng = self.rng
        sp = self.R * rng.uniform(.085, .11)
        xs, ys = self.lattice(sp, .2, .85)
        m = self.discs(xs, ys, sp * rng.uniform(.25, .35) * rng.uniform(.85, 1.15, len(xs)))
        self.paint(self.col(rng.choice(['brown', 'dark'])), blur(m, self.R / 250)
                   * rng.uniform(.5, .8))

    def dots(self):
        rng = self.rng
        n = rng.integers(8, 30)
        xs, ys = self.points(n, (.5, 1.0), (rng.uniform(0, 6.3), rng.uniform(1.5, 4.5)))
        for c in ('black', 'dark', 'bluegrey'):
            sel = rng.random(n) < .4
            self.paint(self.col(c), self.discs(xs[sel], ys[sel], rng.uniform(.015, .04, n)[sel]
                                              * self.R) * rng.uniform(.7, 1))

    def nests(self):
        rng = self.rng
        xs, ys = self.points(rng.integers(2, 8), (0, .9))
        m = mask(self.R, lambda d: [d.polygon(ellipse_pts(x, y, a, a * rng.uniform(.5, 1),
                                                          rng.uniform(0, 3.2)), fill=1.0)
                                    for x, y, a in zip(xs, ys, rng.uniform(.05, .11, len(xs))
                                                       * self.R)])
        c = self.col('bluegrey') * rng.uniform(.6, 1)
        self.paint(c, blur(m, self.R * .01) * rng.uniform(.7, .95))

    def streaks(self):
        rng = self.rng
        if self.cls == 'NV':  # symmetric starburst (Spitz/Reed)
            n = rng.integers(14, 24)
            a = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 1)
        else:  # a few radial streaks in one sector
            n = rng.integers(5, 15)
            a = rng.uniform(0, 6.3) + rng.uniform(-.5, .5, n) * rng.uniform(1, 3)
        r0, r1 = self.rho(a) * .8, self.rho(a) * rng.uniform(1.05, 1.3, n)
        w = self.R * rng.uniform(.018, .028)

        def draw(d):
            for ai, p, q in zip(a, r0, r1):
                x0, y0 = self.c + p * math.cos(ai), self.c + p * math.sin(ai)
                x1, y1 = self.c + q * math.cos(ai), self.c + q * math.sin(ai)
                d.line([(x0, y0), (x1, y1)], fill=1.0, width=max(1, round(w)))
                disc(d, x1, y1, w * .8)
        self.paint(self.col(rng.choice(['dark', 'black'])),
                   mask(self.R, draw) * rng.uniform(.7, .95))

    def fissures(self):
        rng = self.rng
        q = noise(rng, self.R, rng.integers(3, 6)) * rng.uniform(3, 6)
        m = smoothstep(.25, .08, np.abs(q - np.round(q))) * self.inside * smoothstep(1, .75, self.d)
        self.paint(self.col('dark'), m * rng.uniform(.5, .8))

    def comedo(self):
        rng = self.rng
        xs, ys = self.points(rng.integers(2, 10))
        m = mask(self.R, lambda d: [d.polygon(ellipse_pts(x, y, a, a * rng.uniform(.6, 1),
                                                          rng.uniform(0, 3.2)), fill=1.0)
                                    for x, y, a in zip(xs, ys, rng.uniform(.03, .05, len(xs))
                                                       * self.R)])
        self.paint(self.col(rng.choice(['dark', 'black', 'crust'])), m * rng.uniform(.75, .95))

    def milia(self):
        rng = self.rng
        xs, ys = self.points(rng.integers(2, 10))
        rs = rng.uniform(.025, .045, len(xs)) * self.R
        glow = blur(self.discs(xs, ys, rs * 1.4), self.R * .01)
        self.paint(self.col(rng.choice(['white', 'keratin'])), np.maximum(glow * .7, self.discs(
            xs, ys, rs * .7)) * rng.uniform(.8, 1))

    def lacunae(self):
        rng = self.rng
        self.paint(self.col('septa'), self.inside * rng.uniform(.8, .95))
        sp = self.R * rng.uniform(.11, .16)
        xs, ys = self.lattice(sp, .12, 1.0)
        rs = sp * rng.uniform(.4, .55, len(xs))
        names = rng.choice(['red', 'purple', 'maroon', 'black'], len(xs),
                           p=[.4, .3, .2, .1] if rng.random() < .3 else [.5, .3, .2, 0])
        for c in sorted(set(names)):  # sorted: set order varies per process
            sel = names == c
            self.paint(self.col(c), blur(self.discs(xs[sel], ys[sel], rs[sel]), self.R * .006)
                       * self.inside)

    def strawberry(self):
        rng = self.rng
        sp = self.R * rng.uniform(.1, .14)
        xs, ys = self.lattice(sp, .3, 1.0)
        d1, d2 = voronoi(self.xx, self.yy, xs, ys)
        w = sp * .3
        self.paint(self.col('red'), blur(smoothstep(w, w * .3, (d2 - d1) / 2), self.R * .01)
                   * self.inside * rng.uniform(.5, .8))
        follicles = self.discs(xs, ys, rng.uniform(.015, .025, len(xs)) * self.R)
        self.paint(self.col('keratin'), follicles * self.inside * rng.uniform(.5, .75))

    def scale(self):
        rng = self.rng
        q = rng.uniform(.55, .7)
        m = smoothstep(q, q + .08, noise(rng, self.R, self.R // rng.integers(8, 14)))
        m = m * self.inside * smoothstep(.3, .5, noise(rng, self.R, 3))
        self.paint(self.col(rng.choice(['white', 'keratin'])), m * rng.uniform(.5, .85))

    def keratin(self):
        rng = self.rng
        m = self.patch(rng.uniform(.35, .65), t=(0, .3)) * self.inside
        c = self.col('keratin') * (0.85 + 0.15 * noise(rng, self.R, self.R // 8))[..., None]
        self.paint(c, m * rng.uniform(.75, .95))

    def white_circles(self):
        rng = self.rng
        xs, ys = self.points(rng.integers(5, 15), (0, .9))
        rs = rng.uniform(.03, .05, len(xs)) * self.R
        w = max(1, round(self.R * .015))
        m = mask(self.R, lambda d: [d.ellipse([x - r, y - r, x + r, y + r], outline=1.0, width=w)
                                    for x, y, r in zip(xs, ys, rs)])
        self.paint(self.col('white'), m * rng.uniform(.7, .9))

    def ulceration(self):
        rng = self.rng
        m = self.patch(rng.uniform(.2, .4), t=(0, .7)) * self.inside
        self.paint(self.col(rng.choice(['crust', 'red', 'maroon'])), m * rng.uniform(.8, .95))

    def arborizing(self):
        rng = self.rng

        def draw(d):
            for x, y in zip(*self.points(rng.integers(1, 4), (.4, .95))):
                ang = math.atan2(self.c - y, self.c - x) + rng.normal(0, .8)
                tree(d, x, y, ang, self.rad * rng.uniform(.4, .6), self.R * rng.uniform(.025, .035),
                     3, rng)
        self.paint(self.col('red'), mask(self.R, draw) * rng.uniform(.8, 1))

    def dotted(self):
        rng = self.rng
        xs, ys = self.points(rng.integers(15, 50), (0, .95))
        self.paint(self.col(rng.choice(['red', 'maroon'])), self.discs(
            xs, ys, rng.uniform(.012, .02, len(xs)) * self.R) * rng.uniform(.7, .9))

    def glomerular(self):
        rng = self.rng
        cx, cy = self.points(rng.integers(5, 14), (0, .9))
        n = 4 * len(cx)
        xs = np.repeat(cx, 4) + rng.normal(0, .02 * self.R, n)
        ys = np.repeat(cy, 4) + rng.normal(0, .02 * self.R, n)
        rs = rng.uniform(.013, .022, n) * self.R
        w = max(1, round(self.R / 100))
        m = mask(self.R, lambda d: [d.ellipse([x - r, y - r, x + r, y + r], outline=1.0, width=w)
                                    for x, y, r in zip(xs, ys, rs)])
        self.paint(self.col('red'), blur(m, .5) * rng.uniform(.8, 1))

    def hairpin(self):
        rng = self.rng
        cx, cy = self.points(rng.integers(4, 12), (.3, .9))
        ln, gap = self.R * rng.uniform(.06, .1), self.R * .016
        loops = []
        for x, y in zip(cx, cy):
            a = math.atan2(y - self.c, x - self.c) + rng.normal(0, .4)
            t = np.linspace(0, np.pi, 7)  # the U: up one side, round the top, down the other
            ux = np.concatenate([[-1, -1], np.cos(t + np.pi), [1, 1]]) * gap
            uy = np.concatenate([[0, ln], ln + np.sin(t) * gap, [ln, 0]])
            c, s = math.cos(a - np.pi / 2), math.sin(a - np.pi / 2)
            loops.append(list(zip((x + c * ux - s * uy).tolist(), (y + s * ux + c * uy).tolist())))
        for colour, w in (('white', 3), ('red', 1)):  # white halo first
            m = mask(self.R, lambda d: [d.line(p, fill=1.0, width=w * max(1, round(self.R / 128)),
                                               joint='curve') for p in loops])
            self.paint(self.col(colour), m * .85)

    def shiny_white(self):
        rng = self.rng
        xs, ys = self.points(rng.integers(2, 8), (0, .8))
        h, w = self.R * rng.uniform(.03, .05, len(xs)), max(1, round(self.R * .01))
        m = mask(self.R, lambda d: [(d.line([(x - l, y), (x + l, y)], fill=1.0, width=w),
                                     d.line([(x, y - l), (x, y + l)], fill=1.0, width=w))
                                    for x, y, l in zip(xs, ys, h)])
        self.paint(self.col('white'), m * rng.uniform(.7, .9))



def photograph(les, rng, size):
    """One dermoscopy image of a lesion: pose, skin, hair, bubbles, ruler, vignette, camera."""
    R, c = les.R, les.c
    # pose: rotate, scale, shift, maybe mirror (PIL's affine maps output pixels to input pixels)
    a, s = rng.uniform(0, 2 * np.pi), rng.uniform(0.85, 1.15)
    m = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) / s
    if rng.random() < 0.5:
        m[:, 0] *= -1
    o = np.array([c, c]) + rng.uniform(-.08, .08, 2) * R
    off = np.array([c, c]) - m @ o
    data = (m[0, 0], m[0, 1], off[0], m[1, 0], m[1, 1], off[1])
    warp = lambda ch: np.asarray(Image.fromarray(np.ascontiguousarray(ch, np.float32), 'F')
                                 .transform((R, R), Image.AFFINE, data, Image.BILINEAR))
    P = np.stack([warp(les.P[..., i]) for i in range(3)], -1)
    A = warp(les.A)
    # skin: tone with blotchy redness and fine texture
    skin = les.skin * (1 + 0.07 * (noise(rng, R, rng.integers(3, 7)) - .5))[..., None]
    skin = over(skin, COLOUR['pink'], noise(rng, R, 4) * rng.uniform(0, .3))
    skin = skin * (1 + 0.05 * (noise(rng, R, R // 5) - .5))[..., None]
    img = skin * (1 - A[..., None]) + P
    xx, yy = pixel_grid(R)
    if rng.random() < 0.35:  # hair: dark quadratic curves across the field
        def hair(d):
            for _ in range(min(12, rng.geometric(.3))):
                p = rng.uniform(-.1, 1.1, (3, 2)) * R
                p[1] = (p[0] + p[2]) / 2 + rng.normal(0, .15 * R, 2)
                t = np.linspace(0, 1, 16)[:, None]
                pts = (1 - t) ** 2 * p[0] + 2 * t * (1 - t) * p[1] + t ** 2 * p[2]
                d.line([tuple(q) for q in pts.tolist()], fill=1.0, joint='curve',
                       width=max(1, round(R * rng.uniform(.005, .011))))
        img = over(img, np.array([.25, .2, .17]) * rng.uniform(.3, 1), mask(R, hair) * .9)
    if rng.random() < 0.15:  # gel bubbles: bright rim and a specular highlight
        xs, ys = rng.uniform(0, R, (2, rng.integers(1, 5)))
        rs = rng.uniform(.03, .12, len(xs)) * R
        rim = mask(R, lambda d: [d.ellipse([x - r, y - r, x + r, y + r], outline=1.0, width=max(
            1, round(R / 100))) for x, y, r in zip(xs, ys, rs)])
        spec = mask(R, lambda d: [disc(d, x - r * .4, y - r * .4, r * .15) for x, y, r in
                                  zip(xs, ys, rs)])
        img = over(img, (1, 1, 1), blur(rim, .7) * .6 + spec * .8)
    if rng.random() < 0.08:  # ruler along one edge: light strip with ticks
        w, sp = R * .08, R * rng.uniform(.035, .05)
        ruler = np.zeros((R, R), np.float32)
        ruler[:int(w)] = 1
        ticks = mask(R, lambda d: [d.line([(x, 0), (x, w * (.5 if k % 2 else .9))], fill=1.0)
                                   for k, x in enumerate(np.arange(sp / 2, R, sp))])
        k = rng.integers(4)
        img = over(img, (.9, .9, .85), np.rot90(ruler, k) * .85)
        img = over(img, (.1, .1, .1), np.rot90(ticks, k))
    r = np.hypot(xx - c, yy - c) / c
    img = img * (1 - 0.25 * rng.random() * r ** 2)[..., None]  # lens falloff
    if rng.random() < 0.45:  # the dermatoscope's round field: dark corners
        edge = rng.uniform(1.0, 1.35)
        img = img * smoothstep(edge + .08, edge - rng.uniform(.05, .15), r)[..., None]
    return finish(img, rng, R, size, blur_p=0.3)


def class_counts(n):
    """ISIC 2019's class proportions for n images, every class at least 3% (DF and VASC would
    otherwise get too few to learn and test on), NV absorbing the rounding."""
    floor = max(1, round(0.03 * n))
    total = sum(ISIC_COUNTS.values())
    counts = {k: max(floor, round(n * v / total)) for k, v in ISIC_COUNTS.items()}
    counts['NV'] += n - sum(counts.values())
    return counts


SITES = ['anterior torso', 'posterior torso', 'lateral torso', 'upper extremity',
         'lower extremity', 'head/neck', 'palms/soles', 'oral/genital']
AGE = {'MEL': 60, 'NV': 42, 'BCC': 67, 'AK': 70, 'BKL': 62, 'DF': 45, 'VASC': 48, 'SCC': 72}


def skin_plan(n, seed):
    """Lesions (class, metadata, 1-3 photos each) and the images: name, class, lesion, photo."""
    rng = rng_for(seed, 1, 0)
    lesions = []
    for cls, k in class_counts(n).items():
        while k > 0:
            views = min(k, rng.choice([1, 2, 3], p=[.7, .2, .1]))
            k -= views
            site = rng.choice(SITES + [''], p=([.05, .05, .02, .1, .08, .6, .02, .01, .07]
                                               if cls in ('AK', 'SCC', 'BCC') else
                                               [.25, .25, .05, .15, .18, .05, .02, .01, .04]))
            age = float(np.clip(5 * round(rng.normal(AGE[cls], 14) / 5), 5, 85))
            age = '' if rng.random() < .03 else f'{age:.1f}'  # '55.0' as in the real file
            sex = rng.choice(['male', 'female', ''], p=[.52, .45, .03])
            lesions.append(dict(cls=cls, views=views, site=site, age=age, sex=sex))
    order = rng.permutation(len(lesions))  # lesion numbers and ids don't reveal the class
    numbers = rng.choice(10 * len(lesions), len(lesions), replace=False)
    for j, k in enumerate(order):
        les = lesions[k]
        les['key'] = j
        if les['views'] == 1 and rng.random() < .2:
            les['lesion_id'] = ''  # as in ISIC 2019, some images have no lesion id
        else:
            les['lesion_id'] = f'{"HAM" if rng.random() < .7 else "BCN"}_{numbers[j]:07d}'
    photos = [(les, v) for k in order for les in [lesions[k]] for v in range(les['views'])]
    images = []
    for i, p in enumerate(rng.permutation(len(photos))):
        les, _ = photos[p]
        down = les['cls'] in ('NV', 'MEL') and rng.random() < .03  # the paper drops these
        name = f'ISIC_{i:07d}' + ('_downsampled' if down else '')
        images.append(dict(les, image=name, key_img=i))
    return images


# --------------------------------------------------------------------------- writing
def render_job(job):
    """Render and write one image (runs in a worker). job: (dataset, path, size, seed, keys)."""
    kind, path, size, seed, keys = job
    if kind == 'source':
        cls_i, i = keys
        rng = rng_for(seed, 0, cls_i, i)
        im = finish(source_image(SOURCE_CLASSES[cls_i], rng, 2 * size), rng, 2 * size, size, .2)
        im.save(path, 'JPEG', quality=int(rng.integers(75, 96)))
    else:
        cls, lesion_key, image_key = keys
        les = Lesion(cls, rng_for(seed, 2, lesion_key), 2 * size)
        rng = rng_for(seed, 3, image_key)
        photograph(les, rng, size).save(path, 'JPEG', quality=int(rng.integers(70, 96)))
    return 1


def stage(root, force, settings):
    """None when root already holds this dataset; else a fresh hidden staging folder."""
    stamp = os.path.join(root, STAMP)
    if os.path.exists(root) and not os.path.isdir(root):
        fail(f'{root} is a file; pass another --out')
    if os.path.isdir(root) and os.listdir(root) and not os.path.exists(stamp):
        fail(f'{root} exists and was not written by make_synthetic.py (no {STAMP}); '
             f'move it away or pass another --out')
    if not force and os.path.exists(stamp):
        try:
            with open(stamp) as f:
                if json.load(f).get('settings') == settings:
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


def run_jobs(jobs, pool, name):
    t0, done = time.time(), 0
    it = pool.imap_unordered(render_job, jobs, chunksize=8) if pool else map(render_job, jobs)
    for done, _ in enumerate(it, 1):
        if sys.stdout.isatty() and done % 50 == 0:
            print(f'\r{name}: {done}/{len(jobs)}', end='', flush=True)
    return time.time() - t0


def write_source(args, pool):
    root = os.path.join(args.out, 'source')
    settings = dict(version=VERSION, size=args.size, seed=args.seed,
                    per_class=args.source_per_class)
    tmp = stage(root, args.force, settings)
    if tmp is None:
        print(f'source: {root} is complete with these settings, left alone (--force rewrites it)')
        return
    jobs = []
    for k, cls in enumerate(SOURCE_CLASSES):
        os.makedirs(os.path.join(tmp, cls))
        jobs += [('source', os.path.join(tmp, cls, f'{cls}_{i:05d}.jpg'), args.size, args.seed,
                  (k, i)) for i in range(args.source_per_class)]
    secs = run_jobs(jobs, pool, 'source')
    publish(tmp, root, dict(settings=settings, generator='make_synthetic.py', images=len(jobs),
                            classes={c: args.source_per_class for c in SOURCE_CLASSES}))
    print(f'\rsource: {len(jobs)} images, {len(SOURCE_CLASSES)} classes x {args.source_per_class}, '
          f'{args.size} px -> {root} ({secs:.1f} s)')


def write_skin(args, pool):
    root = os.path.join(args.out, 'skin')
    settings = dict(version=VERSION, size=args.size, seed=args.seed, count=args.skin_count)
    tmp = stage(root, args.force, settings)
    if tmp is None:
        print(f'skin: {root} is complete with these settings, left alone (--force rewrites it)')
        return
    images = skin_plan(args.skin_count, args.seed)
    os.makedirs(os.path.join(tmp, SKIN_DIR))
    jobs = [('skin', os.path.join(tmp, SKIN_DIR, im['image'] + '.jpg'), args.size, args.seed,
             (im['cls'], im['key'], im['key_img'])) for im in images]
    secs = run_jobs(jobs, pool, 'skin')
    images.sort(key=lambda im: im['image'])
    with open(os.path.join(tmp, SKIN_GT), 'w', newline='') as f:
        w = csv.writer(f, lineterminator='\n')
        w.writerow(['image'] + SKIN_CLASSES + ['UNK'])
        for im in images:
            w.writerow([im['image']] + ['1.0' if im['cls'] == c else '0.0' for c in SKIN_CLASSES]
                       + ['0.0'])
    with open(os.path.join(tmp, SKIN_META), 'w', newline='') as f:
        w = csv.writer(f, lineterminator='\n')
        w.writerow(['image', 'age_approx', 'anatom_site_general', 'lesion_id', 'sex'])
        for im in images:
            w.writerow([im['image'], im['age'], im['site'], im['lesion_id'], im['sex']])
    counts = {c: sum(im['cls'] == c for im in images) for c in SKIN_CLASSES}
    publish(tmp, root, dict(settings=settings, generator='make_synthetic.py', images=len(images),
                            classes=counts, lesions=len({im['key'] for im in images})))
    print(f'\rskin: {len(images)} images ({" ".join(f"{c} {n}" for c, n in counts.items())}), '
          f'{args.size} px -> {root} ({secs:.1f} s)')


# --------------------------------------------------------------------------- contact sheet
def write_grid(path, out, only, cols=6):
    """One PNG: a row of samples per class, labelled, for each dataset written under out."""
    rows = []  # (title, [(label, [image paths])])
    src = os.path.join(out, 'source')
    if only in (None, 'source') and os.path.isdir(src):
        rows.append(('source (ImageFolder)', [
            (c, [os.path.join(src, c, f) for f in sorted(os.listdir(os.path.join(src, c)))[:cols]])
            for c in sorted(os.listdir(src)) if os.path.isdir(os.path.join(src, c))]))
    skin = os.path.join(out, 'skin')
    if only in (None, 'skin') and os.path.isdir(skin):
        with open(os.path.join(skin, SKIN_GT)) as f:
            gt = list(csv.DictReader(f))
        by = {c: [os.path.join(skin, SKIN_DIR, r['image'] + '.jpg') for r in gt if r[c] == '1.0']
              for c in SKIN_CLASSES}
        rows.append(('skin (ISIC 2019 layout)', [(c, by[c][:cols]) for c in SKIN_CLASSES]))
    if not rows:
        fail(f'--grid: no datasets under {out} to show')
    size = Image.open(rows[0][1][0][1][0]).size[0]
    cell = size * max(1, round(96 / size))
    try:
        font = ImageFont.load_default(size=max(12, cell // 7))
    except TypeError:  # pillow < 10.1
        font = ImageFont.load_default()
    label_w, head_h = cell, cell // 3
    n_rows = sum(len(r) for _, r in rows)
    sheet = Image.new('RGB', (label_w + cols * cell, n_rows * cell + len(rows) * head_h), 'white')
    d = ImageDraw.Draw(sheet)
    y = 0
    for title, section in rows:
        d.text((4, y + head_h // 4), title, fill='black', font=font)
        y += head_h
        for label, paths in section:
            d.text((4, y + cell // 2 - cell // 10), label, fill='black', font=font)
            for k, p in enumerate(paths):
                with Image.open(p) as im:
                    sheet.paste(im.convert('RGB').resize((cell, cell), Image.NEAREST),
                                (label_w + k * cell, y))
            y += cell
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    sheet.save(tmp, 'PNG')
    os.replace(tmp, path)
    print(f'grid: {path}')


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.error = fail  # one line on stderr, exit status 2
    # what and where
    ap.add_argument('--out', default='data',
                    help='root folder; writes OUT/source and OUT/skin (default: data)')
    ap.add_argument('--only', choices=['source', 'skin'],
                    help='write just one of the two datasets (default: both)')
    ap.add_argument('--size', type=int, default=64,
                    help='pixel side of the written images (default 64: the experiment trains at '
                         '32); structures scale with the image, so larger sizes are just sharper')
    # how much
    ap.add_argument('--source-per-class', type=int, default=200,
                    help=f'images per source class, {len(SOURCE_CLASSES)} classes (default 200: '
                         f'2,400 images, enough for a few minutes of CPU pretraining)')
    ap.add_argument('--skin-count', type=int, default=2500,
                    help='skin images in all, split with ISIC 2019 proportions, every class at '
                         'least 3%% (default 2500: NV 1156 ... DF, VASC, SCC 75 each)')
    ap.add_argument('--seed', type=int, default=0, help='same seed, same bytes (default 0)')
    # how
    ap.add_argument('--workers', type=int, default=min(2, os.cpu_count() or 1),
                    help='processes rendering images; the output does not depend on it '
                         '(default: 2, or 1 on a one-core machine)')
    ap.add_argument('--force', action='store_true',
                    help='rewrite a dataset even if one with the same settings is already there')
    ap.add_argument('--grid', metavar='PATH',
                    help='also write a PNG contact sheet: a labelled row of samples per class')
    args = ap.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        fail(f'--out {args.out}: is a file; pass a folder')
    if args.size < 16:
        fail(f'--size {args.size}: must be at least 16 pixels')
    if args.source_per_class < 1:
        fail(f'--source-per-class {args.source_per_class}: must be at least 1')
    if args.skin_count < len(SKIN_CLASSES):
        fail(f'--skin-count {args.skin_count}: must be at least {len(SKIN_CLASSES)} '
             f'(one image per class)')
    if args.workers < 1:
        fail(f'--workers {args.workers}: must be at least 1')
    return args


def main():
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    pool = mp.Pool(args.workers) if args.workers > 1 else None
    try:
        if args.only in (None, 'source'):
            write_source(args, pool)
        if args.only in (None, 'skin'):
            write_skin(args, pool)
    finally:
        if pool:
            pool.close()
            pool.join()
    if args.grid:
        write_grid(args.grid, args.out, args.only)


if __name__ == '__main__':
    main()
