"""Class weights, calibrated probabilities and decision offsets: what keeps a rare grade visible.

- `class_weights`: the weight of each grade in the training losses (none, balanced, or given per label).
- `fit_temperature`: temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"):
  one scalar T fitted on held-out data by least negative log-likelihood; softmax(log p / T) changes
  the probabilities, never their order.
- `fit_offsets`: per-grade additive offsets on the log-probabilities, chosen on held-out data to
  maximise macro-F1 (the decision rule; the probabilities stay as calibrated). Coordinate ascent over a
  fixed grid, ties broken toward the smallest offsets, so data that argmax already serves well keeps
  offsets of 0.
- `expected_calibration_error` and `reliability`: top-label calibration in equal-width confidence bins
  (Naeini et al. 2015; the form Guo et al. report).

All of it is plain numpy over (n, k) probability matrices whose columns follow `spec.labels`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import f1_score

_FLOOR = 1e-12
OFFSET_GRID = np.round(np.arange(-4.0, 4.0001, 0.25), 2)


def class_weights(
    mode: str, labels: Sequence[str], train_labels: Sequence[str], custom: Mapping[str, float] | None = None
) -> np.ndarray | None:
    """Per-label weights, in `labels` order, or None for `none` (plain, unweighted losses).

    balanced: n / (k * count(label)) over the training labels (scikit-learn's `class_weight="balanced"`),
    where k counts the grades present; a grade absent from training gets 1 (it is never a target).
    custom: the given weights, 1 for labels not named."""
    if mode == "none":
        return None
    if mode == "custom":
        if not custom:
            raise ValueError("spec.student.train.customClassWeights: required when classWeights is custom")
        unknown = sorted(set(custom) - set(labels))
        if unknown:
            raise ValueError(f"spec.student.train.customClassWeights: labels {unknown} are not in {list(labels)}")
        return np.array([float(custom.get(lab, 1.0)) for lab in labels])
    if mode != "balanced":
        raise ValueError(f"spec.student.train.classWeights: expected none, balanced or custom, got {mode!r}")
    counts = np.array([sum(1 for y in train_labels if y == lab) for lab in labels], dtype=np.float64)
    if counts.sum() == 0:
        raise ValueError("class weights: no training labels to count")
    present = counts > 0
    w = np.ones(len(labels))
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


def _log(proba: np.ndarray) -> np.ndarray:
    return np.log(np.clip(proba, _FLOOR, None))


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): probabilities of logits divided by T (the softmax's shift cancels)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = _log(proba) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(proba: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes `y` (integer indices)."""
    return float(-_log(proba[np.arange(len(y)), y]).mean())


def fit_temperature(proba: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T in `bounds` that minimises the NLL of softmax(log p / T) on (proba, y)."""
    from scipy.optimize import minimize_scalar

    if len(y) == 0:
        raise ValueError("temperature scaling needs held-out examples")
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    res = minimize_scalar(
        lambda t: nll(apply_temperature(proba, float(np.exp(t))), y), bounds=(lo, hi), method="bounded"
    )
    return float(np.exp(res.x))


def decide(proba: np.ndarray, offsets: Sequence[float] | None = None) -> np.ndarray:
    """Predicted class indices: argmax(log p + offsets), or the plain argmax without offsets."""
    if offsets is None:
        return proba.argmax(axis=1)
    return (_log(proba) + np.asarray(offsets, dtype=np.float64)).argmax(axis=1)


def _macro_f1(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    return float(f1_score(y, pred, labels=list(range(k)), average="macro", zero_division=0))


def fit_offsets(proba: np.ndarray, y: np.ndarray, rounds: int = 3) -> np.ndarray:
    """Per-class offsets (class 0's fixed at 0: only differences matter) that maximise the macro-F1 of
    `decide(proba, offsets)` on (proba, y). Coordinate ascent over `OFFSET_GRID`; among equal scores the
    offset closest to 0 wins, so offsets move only where they raise macro-F1."""
    n, k = proba.shape
    if n == 0:
        raise ValueError("decision offsets need held-out examples")
    b = np.zeros(k)
    best = _macro_f1(y, decide(proba, b), k)
    for _ in range(rounds):
        moved = False
        for c in range(1, k):
            for v in sorted(OFFSET_GRID, key=abs):
                trial = b.copy()
                trial[c] = v
                score = _macro_f1(y, decide(proba, trial), k)
                if score > best + 1e-12:
                    best, b, moved = score, trial, True
        if not moved:
            break
    return b


def reliability(proba: np.ndarray, y: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Top-label reliability: per equal-width confidence bin (upper edge inclusive), its count, mean
    confidence and accuracy. Empty bins are left out."""
    conf = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        if m.any():
            out.append(
                {
                    "lower": float(edges[b]),
                    "upper": float(edges[b + 1]),
                    "count": int(m.sum()),
                    "confidence": float(conf[m].mean()),
                    "accuracy": float(correct[m].mean()),
                }
            )
    return out


def expected_calibration_error(proba: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """ECE = sum over bins of (bin count / n) * |accuracy - mean confidence| (top label)."""
    if len(y) == 0:
        raise ValueError("no examples to score")
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in reliability(proba, y, bins)) / len(y))
