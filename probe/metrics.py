"""Classification metrics, in percent (0-100) like the study's tables."""

from __future__ import annotations

import numpy as np

from probe.errors import ProbeError


class MetricError(ProbeError, ValueError):
    """Labels and predictions that cannot be compared."""


def _pair(y, pred) -> tuple[np.ndarray, np.ndarray]:
    y, pred = np.asarray(y), np.asarray(pred)
    if y.ndim != 1 or y.shape != pred.shape or len(y) == 0:
        raise MetricError(f"labels and predictions must be non-empty 1-D arrays of one length, "
                          f"got shapes {y.shape} and {pred.shape}")
    return y, pred


def accuracy(y, pred) -> float:
    """Top-1 accuracy in percent."""
    y, pred = _pair(y, pred)
    return float(np.mean(y == pred) * 100.0)


def mean_per_class_accuracy(y, pred) -> float:
    """Mean over the classes present in ``y`` of each class's accuracy, in percent."""
    y, pred = _pair(y, pred)
    classes, yi = np.unique(y, return_inverse=True)
    correct = np.bincount(yi, weights=(y == pred), minlength=len(classes))
    return float(np.mean(correct / np.bincount(yi, minlength=len(classes))) * 100.0)


def group_accuracies(y, pred, groups: dict[str, np.ndarray]) -> dict[str, float | None]:
    """Accuracy in percent within each group (a boolean row mask); None for an empty group."""
    y, pred = _pair(y, pred)
    out: dict[str, float | None] = {}
    for name, member in groups.items():
        member = np.asarray(member)
        if member.dtype != bool or member.shape != y.shape:
            raise MetricError(f"group {name!r} must be a boolean mask of shape {y.shape}, "
                              f"got {member.dtype} {member.shape}")
        out[name] = accuracy(y[member], pred[member]) if member.any() else None
    return out


PLACES = ("land", "water")  # Waterbirds' `place` column: 0 land, 1 water
BIRDS = ("landbird", "waterbird")  # its `y` column


def eval_metrics(labels, pred, place=None, waterbird=None) -> dict:
    """One evaluation set's metrics as run records store them (percent): top-1, mean per class,
    n and, on Waterbirds, accuracy by place and by (bird type, place) group with the worst group."""
    out = {"top1": accuracy(labels, pred), "mean_per_class": mean_per_class_accuracy(labels, pred),
           "n": int(len(labels))}
    if place is not None:
        place, bird = np.asarray(place), np.asarray(waterbird)
        out["by_place"] = group_accuracies(labels, pred, {p: place == i for i, p in enumerate(PLACES)})
        out["by_group"] = group_accuracies(labels, pred, {
            f"{b}/{p}": (bird == j) & (place == i)
            for j, b in enumerate(BIRDS) for i, p in enumerate(PLACES)})
        present = [v for v in out["by_group"].values() if v is not None]
        out["worst_group"] = min(present) if present else None
    return out
