"""tests/colour_baseline.py, the colour-only floor the README compares the inits with: its
features against values worked out by hand, and a run on a tiny set."""
import numpy as np
import pytest
import torch

import colour_baseline
import common as C


def test_colour_features_of_flat_and_two_tone_images():
    flat = np.full((1, 8, 8, 3), (51, 128, 255), np.uint8)  # 0.2, 0.502, 1.0
    f = colour_baseline.colour_features(flat, 4)[0]
    assert f.shape == (36,)
    assert f[:3].tolist() == pytest.approx([0.2, 128 / 255, 1.0], abs=1e-6)
    assert f[3:6].tolist() == pytest.approx([0, 0, 0], abs=1e-6)  # no spread
    hist = f[6:].view(3, 10)
    assert hist.sum(1).tolist() == pytest.approx([1, 1, 1], abs=0)
    assert hist.argmax(1).tolist() == [2, 5, 9]  # 0.2 in [0.2, 0.3), 0.502 in [0.5, 0.6)
    two = np.zeros((1, 4, 4, 3), np.uint8)
    two[0, :2] = 255  # half white, half black: mean 0.5, bins 0 and 9 at 0.5 each
    f = colour_baseline.colour_features(two, 4)[0]
    assert f[:3].tolist() == pytest.approx([0.5] * 3, abs=1e-6)
    assert f[3].item() == pytest.approx(torch.tensor([0.0] * 8 + [1.0] * 8).std().item())
    assert f[6:16].tolist() == pytest.approx([0.5] + [0] * 8 + [0.5], abs=0)


def test_a_run_scores_each_seed(imagefolder, tmp_path, capsys):
    ds = C.read_dataset(imagefolder)
    C.save_split(str(tmp_path / 's.json'), C.make_split(ds, 'random', seed=0))
    colour_baseline.main(['--data', imagefolder, '--split', str(tmp_path / 's.json'),
                          '--labels-per-class', '4', '--seeds', '0-1', '--size', '16',
                          '--cache-dir', str(tmp_path / 'c')])
    out = capsys.readouterr().out
    assert out.count('test balanced accuracy') == 2 and 'mean over 2 seeds' in out
    scores = [float(line.split()[-1]) for line in out.splitlines() if 'test balanced' in line]
    assert all(0 <= s <= 1 for s in scores)
