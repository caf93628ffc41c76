"""Test metrics the MedMNIST way.

MedMNIST's `Evaluator` (medmnist.evaluator) scores a multi-class task with
  ACC: accuracy of argmax(y_score)                                     (getACC)
  AUC: mean over classes of the one-vs-rest ROC AUC of column i        (getAUC)
`medmnist.Evaluator` itself cannot be used here: it re-reads labels from
`<root>/<flag>.npz` (so it cannot score a user's file or the synthetic stand-in) and
importing medmnist imports torch (medmnist.dataset), which the harness must not do. This
module computes the same two numbers with the same sklearn calls; tests/test_stats.py
checks them against medmnist's own getACC/getAUC.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def accuracy(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels).reshape(-1)
    return float(np.mean(np.argmax(scores, axis=-1) == labels))


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Macro one-vs-rest AUC over ALL score columns, as medmnist's getAUC.

    medmnist raises when a class is absent from `labels` (its one-vs-rest AUC is
    undefined); so does this function, rather than silently averaging fewer classes."""
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, np.float64)
    missing = [i for i in range(scores.shape[1]) if not np.any(labels == i)]
    if missing:
        raise ValueError(f"AUC undefined: class(es) {missing} absent from the labels")
    return float(np.mean([roc_auc_score((labels == i).astype(float), scores[:, i]) for i in range(scores.shape[1])]))


def confusion(labels: np.ndarray, scores: np.ndarray, num_classes: int) -> np.ndarray:
    """(true, predicted) counts."""
    labels = np.asarray(labels).reshape(-1)
    pred = np.argmax(scores, axis=-1)
    m = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(m, (labels, pred), 1)
    return m


def majority_rate(labels: np.ndarray) -> float:
    """Accuracy of always predicting the most frequent class (66.9% on DermaMNIST test)."""
    labels = np.asarray(labels).reshape(-1)
    return float(np.bincount(labels).max() / labels.size)


def evaluate(labels: np.ndarray, scores: np.ndarray, num_classes: int) -> dict:
    return {
        "acc": accuracy(labels, scores),
        "auc": auc(labels, scores),
        "confusion": confusion(labels, scores, num_classes).tolist(),
        "majority_rate": majority_rate(labels),
    }
