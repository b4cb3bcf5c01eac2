"""Scores of relevance predictions: what the evaluate stage reports and the student validates with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score

from kubedistill.ml.calibration import decide, expected_calibration_error, reliability


def classification_metrics(
    y_true: list[str], proba: np.ndarray, labels: list[str], offsets: Sequence[float] | None = None
) -> dict[str, Any]:
    """Metrics from true labels and an (n, len(labels)) probability matrix (columns in `labels` order).

    The predicted label is the argmax, or argmax(log p + offsets) with decision offsets; AUC and the
    top-label expected calibration error (`ece`, 10 bins, with its `reliability` bins) read the
    probabilities alone."""
    if len(y_true) == 0:
        raise ValueError("no examples to score")
    idx = {lab: i for i, lab in enumerate(labels)}
    unknown = sorted({y for y in y_true if y not in idx})
    if unknown:
        raise ValueError(f"labels {unknown} are not in spec.labels {labels}")
    y = np.array([idx[t] for t in y_true])
    pred = decide(proba, offsets)
    k = list(range(len(labels)))
    p, r, f, support = precision_recall_fscore_support(y, pred, labels=k, zero_division=0)
    present = sorted(set(y.tolist()))
    auc: float | None
    if len(present) < 2:
        auc = None  # undefined with one class
    else:
        probs = proba / np.clip(proba.sum(axis=1, keepdims=True), 1e-12, None)
        aucs = [roc_auc_score((y == c).astype(int), probs[:, c]) for c in present]
        auc = float(np.mean(aucs))
    return {
        "n": len(y),
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, labels=k, average="macro", zero_division=0)),
        "auc_ovr": auc,
        "ece": expected_calibration_error(proba, y),
        "reliability": reliability(proba, y),
        "per_class": {
            lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
            for i, lab in enumerate(labels)
        },
        "confusion": {"labels": labels, "matrix": confusion_matrix(y, pred, labels=k).tolist()},
    }


def macro_f1_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Macro-F1 over every label from confusion matrices (`[..., true, predicted]`), as sklearn's
    `f1_score(average="macro", zero_division=0)` with every label listed: F1 = 2·TP / (predicted + true)."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(float)
    denom = cm.sum(axis=-2) + cm.sum(axis=-1)
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return np.asarray(f1.mean(axis=-1))


def paired_gain_interval(
    y: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    k: int,
    rounds: int = 2000,
    level: float = 0.9,
    seed: int = 0,
    groups: Sequence[Any] | None = None,
) -> tuple[float, float]:
    """The `level` percentile interval of macro-F1(a) - macro-F1(b) under a paired bootstrap: both models are
    scored on the same resample, so what the rows share cancels.

    With `groups` (one key per row, e.g. its query) whole groups are resampled, a cluster bootstrap: the pairs
    of one query are not independent draws (a model that misreads a query misreads most of its pairs), and
    resampling them one by one makes the interval too narrow when the eval set is a few dozen queries. Without
    `groups` (or when every row is its own group) rows are resampled, which is a multinomial draw over the
    (true, a, b) outcome cells."""
    if not (len(y) == len(pred_a) == len(pred_b)) or len(y) == 0:
        raise ValueError(f"paired bootstrap needs equal, non-empty rows (got {len(y)}, {len(pred_a)}, {len(pred_b)})")
    if groups is not None and len(groups) != len(y):
        raise ValueError(f"paired bootstrap needs one group per row (got {len(groups)} groups for {len(y)} rows)")
    cell = (np.asarray(y) * k + np.asarray(pred_a)) * k + np.asarray(pred_b)
    rng = np.random.default_rng(seed)
    gid = None if groups is None else np.unique([str(g) for g in groups], return_inverse=True)[1]
    if gid is None or gid.max() + 1 == len(y):
        cells = np.bincount(cell, minlength=k**3).astype(float)
        draws = rng.multinomial(len(y), cells / len(y), size=rounds)
    else:
        n_groups = int(gid.max()) + 1
        per_group = np.zeros((n_groups, k**3))
        np.add.at(per_group, (gid, cell), 1.0)
        draws = np.concatenate(
            [
                rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=min(200, rounds - done)) @ per_group
                for done in range(0, rounds, 200)
            ]
        )
    draws = draws.reshape(rounds, k, k, k)
    gains = macro_f1_from_confusion(draws.sum(axis=3)) - macro_f1_from_confusion(draws.sum(axis=2))
    tail = (1 - level) / 2 * 100
    bounds = np.asarray(np.percentile(gains, [tail, 100 - tail]))
    return float(bounds[0]), float(bounds[1])
