"""classification_metrics against values worked out by hand (the arithmetic is in comments)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import classification_metrics  # noqa: E402


def approx(x):
    return pytest.approx(x, abs=1e-12)


# 6 samples, 4 classes; class 3 is never true but is predicted once.
LABELS = [0, 0, 0, 1, 1, 2]
PROBS = [[0.7, 0.1, 0.1, 0.1],   # true 0, pred 0
         [0.5, 0.2, 0.2, 0.1],   # true 0, pred 0
         [0.3, 0.4, 0.2, 0.1],   # true 0, pred 1
         [0.2, 0.6, 0.1, 0.1],   # true 1, pred 1
         [0.1, 0.3, 0.2, 0.4],   # true 1, pred 3
         [0.1, 0.1, 0.7, 0.1]]   # true 2, pred 2


def test_hand_case_with_absent_and_predicted_only_class():
    m = classification_metrics(np.array(PROBS), np.array(LABELS), 4)
    # rows = true: true 0 -> pred 0,0,1; true 1 -> pred 1,3; true 2 -> pred 2; true 3: none
    assert m['confusion_matrix'] == [[2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert m['n'] == 6
    assert m['accuracy'] == approx(4 / 6)                      # diagonal 2+1+1 of 6
    # recall = TP/T: 2/3, 1/2, 1/1, class 3 absent from the labels -> None
    assert m['per_class_recall'][:3] == [approx(2 / 3), approx(1 / 2), approx(1.0)]
    assert m['per_class_recall'][3] is None
    assert m['balanced_accuracy'] == approx((2 / 3 + 1 / 2 + 1) / 3)   # = 13/18, 3 classes
    # T = [3,2,1,0], P = [2,2,1,1], TP = [2,1,1,0]; F1 = 2TP/(T+P):
    # 4/5, 2/4, 2/2, 0/1 -> class 3 (predicted, never true) counts with F1 = 0
    assert m['macro_f1'] == approx((0.8 + 0.5 + 1.0 + 0.0) / 4)        # 0.575
    assert m['weighted_f1'] == approx((3 * 0.8 + 2 * 0.5 + 1 * 1.0) / 6)  # 4.4/6
    # one-vs-rest AUROC over classes 0, 1, 2 (3 has no positives):
    # class 0: scores pos {.7,.5,.3} all > neg {.2,.1,.1}                     -> 9/9 = 1
    # class 1: pos .6 beats all 4 neg {.1,.2,.4,.1}; pos .3 beats .1,.2,.1 not .4 -> 7/8
    # class 2: pos .7 beats all 5 negatives                                   -> 1
    assert m['auroc'] == approx((1 + 7 / 8 + 1) / 3)
    json.dumps(m, allow_nan=False)  # plain JSON values only


def test_class_neither_true_nor_predicted_is_left_out_of_macro_f1():
    # the same predictions with a 5th class that never occurs and is never predicted
    probs = np.concatenate([np.array(PROBS), np.zeros((6, 1))], axis=1)
    m = classification_metrics(probs, LABELS, 5)
    assert m['per_class_recall'][3:] == [None, None]
    assert m['macro_f1'] == approx(0.575)   # still averaged over 4 classes, not 5
    assert m['balanced_accuracy'] == approx(13 / 18)
    assert m['auroc'] == approx((1 + 7 / 8 + 1) / 3)
    assert len(m['confusion_matrix']) == 5 and m['confusion_matrix'][4] == [0] * 5


def test_perfect_predictions():
    labels = [0, 1, 2, 0]
    m = classification_metrics(np.eye(3)[labels], labels, 3)
    for k in ('accuracy', 'balanced_accuracy', 'macro_f1', 'weighted_f1', 'auroc'):
        assert m[k] == approx(1.0), k
    assert m['per_class_recall'] == [1.0, 1.0, 1.0]
    assert m['confusion_matrix'] == [[2, 0, 0], [0, 1, 0], [0, 0, 1]]


def test_worst_predictions():
    # every sample confidently given the other class
    labels = [0, 1, 0, 1]
    probs = [[0.2, 0.8], [0.9, 0.1], [0.3, 0.7], [0.6, 0.4]]
    m = classification_metrics(probs, labels, 2)
    assert m['confusion_matrix'] == [[0, 2], [2, 0]]
    for k in ('accuracy', 'balanced_accuracy', 'macro_f1', 'weighted_f1'):
        assert m[k] == 0.0, k                      # TP = 0 everywhere: F1 = 0/(2+2)
    # class 1 scores: positives {.1, .4} below negatives {.8, .7}: 0 of 4 pairs -> 0
    assert m['auroc'] == approx(0.0)


@pytest.mark.parametrize('scores, expected', [
    # pos {.35,.8} vs neg {.1,.4}: .35>.1, .35<.4, .8>both -> 3/4
    ([0.1, 0.4, 0.35, 0.8], 0.75),
    # pos {.5,.9} vs neg {.2,.5}: .5>.2, .5=.5 counts 1/2, .9>both -> 3.5/4
    ([0.2, 0.5, 0.5, 0.9], 0.875),
    # all tied: every pair counts 1/2 -> 0.5
    ([0.5, 0.5, 0.5, 0.5], 0.5),
])
def test_binary_auroc_with_ties(scores, expected):
    s = np.array(scores)
    m = classification_metrics(np.stack([1 - s, s], 1), [0, 0, 1, 1], 2)
    # class 0 uses 1 - s with the roles swapped: same pairs, same AUC; macro = binary AUROC
    assert m['auroc'] == approx(expected)


def test_auroc_matches_pairwise_count_with_many_ties():
    # independent reference: AUC = mean over (pos, neg) pairs of [s+ > s-] + [s+ == s-] / 2
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 40)
    probs = rng.integers(0, 4, (40, 3)).astype(float)  # scores from {0,1,2,3}: many ties
    aucs = []
    for k in range(3):
        pos, neg = probs[labels == k, k], probs[labels != k, k]
        d = pos[:, None] - neg[None, :]
        aucs.append(((d > 0) + 0.5 * (d == 0)).mean())
    assert classification_metrics(probs, labels, 3)['auroc'] == approx(np.mean(aucs))


def test_single_class_in_labels():
    probs = [[0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.8, 0.1]]
    m = classification_metrics(probs, [1, 1, 1], 3)
    assert m['auroc'] is None                     # one class: no negatives to rank against
    assert m['per_class_recall'] == [None, approx(2 / 3), None]
    assert m['balanced_accuracy'] == approx(2 / 3)   # mean over the one present class
    assert m['accuracy'] == approx(2 / 3)
    # F1: class 0 T=0,P=1 -> 0; class 1 T=3,P=2,TP=2 -> 4/5; class 2 absent everywhere -> out
    assert m['macro_f1'] == approx(0.4)
    assert m['weighted_f1'] == approx(0.8)
    assert json.loads(json.dumps(m))['auroc'] is None   # JSON null, not 0


def test_torch_and_numpy_inputs_agree():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(50, 5, generator=g), 1)
    labels = torch.randint(0, 4, (50,), generator=g)  # class 4 never true
    a = classification_metrics(probs, labels, 5)
    b = classification_metrics(probs.numpy(), labels.numpy(), 5)
    c = classification_metrics(probs.tolist(), labels.tolist(), 5)
    assert a == b == c
    assert a['per_class_recall'][4] is None
    assert type(a['accuracy']) is float and type(a['n']) is int
    assert all(type(v) is int for row in a['confusion_matrix'] for v in row)


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        classification_metrics(np.ones((3, 2)) / 2, [0, 1], 2)       # N mismatch
    with pytest.raises(ValueError):
        classification_metrics(np.ones((2, 2)) / 2, [0, 2], 2)       # label out of range
    with pytest.raises(ValueError):
        classification_metrics(np.full((2, 2), np.nan), [0, 1], 2)   # NaN scores


def test_a_tie_goes_to_the_first_class():
    """The docstring's rule, pred = argmax with the first index on a tie: rows tied between
    classes 1 and 2, and among all three, are predicted 1 and 0."""
    probs = np.array([[0.2, 0.4, 0.4], [1 / 3] * 3, [0.1, 0.3, 0.6]])
    m = classification_metrics(probs, np.array([1, 0, 2]), 3)
    assert m['accuracy'] == 1.0
    assert m['confusion_matrix'] == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
