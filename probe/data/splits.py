"""The validation hold-out: chosen once, deterministically, the same for every consumer."""

import numpy as np


def stratified_holdout(ids: np.ndarray, labels: np.ndarray, fraction: float = 0.1,
                       seed: int = 0) -> np.ndarray:
    """Bool mask over `ids` selecting a class-stratified `fraction` of each class.

    Depends only on the (id, label) pairs, not on their order, so the feature store and the
    dataset reader agree on which images are validation images.
    """
    ids = np.asarray(ids)
    labels = np.asarray(labels)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    holdout = np.zeros(len(ids), dtype=bool)
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        rows = rows[np.argsort(ids[rows], kind="stable")]
        rng = np.random.default_rng([seed, int(cls)])
        count = int(round(fraction * len(rows)))
        if len(rows) >= 2:
            count = max(1, min(count, len(rows) - 1))  # every class keeps train and val rows
        holdout[rng.permutation(rows)[:count]] = True
    return holdout
