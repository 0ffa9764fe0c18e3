"""What colour alone tells about a skin set: a logistic regression on 36 colour statistics of
each image (per channel: mean, standard deviation and a 10-bin histogram, at the scripts'
resolution), no network. On the same labelled images per seed as finetune.py and probe.py, its
L2 chosen on the val part as the probe's, scored on the test part. A floor every init should
clear; where it does not, the set's classes differ mostly in colour, which Barlow Twins' colour
jitter and grayscale views teach a network to ignore.

    python tests/colour_baseline.py --data data/skin --split splits/skin-random-40.json
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
from probe import L2_GRID, fit_logreg  # noqa: E402


def colour_features(images, size):
    """(N, 36) float64 from (N, H, W, 3) uint8, resized to size x size as the eval view."""
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(size, size), mode='bilinear', antialias=True, align_corners=False)
    flat = x.flatten(2)  # (N, 3, S*S)
    hist = torch.stack([torch.stack([torch.histc(c, bins=10, min=0, max=1) for c in img])
                        for img in flat]) / flat.shape[2]  # (N, 3, 10)
    return torch.cat([flat.mean(2), flat.std(2), hist.flatten(1)], 1).double()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data', required=True)
    p.add_argument('--split', required=True)
    p.add_argument('--size', type=C.number(int, 8), default=32)
    p.add_argument('--cache-size', type=C.number(int, 8), default=40)
    p.add_argument('--cache-dir', default='cache')
    p.add_argument('--labels-per-class', type=C.number(int, 1), default=10)
    p.add_argument('--seeds', type=C.parse_seeds, default=C.parse_seeds('0-5'))
    args = p.parse_args(argv)
    ds = C.read_dataset(args.data)
    split = C.load_split(args.split, ds)
    cache = C.build_cache(ds, args.cache_size, args.cache_dir, workers=0, verbose=False)
    labels = torch.tensor(cache['labels'])
    feats = colour_features(np.load(cache['file'], mmap_mode='r'), args.size)
    classes = len(cache['classes'])
    part = lambda ids: torch.tensor(C.cache_positions(cache, ids))
    val, test = part(split['val']), part(split['test'])
    scores = []
    for seed in args.seeds:
        train = part(C.labelled_subset(ds, split['train'], seed, args.labels_per_class))
        mean, std = feats[train].mean(0), feats[train].std(0).clamp_min(1e-8)
        z = lambda k: (feats[k] - mean) / std  # standardised on the labelled images
        fits = {l2: fit_logreg(z(train), labels[train], classes, l2, 200) for l2 in L2_GRID}
        score = lambda wb, k: C.classification_metrics(
            torch.softmax(z(k) @ wb[0] + wb[1], 1), labels[k], classes)['balanced_accuracy']
        l2 = max(L2_GRID, key=lambda l: score(fits[l], val))
        scores.append(score(fits[l2], test))
        print(f'seed {seed}: {len(train)} labelled images, L2 {l2:g} (val), test balanced '
              f'accuracy {scores[-1]:.3f}')
    if len(scores) > 1:
        print(f'mean over {len(scores)} seeds: {np.mean(scores):.3f} (std '
              f'{np.std(scores, ddof=1):.3f})')


if __name__ == '__main__':
    C.main_guard(main)
