"""Write the embedded default datasets: a procedural ImageNet stand-in and an ISIC 2019 look-alike.

    python make_synthetic.py                                  # data/source + data/skin, ~2 min
    python make_synthetic.py --grid docs/synthetic_grid.png   # also a contact sheet per class
    python make_synthetic.py --only skin --skin-count 6000 --force   # a bigger skin set
    python make_synthetic.py --out /tmp/tiny --size 32 --source-per-class 4 --skin-count 40

source/: an ImageFolder of 12 procedural patterns; skin/: the ISIC 2019 layout and CSVs, lesions
of 8 classes (each a distribution over shape, colours and STRUCTURES), some photographed 2-3 times.
Deterministic for --seed; written to a hidden folder, stamped, renamed into place; left alone
by a rerun with the same settings.
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
from PIL import Image, ImageDraw, ImageFilter, ImageFont

VERSION = 3  # bump when the images change, so old stamps no longer match
STAMP = '.synthetic.json'
SOURCE_CLASSES = ['blobs', 'branches', 'cells', 'checkers', 'crosses', 'grid', 'polygons',
                  'rings', 'spokes', 'spots', 'stars', 'stripes']
SKIN_CLASSES = ['MEL', 'NV', 'BCC', 'AK', 'BKL', 'DF', 'VASC', 'SCC']  # ground-truth column order
ISIC_COUNTS = {'MEL': 4522, 'NV': 12875, 'BCC': 3323, 'AK': 867, 'BKL': 2624, 'DF': 239,
               'VASC': 253, 'SCC': 628}  # the real ISIC 2019 training set, 25,331 images (no UNK)
SKIN_DIR, SKIN_GT, SKIN_META = ('ISIC_2019_Training_Input', 'ISIC_2019_Training_GroundTruth.csv',
                                'ISIC_2019_Training_Metadata.csv')
META = ['image', 'age_approx', 'anatom_site_general', 'lesion_id', 'sex']  # the metadata columns
AGE = {'MEL': 60, 'NV': 42, 'BCC': 67, 'AK': 70, 'BKL': 62, 'DF': 45, 'VASC': 48, 'SCC': 72}
SITES = {'anterior torso': .22, 'posterior torso': .22, 'lateral torso': .05, 'head/neck': .12,
         'upper extremity': .14, 'lower extremity': .16, 'palms/soles': .02, 'oral/genital': .01,
         '': .06}


def fail(msg):
    print(f'error: {msg}', file=sys.stderr)
    sys.exit(2)


# --------------------------------------------------------------------------- drawing helpers
# Images are rendered at R = 2 * size in float32 RGB in [0, 1], then box-downsampled (antialias).
def smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def noise(rng, R, cells):  # smooth value noise in [0, 1]: a random grid upsampled bicubically
    a = np.asarray(Image.fromarray(rng.random((int(cells) + 1,) * 2).astype(np.float32), 'F')
                   .resize((R, R), Image.BICUBIC))
    return (a - a.min()) / (a.max() - a.min() + 1e-6)


def blur(a, sigma):  # Gaussian blur of an image or a mask in [0, 1], through 8 bits
    im = Image.fromarray((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8))
    return np.asarray(im.filter(ImageFilter.GaussianBlur(sigma)), np.float32) / 255


def mask(R, fn):  # fn(ImageDraw) paints 1.0 on a black float canvas
    im = Image.new('F', (R, R), 0.0)
    fn(ImageDraw.Draw(im))
    return np.array(im, dtype=np.float32)


def over(img, colour, alpha):  # colour (3,) or (R, R, 3), alpha (R, R)
    a = np.clip(alpha, 0, 1)[..., None]
    return img * (1 - a) + np.asarray(colour, np.float32) * a


def lattice(rng, sp, jit, half, L=None, tmax=1):  # jittered hexagonal; in L: to tmax * L.rho
    g = np.arange(-half, half, sp)
    z = (g[None] + (np.arange(len(g))[:, None] % 2) * sp / 2 + 0.866j * g[:, None]).ravel()
    z = z + (rng.normal(0, jit * sp, z.size) + 1j * rng.normal(0, jit * sp, z.size))
    return z if L is None else z[np.abs(z) / L.rho(np.angle(z)) < tmax] + L.c


def voronoi(xx, yy, z):  # per pixel, the distance to the nearest wall of the cells of seeds z
    d1, d2 = np.full(xx.shape, np.inf, np.float32), np.full(xx.shape, np.inf, np.float32)
    for p in z.tolist():  # one seed at a time: memory stays (R, R)
        d = (xx - p.real) ** 2 + (yy - p.imag) ** 2
        d1, d2 = np.minimum(d1, d), np.minimum(d2, np.maximum(d1, d))
    return (np.sqrt(d2) - np.sqrt(d1)) / 2


def wobble(rng, amp):  # an outline's radius factor, 1 + sum_k amp[k-1] cos(k angle + phase_k)
    ph = rng.uniform(0, 2 * np.pi, len(amp)).tolist()
    return lambda a: 1 + sum(x * np.cos((k + 1) * a + p) for k, (x, p) in enumerate(zip(amp, ph)))


def tree(d, x, y, ang, length, width, depth, rng, bend=0.25):  # a bent line; twigs to depth
    steps = length / 3 * np.exp(1j * (ang + np.cumsum(rng.normal(0, bend, 3))))
    z = x + 1j * y + np.concatenate([[0], np.cumsum(steps)])
    d.line([(p.real, p.imag) for p in z.tolist()], fill=1.0, width=max(1, round(width)),
           joint='curve')
    for side in (-1, 1)[:2 * (depth > 0)]:
        if rng.random() < 0.85:
            tree(d, z[-1].real, z[-1].imag, np.angle(z[-1] - z[-2]) + side * rng.uniform(.3, .8),
                 length * rng.uniform(0.55, 0.8), width * 0.7, depth - 1, rng, bend)


def finish(img, rng, size, blur_p):  # camera: light, white balance, blur, noise; to uint8
    R, ang, t = len(img), rng.uniform(0, 2 * np.pi), (np.arange(len(img)) + 0.5) / len(img)
    light = 1 + rng.uniform(0, 0.25) * (t * math.cos(ang) + t[:, None] * math.sin(ang) - 0.5)
    temp, tint = rng.normal(0, 0.07), abs(rng.normal(0, 0.04))  # white balance: warm/cool, magenta
    img = img * (light * rng.uniform(0.75, 1.2))[..., None] * [1 + temp, 1 - tint, 1 - temp]
    img = blur(img, rng.uniform(0.5, 1.3) * R / 128) if rng.random() < blur_p else img
    img = np.clip(img + rng.normal(0, rng.uniform(0.004, 0.02), img.shape), 0, 1)
    return Image.fromarray((img * 255 + 0.5).astype(np.uint8)).resize((size, size), Image.BOX)


# ------------------------------------------------------------------- source (ImageNet stand-in)
def source_image(cls, g, R):  # the object on a plain or mottled background; z: its frame
    hsv = lambda: np.array(colorsys.hsv_to_rgb(g.random(), g.random() ** .7, g.uniform(.1, 1)),
                           np.float32)
    b1, b2, t = hsv(), hsv(), noise(g, R, g.integers(2, 7)) * (g.random() < 0.7)
    img = (b1 + (b2 - b1) * t[..., None]) * (1 + 0.08 * (noise(g, R, R // 6)[..., None] - .5))
    (yy, xx), s = np.mgrid[:R, :R] + 0.5, g.uniform(0.6, 1.3)
    z0 = complex(*g.uniform(0.3, 0.7, 2) * R)
    z = (xx + 1j * yy - z0) / (R / 2) * np.exp(-1j * g.uniform(0, 2 * np.pi)) / s
    u, v, r, f = z.real, z.imag, np.abs(z), g.uniform(1.5, 5)
    band = lambda x, f=f: smoothstep(-.25, .25, np.sin(np.pi * f * x) + g.uniform(-.4, .4))
    disc = smoothstep(1.05, 0.95, r / g.uniform(0.5, 1.5))
    if cls == 'stripes':  # straight or wavy
        m = band(u + (g.random() < .4) * g.uniform(0, .3) * np.sin(v * g.uniform(2, 9)))
    elif cls in ('rings', 'spokes'):
        m = disc * (band(r) if cls == 'rings' else band(np.angle(z) / np.pi, 2 * g.integers(2, 8))
                    * (r > g.uniform(0, .2)))
    elif cls == 'checkers':
        m = smoothstep(-0.1, 0.1, np.sin(np.pi * f * u) * np.sin(np.pi * f * v))
    elif cls == 'grid':  # the distance to the nearest line, against the line width
        m = smoothstep(1, 0.5, np.minimum(*[abs(x - np.round(f * x) / f) for x in (u, v)])
                       / g.uniform(0.03, 0.1))
    elif cls == 'crosses':
        arm, w = g.uniform(0.5, 0.9), g.uniform(0.1, 0.25)
        m = smoothstep(.03, -.03, np.minimum(np.maximum(abs(u) - arm, abs(v) - w),
                                             np.maximum(abs(v) - arm, abs(u) - w)))
    elif cls == 'cells':
        sp = g.uniform(0.12, 0.3) * R * s
        seeds = lattice(g, sp, 0.2, 0.75 * R) + R / 2 * (1 + 1j)
        m = smoothstep(1, 0.5, voronoi(xx, yy, seeds) / (sp * g.uniform(0.04, 0.12)))
    elif cls == 'blobs':  # one to three amoebas: discs with wobbly outlines
        m = 0
        for o in g.uniform(-0.5, 0.5, (g.integers(1, 4), 2)) @ [1, 1j]:
            rho = wobble(g, g.uniform(0, .25 / np.arange(1, 6)).tolist())(np.angle(z - o))
            m = np.maximum(m, smoothstep(1.05, 0.95, np.abs(z - o) / rho / g.uniform(.3, .6)))
    elif cls == 'spots':
        xyr = g.uniform([0, 0, .02 * R * s], [R, R, .09 * R * s], (g.integers(4, 30), 3))
        m = mask(R, lambda d: [d.ellipse([x - q, y - q, x + q, y + q], fill=1) for x, y, q in xyr])
    elif cls == 'branches':
        m = mask(R, lambda d: [tree(d, *g.uniform(0.1, 0.9, 2) * R, g.uniform(0, 2 * np.pi),
                                    g.uniform(0.25, 0.45) * R * s, g.uniform(0.02, 0.05) * R,
                                    3, g) for _ in range(g.integers(1, 4))])
    else:  # polygons, stars: corners at these radii, evenly round
        rad = (g.uniform(0.45, 0.75) * g.uniform(0.85, 1.15, g.integers(3, 9)) if cls == 'polygons'
               else g.uniform(0.5, 0.8) * np.tile([1, g.uniform(0.3, 0.55)], g.integers(5, 10)))
        c = z0 + rad * s * R / 2 * np.exp(1j * (g.uniform(0, 7) + np.linspace(0, 2 * np.pi, len(
            rad), endpoint=False)))
        m = mask(R, lambda d: d.polygon([(p.real, p.imag) for p in c.tolist()], fill=1.0))
    f = max([hsv() for _ in range(5)], key=lambda c: abs(c.mean() - img.mean()))
    f = f * (1 + 0.15 * (noise(g, R, g.integers(3, 12))[..., None] - 0.5))
    return over(img, f, m * g.uniform(0.75, 1.0))


# ------------------------------------------------------------------ skin (ISIC 2019 look-alike)
# Pigments are factors on the skin tone (a lesion on darker skin is darker); others absolute.
PIGMENT = {'tan': (.86, .74, .64), 'light': (.72, .55, .43), 'brown': (.52, .36, .26),
           'dark': (.30, .20, .14)}
COLOUR = {'black': (.10, .08, .08), 'bluegrey': (.45, .48, .55), 'slate': (.30, .33, .40),
          'veil': (.70, .71, .73), 'red': (.80, .22, .25), 'pink': (.92, .60, .62),
          'white': (.95, .93, .91), 'scar': (.87, .86, .84), 'keratin': (.95, .90, .77),
          'purple': (.50, .17, .32), 'maroon': (.36, .08, .14), 'crust': (.40, .16, .10)}
# Shape, uniform ranges of: radius (of R/2), asymmetry and border (the outline's low and high
# harmonics), edge softness, body colours and opacity; then P(concentric zones: NV rings...).
SHAPE = {'MEL': ((.45, .80), (.06, .20), (.03, .07), (.02, .08), (2, 5), (.85, 1.0), .15),
         'NV': ((.35, .75), (.00, .05), (.00, .02), (.04, .14), (1, 2), (.75, 1.0), .85),
         'BCC': ((.35, .70), (.03, .12), (.02, .06), (.05, .14), (1, 3), (.60, .95), .15),
         'AK': ((.40, .80), (.04, .14), (.02, .05), (.12, .25), (1, 2), (.60, .90), .15),
         'BKL': ((.40, .80), (.04, .14), (.03, .08), (.01, .04), (1, 3), (.80, 1.0), .15),
         'DF': ((.35, .65), (.00, .07), (.00, .03), (.10, .22), (1, 2), (.70, .95), .80),
         'VASC': ((.30, .60), (.00, .10), (.01, .04), (.02, .05), (1, 2), (.85, 1.0), .15),
         'SCC': ((.40, .75), (.05, .15), (.02, .06), (.06, .15), (1, 3), (.60, .95), .15)}
# Body colour: the base drawn with these weights (overlapping on purpose: pigmented BCC, AK and
# SCC exist), then extra colours (MEL's: mostly dark, black or blue-grey), in soft zones.
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


# A lesion L, points as complex numbers (centre L.c): border radius L.rho(angle), L.d (1 on the
# border), windows L.win where a structure may show, a premultiplied layer L.P, L.A to paint on.
def pick(rng, v):  # a table value: a (lo, hi) range draws, a tuple of names picks one, else as is
    return (str(rng.choice(v)) if isinstance(v[0], str) else rng.uniform(*v)
            ) if isinstance(v, tuple) else v


def paint(L, c, alpha, win='all'):  # c: a colour name (jittered, pigments on the skin) or colours
    a = np.clip(alpha * L.win[win], 0, 1).astype(np.float32)
    L.P, L.A = over(L.P, L.colour(c) if isinstance(c, str) else c, a), L.A * (1 - a) + a


def points(L, n, t=(0, .85), sector=None):  # n at radius t (of the border), maybe on one side
    rng = L.rng
    a = (rng.uniform(0, 2 * np.pi, n) if sector is None else
         rng.uniform(0, 2 * np.pi) + rng.uniform(-.5, .5, n) * pick(rng, sector))
    return L.c + np.sqrt(rng.uniform(t[0] ** 2, t[1] ** 2, n)) * L.rho(a) * np.exp(1j * a)


def dots(L, c, r, n=(5, 15), t=(0, .85), sector=None, sp=None, jit=.2, ring=0, soft=0,
         op=(.7, .95), win='all'):
    """n discs of radius r * R (rings if ring), or a lattice of spacing sp * R, radius r * sp."""
    rng, R = L.rng, L.R
    s = pick(rng, sp) * R if sp else 0
    z = lattice(rng, s, jit, 1.6 * L.rad, L, t[1]) if sp else points(L, rng.integers(
        *n, endpoint=True), t, sector)
    rs = pick(rng, r) * s * rng.uniform(.85, 1.15, len(z)) if sp else rng.uniform(*r, len(z)) * R
    names, op = rng.choice(c if isinstance(c, tuple) else [c], len(z)), pick(rng, op)
    kw = dict(outline=1.0, width=max(1, round(ring * R))) if ring else dict(fill=1.0)
    for name in sorted(set(names.tolist())):  # sorted: set order varies per process
        m = mask(R, lambda d: [d.ellipse([p.real - q, p.imag - q, p.real + q, p.imag + q], **kw)
                               for p, q in zip(z[names == name].tolist(), rs[names == name])])
        paint(L, name, blur(m, soft * R) * op, win)


def net(L, c, sp, w, jit=.2, soft=.005, op=(.5, .8), win='all'):  # cell walls, spacing sp * R
    s = pick(L.rng, sp) * L.R
    width = pick(L.rng, w) * s * (0.7 + 0.6 * noise(L.rng, L.R, 6))
    z = lattice(L.rng, s, jit, 1.6 * L.rad, L, 1.2)
    walls = smoothstep(width, width * 0.3, voronoi(L.xx, L.yy, z))
    paint(L, pick(L.rng, c), blur(walls, soft * L.R) * pick(L.rng, op), win)


def patch(L, c, size=0, t=(0, .5), soft=0, op=(.6, .9), win='all'):  # a blot; size 0: all win
    rng, m = L.rng, 1.0
    if size:
        r = np.abs(L.xx + 1j * L.yy - points(L, 1, t)) / (pick(rng, size) * L.rad)
        r = r + 0.6 * (noise(rng, L.R, rng.integers(4, 9)) - 0.5)
        m = blur(smoothstep(1, .7, r), soft * L.R)
    paint(L, pick(rng, c), m * pick(rng, op), win)


def lines(L, c, n, length, w, t=(.4, .95), out=False, sector=None, depth=0, op=(.8, 1)):
    """n strokes w * R wide, length * radius long from t: outwards (streaks) or branching in."""
    rng, z = L.rng, points(L, L.rng.integers(*n, endpoint=True), t, sector)
    ang = np.angle(z - L.c) + (rng.normal(0, .2, len(z)) if out else rng.normal(np.pi, .8, len(z)))
    m = mask(L.R, lambda d: [tree(d, p.real, p.imag, a, L.rad * pick(rng, length), L.R * pick(
        rng, w), depth, rng, 0.05 if out else 0.25) for p, a in zip(z.tolist(), ang.tolist())])
    paint(L, pick(rng, c), m * pick(rng, op), 'any' if out else 'all')


def body(L):  # the pigmented body: a few colours in soft zones, mottled
    rng, g = L.rng, SHAPE[L.cls]
    k = rng.integers(*g[4], endpoint=True)
    names = [rng.choice(BASE_NAMES, p=BASE[L.cls])] + list(rng.choice(EXTRA[L.cls], k - 1))
    fields = np.stack([noise(rng, L.R, rng.integers(2, 5)) for _ in range(k)])
    if rng.random() < g[6]:
        centres = np.sort(rng.uniform(0, 1, k))[::-1 if L.cls == 'DF' else 1]
        fields = 0.2 * fields - np.abs(L.d[None] - centres[:, None, None])
    wt = np.exp(rng.uniform(10, 30) * (fields - fields.max(0)))  # soft zones, soft edges
    c = np.einsum('kyx,kc->yxc', wt / wt.sum(0), np.stack([L.colour(n) for n in names]))
    mottle = 0.8 * noise(rng, L.R, L.R // 12) + 0.2 * noise(rng, L.R, L.R // 4)
    paint(L, c * (0.85 + 0.3 * mottle)[..., None], rng.uniform(*g[5]))


# Each structure, drawn in this order: the percent chance that a lesion of each class shows it,
# the primitive and its parameters. Sizes are fractions of R (lengths and patch sizes: of the
# lesion radius); (lo, hi) ranges draw per lesion; a tuple of colours picks one (dots: per dot).
STRUCTURES = {  # MEL NV BCC AK BKL DF VASC SCC
    'erythema':   (' 5  0 25 75  5 10 10 55', patch, dict(c='pink', win='halo', op=(.2, .45))),
    'body':       ('100 ' * 8, body, {}),  # pigment in colour zones
    'periph_net': (' 0  0  0  0  0 80  0  0', net,  # delicate network at the rim (DF)
                   dict(c='brown', sp=(.10, .13), w=.08, win='rim', op=(.35, .6))),
    'network':    (' 5 65  0  0  5  0  0  0', net,  # regular reticular network
                   dict(c=('brown', 'dark'), sp=(.11, .15), w=.12, win='centre', op=(.5, .75))),
    'atyp_net':   ('70  8  0  0  5  0  0  0', net,  # thick, broken, irregular network
                   dict(c=('dark', 'black'), sp=(.12, .18), w=(.12, .2), jit=.35, win='patchy')),
    'veil':       ('65  3 12  0  5  0  0  0', patch,  # blue-white veil or scar-like regression
                   dict(c=('veil', 'scar'), size=(.3, .6), t=(0, .7), soft=.01, op=(.45, .8))),
    'white_ctr':  (' 3  2  3  0  0 90  0  5', patch,  # DF's central white patch
                   dict(c='white', size=(.35, .6), t=(0, .15), soft=.02, op=(.65, .9))),
    'globules':   (' 5 50  0  0  0  0  0  0', dots,  # regular cobblestone globules
                   dict(c=('brown', 'dark'), sp=(.085, .11), r=(.25, .35), op=(.5, .8))),
    'dots':       ('60  8  5  0  8  0  0  0', dots,  # irregular dots on one side
                   dict(c=('black', 'dark', 'bluegrey'), n=(8, 30), r=(.015, .04), t=(.5, 1),
                        sector=(1.5, 4.5), op=(.7, 1))),
    'nests':      (' 8  2 75  0  3  0  0  0', dots,  # blue-grey ovoid nests (BCC)
                   dict(c=('bluegrey', 'slate'), n=(2, 8), r=(.05, .11), t=(0, .9), soft=.01)),
    'streaks':    ('45  6  0  0  0  0  0  0', lines,  # radial, on one side or all round
                   dict(c=('dark', 'black'), n=(5, 20), length=(.3, .45), w=(.018, .028),
                        t=(.8, .8), out=True, sector=(1, 6.3))),
    'fissures':   (' 0  3  0  0 60  0  0  0', net,  # cerebriform ridges (seborrhoeic keratosis)
                   dict(c='dark', sp=(.18, .25), w=(.15, .25), jit=.45, win='centre')),
    'milia':      (' 0  6  5  0 90  0  0  0', dots,  # comedo-like openings, milia-like cysts
                   dict(c=('dark', 'black', 'crust', 'white', 'keratin'), n=(3, 15),
                        r=(.025, .05), soft=.006, op=(.75, 1))),
    'lacunae':    (' 0  0  0  0  0  0 95  0', dots,  # red-purple lacunae
                   dict(c=('red', 'red', 'purple', 'maroon'), sp=(.11, .16), r=(.4, .55), jit=.12,
                        t=(0, 1), soft=.006, op=1)),
    'strawberry': (' 0  0  0 80  0  0  0 10', net,  # red pseudo-network (AK)
                   dict(c='red', sp=(.10, .14), w=.3, jit=.3, soft=.01)),
    'scale':      (' 0  0  2 70 15  0  0 30', dots,  # white-yellow surface scale
                   dict(c=('white', 'keratin'), n=(30, 80), r=(.015, .035), t=(0, .95),
                        sector=(2, 4), soft=.006, op=(.5, .85))),
    'keratin':    (' 0  0  0 15 10  0  0 80', patch,  # central keratin mass
                   dict(c='keratin', size=(.35, .65), t=(0, .3), op=(.75, .95))),
    'follicles':  (' 0  0  0 50  0  0  0 55', dots,  # white circles round follicles
                   dict(c='white', n=(5, 15), r=(.03, .05), t=(0, .9), ring=.015, op=(.7, .9))),
    'ulceration': (' 5  0 30  2  0  0  5 35', patch,  # blood crust
                   dict(c=('crust', 'red', 'maroon'), size=(.2, .4), t=(0, .7), op=(.8, .95))),
    'arborizing': (' 3  0 90  5  3  0  0  8', lines,  # branching vessels (BCC)
                   dict(c='red', n=(1, 3), length=(.4, .6), w=(.025, .035), depth=3)),
    'dotted':     ('10  2  5 40  5 10  0 45', dots,  # dotted vessels
                   dict(c=('red', 'maroon'), n=(15, 50), r=(.012, .02), t=(0, .95), op=(.7, .9))),
    'glomerular': (' 0  0  0 10  3  0  0 65', dots,  # coiled vessels (SCC)
                   dict(c='red', n=(8, 24), r=(.015, .03), t=(0, .9), ring=.012, op=(.8, 1))),
    'hairpin':    (' 0  0  0  5 25  0  0 20', lines,  # looped vessels
                   dict(c='red', n=(4, 12), length=(.1, .2), w=(.012, .018), t=(.3, .9))),
}


def make_lesion(cls, rng, R):  # one lesion in its own frame (centre R/2), structures painted
    g = SHAPE[cls]
    L = SimpleNamespace(cls=cls, rng=rng, R=R, c=R / 2 * (1 + 1j), rad=rng.uniform(*g[0]) * R / 2)
    # the outline: harmonics 1-3 make the lesion asymmetric, 4-14 make its border irregular
    shape = wobble(rng, (rng.uniform(*g[1]) * rng.dirichlet(np.ones(3))).tolist() + (
        rng.uniform(*g[2]) * rng.random(11) * 2 / np.sqrt(np.arange(4, 15))).tolist())
    L.rho = lambda a: L.rad * shape(a)
    soft, t = rng.uniform(*g[3]), rng.beta(1.2, 3)  # skin tone: mostly fair, as in ISIC
    L.skin = (np.array([.95, .80, .74]) * (1 - t) + np.array([.42, .28, .20]) * t) * rng.normal(
        1, 0.03, 3)
    L.colour = lambda n: np.clip((np.array(PIGMENT[n]) * L.skin if n in PIGMENT else np.array(
        COLOUR[n])) * rng.normal(1, 0.04, 3), 0, 1)  # jittered; pigments on the skin tone
    L.yy, L.xx = np.mgrid[:R, :R].astype(np.float32) + 0.5  # pixel centres
    L.d = np.abs(L.xx + 1j * L.yy - L.c) / L.rho(np.angle(L.xx + 1j * L.yy - L.c))
    inside = smoothstep(1 + soft, 1 - soft, L.d)
    L.win = dict(any=1, all=inside, halo=smoothstep(1.8, 0.9, L.d),  # halo: round it too
                 centre=inside * smoothstep(1.0, 0.6, L.d), rim=inside * smoothstep(0.4, 0.7, L.d),
                 patchy=inside * smoothstep(0.35, 0.5, noise(rng, R, rng.integers(3, 6))))
    L.P, L.A = np.zeros((R, R, 3), np.float32), np.zeros((R, R), np.float32)
    for pct, draw, params in STRUCTURES.values():
        if rng.random() * 100 < int(pct.split()[SKIN_CLASSES.index(cls)]):
            draw(L, **params)
    return L


def photograph(L, rng, size):  # one dermoscopy image: pose, skin, hair, vignette, camera
    R = L.R
    # pose: rotate, scale, shift, maybe mirror (PIL's affine maps output pixels to input pixels)
    a, s = rng.uniform(0, 2 * np.pi), rng.uniform(0.85, 1.15)
    m = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) / s
    m[:, 0] *= rng.choice([-1, 1])
    off = R / 2 - m @ (R / 2 + rng.uniform(-.08, .08, 2) * R)
    P, A = [np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(ch), 'F').transform(
        (R, R), Image.AFFINE, (*m[0], off[0], *m[1], off[1]), Image.BILINEAR))
        for ch in np.moveaxis(X, -1, 0)], -1) for X in (L.P, L.A[..., None])]
    skin = L.skin * (1 + 0.07 * (noise(rng, R, rng.integers(3, 7)) - .5))[..., None]  # blotchy
    skin = over(skin, COLOUR['pink'], noise(rng, R, 4) * rng.uniform(0, .3))  # with redness
    img = skin * (1 + 0.05 * (noise(rng, R, R // 5) - .5))[..., None] * (1 - A) + P
    if rng.random() < 0.35:  # hair: long dark curves across the field
        hair = mask(R, lambda d: [tree(d, *rng.uniform(-.1, 1.1, 2) * R, rng.uniform(0, 7),
                                       R * rng.uniform(.5, 1.5), R * rng.uniform(.005, .011), 0,
                                       rng, .15) for _ in range(min(12, rng.geometric(.3)))])
        img = over(img, np.array([.25, .2, .17]) * rng.uniform(.3, 1), hair * .9)
    r, edge = np.hypot(L.xx - R / 2, L.yy - R / 2) / (R / 2), rng.uniform(1.0, 1.35)
    img = img * (1 - 0.25 * rng.random() * r ** 2)[..., None]  # lens falloff
    if rng.random() < 0.45:  # the dermatoscope's round field: dark corners
        img = img * smoothstep(edge + .08, edge - rng.uniform(.05, .15), r)[..., None]
    return finish(img, rng, size, blur_p=0.3)


def skin_plan(n, seed):
    """The images sorted by name, 1-3 per lesion, in ISIC 2019's class proportions with every
    class at least 3% (else DF and VASC get too few to learn and test on)."""
    floor, total = max(1, round(0.03 * n)), sum(ISIC_COUNTS.values())
    counts = {k: max(floor, round(n * v / total)) for k, v in ISIC_COUNTS.items()}
    counts['NV'] += n - sum(counts.values())
    rng, lesions = np.random.default_rng([seed, 1, 0]), []
    for cls, k in counts.items():
        while k > 0:
            lesions.append((cls, min(k, rng.choice([1, 2, 3], p=[.7, .2, .1]))))
            k -= lesions[-1][1]
    photos, numbers = [], rng.choice(10 * len(lesions), len(lesions), replace=False)
    for key, j in enumerate(rng.permutation(len(lesions))):  # keys, ids don't reveal the class
        (cls, views), site = lesions[j], rng.choice(list(SITES), p=list(SITES.values()))
        sex, age = rng.choice(['male', 'female', ''], p=[.52, .45, .03]), rng.normal(AGE[cls], 14)
        age = f'{np.clip(5 * round(age / 5), 5, 85):.1f}' if rng.random() > .03 else ''  # '55.0'
        ident = '' if views == 1 and rng.random() < .2 else (  # some have none, as in ISIC
            f'{"HAM" if rng.random() < .7 else "BCN"}_{numbers[key]:07d}')
        photos += views * [dict(cls=cls, key=key, sex=sex, anatom_site_general=site,
                                lesion_id=ident, age_approx=age)]
    images = []
    for i, p in enumerate(rng.permutation(len(photos))):  # the paper drops the _downsampled
        cls, down = photos[p]['cls'], photos[p]['cls'] in ('NV', 'MEL') and rng.random() < .03
        image = f'ISIC_{i:07d}' + '_downsampled' * down
        images.append(dict(photos[p], image=image, keys=(cls, photos[p]['key'], i), UNK='0.0',
                           path=os.path.join(SKIN_DIR, image + '.jpg'),
                           **{c: str(float(c == cls)) for c in SKIN_CLASSES}))
    return sorted(images, key=lambda im: im['image'])


# --------------------------------------------------------------------------- writing
def render_job(job):  # one source image, or the photos of one lesion, in a worker
    kind, size, seed, shots = job  # shots: [(path, keys)]; each image its own random streams
    lesion = None
    for path, keys in shots:
        rng = np.random.default_rng([seed, 0, *keys] if kind == 'source' else [seed, 3, keys[2]])
        if kind == 'source':
            im = finish(source_image(SOURCE_CLASSES[keys[0]], rng, 2 * size), rng, size, .2)
        else:  # the lesion from its own stream, painted once for all its photos (56% of a photo)
            if lesion is None:
                lesion = make_lesion(keys[0], np.random.default_rng([seed, 2, keys[1]]), 2 * size)
            im = photograph(lesion, rng, size)
        im.save(path, 'JPEG', quality=int(rng.integers(75 if kind == 'source' else 70, 96)))


def write_dataset(args, pool, name):
    """Write OUT/name (via OUT/.name.partial, stamped last) unless it has these settings."""
    root = os.path.join(args.out, name)
    tmp, old = (os.path.join(args.out, f'.{name}.{x}') for x in ('partial', 'old'))
    settings = dict(version=VERSION, size=args.size, seed=args.seed, **(dict(
        per_class=args.source_per_class) if name == 'source' else dict(count=args.skin_count)))
    if os.path.exists(root) and not os.path.exists(os.path.join(root, STAMP)) and (
            not os.path.isdir(root) or os.listdir(root)):
        fail(f'{root} exists and was not written by make_synthetic.py (no {STAMP}); '
             f'move it away or pass another --out')
    try:
        with open(os.path.join(root, STAMP)) as f:
            if not args.force and json.load(f).get('settings') == settings:
                return print(f'{name}: {root} is complete with these settings, left alone '
                             f'(--force rewrites it)')
    except (OSError, ValueError):
        pass
    t0, classes = time.time(), SOURCE_CLASSES if name == 'source' else SKIN_CLASSES
    images = skin_plan(args.skin_count, args.seed) if name == 'skin' else [
        dict(cls=c, keys=(k, i), path=os.path.join(c, f'{c}_{i:05d}.jpg'))
        for k, c in enumerate(SOURCE_CLASSES) for i in range(args.source_per_class)]
    for d in (tmp, old):
        shutil.rmtree(d, ignore_errors=True)
    for d in {os.path.dirname(im['path']) for im in images}:
        os.makedirs(os.path.join(tmp, d))
    for path, head in [(SKIN_GT, ['image', *SKIN_CLASSES, 'UNK']), (SKIN_META, META)][
            :2 * (name == 'skin')]:  # the CSVs, a row per image in name order
        with open(os.path.join(tmp, path), 'w', newline='') as f:
            w = csv.DictWriter(f, head, extrasaction='ignore', lineterminator='\n')
            w.writeheader()
            w.writerows(images)
    shots = {}  # a job per source image, or per lesion (its 1-3 photos)
    for k, im in enumerate(images):
        shots.setdefault(im['key'] if name == 'skin' else k, []).append(
            (os.path.join(tmp, im['path']), im['keys']))
    pool.map(render_job, [(name, args.size, args.seed, s) for s in shots.values()], chunksize=8)
    counts = {c: sum(im['cls'] == c for im in images) for c in classes}
    extra = dict(lesions=len({im['key'] for im in images})) if name == 'skin' else {}
    with open(os.path.join(tmp, STAMP), 'w') as f:  # last: only a whole dataset gets renamed
        json.dump(dict(settings=settings, generator='make_synthetic.py', images=len(images),
                       classes=counts, **extra), f, indent=1)
    if os.path.exists(root):
        os.replace(root, old)
    os.replace(tmp, root)
    shutil.rmtree(old, ignore_errors=True)
    detail = (' '.join(f'{c} {k}' for c, k in counts.items()) if extra else
              f'12 classes x {args.source_per_class}')
    print(f'{name}: {len(images)} images ({detail}), {args.size} px -> {root} '
          f'({time.time() - t0:.1f} s)')


def write_grid(path, out, only, cols=6, cell=96):  # a PNG contact sheet, a row per class
    rows = [(c, [os.path.join(out, 'source', c, f'{c}_{i:05d}.jpg') for i in range(cols)])
            for c in SOURCE_CLASSES] if only != 'skin' else []
    if only != 'source':
        with open(os.path.join(out, 'skin', SKIN_GT)) as f:
            gt = list(csv.DictReader(f))
        rows += [(c, [os.path.join(out, 'skin', SKIN_DIR, r['image'] + '.jpg') for r in gt
                      if r[c] == '1.0'][:cols]) for c in SKIN_CLASSES]
    sheet = Image.new('RGB', ((cols + 1) * cell, len(rows) * cell), 'white')
    font, draw = ImageFont.load_default(size=cell // 6), ImageDraw.Draw(sheet)
    for y, (label, paths) in enumerate(rows):
        draw.text((4, (y + .4) * cell), label, 'black', font)
        for x, p in enumerate((q for q in paths if os.path.exists(q)), 1):
            sheet.paste(Image.open(p).resize((cell,) * 2, Image.LANCZOS), (x * cell, y * cell))
    sheet.save(path, 'PNG')
    print(f'grid: {path}')


# --------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.error, add = fail, ap.add_argument  # errors: one line on stderr, exit status 2
    add('--out', default='data', help='writes OUT/source and OUT/skin (default: data)')
    add('--only', choices=['source', 'skin'], help='write just one dataset (default: both)')
    numbers = [('size', 64, 16, 'image side in pixels'), ('skin-count', 2500, 8, 'skin images'),
               ('source-per-class', 200, 1, 'images per source class'),
               ('seed', 0, 0, 'same seed, same bytes'), ('workers', 2, 1, 'processes')]
    for flag, default, _, what in numbers:
        add(f'--{flag}', type=int, default=default, help=f'{what} (default {default})')
    add('--force', action='store_true', help='rewrite a dataset even if it is there already')
    add('--grid', metavar='PATH', help='also write a PNG contact sheet, a row per class')
    args = ap.parse_args(argv)
    for flag, _, low, _ in numbers:
        if getattr(args, flag.replace('-', '_')) < low:
            fail(f'--{flag} {getattr(args, flag.replace("-", "_"))}: must be at least {low}')
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        fail(f'--out {args.out} is a file; pass a folder')
    if args.grid:
        os.makedirs(os.path.dirname(os.path.abspath(args.grid)), exist_ok=True)
    with mp.Pool(args.workers) as pool:
        for name in ('source', 'skin'):
            if args.only in (None, name):
                write_dataset(args, pool, name)
    if args.grid:
        write_grid(args.grid, args.out, args.only)


if __name__ == '__main__':
    main()
