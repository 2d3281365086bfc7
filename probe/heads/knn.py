"""Weighted k-nearest-neighbour vote on L2-normalised features (DINO's kNN evaluation)."""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np

from probe.heads.base import Head

K_GRID = (1, 5, 10, 20, 50)


def l2_normalise(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm; all-zero rows (e.g. fgmean without foreground) stay zero."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return (X / np.maximum(norms, 1e-12)).astype(np.float32)


class KNNHead(Head):
    """Cosine-similarity kNN (faiss IndexFlatIP) with a temperature-weighted vote.

    Each of the k nearest training rows votes for its class with weight exp(sim / T);
    `predict_proba` is the normalised vote. ``k`` is clipped to the training size.
    `fit_select(X_train, y_train, X_val, y_val, X_full, y_full)` picks k from ``ks`` on val
    (smallest k on ties) and refits on X_full (default train + val).
    """

    def __init__(self, k: int = 20, ks: Sequence[int] = K_GRID, temperature: float = 0.07) -> None:
        self.k = k
        self.ks = ks
        self.temperature = temperature

    def _fit(self, X, yi, n_classes) -> None:
        self.index_ = faiss.IndexFlatIP(X.shape[1])
        self.index_.add(l2_normalise(X))
        self.train_labels_, self.n_classes_ = yi, n_classes

    def _proba(self, X) -> np.ndarray:
        k = min(self.k, len(self.train_labels_))
        sims, idx = self.index_.search(l2_normalise(X), k)
        # Shifting by the row maximum leaves the normalised vote unchanged and avoids overflow.
        weights = np.exp((sims - sims[:, :1]).astype(np.float64) / self.temperature)
        votes = np.zeros((len(X), self.n_classes_))
        np.add.at(votes, (np.arange(len(X))[:, None], self.train_labels_[idx]), weights)
        return votes / votes.sum(axis=1, keepdims=True)

    def _candidates(self, n_train: int) -> list[dict]:
        return [{"k": k} for k in sorted({min(int(k), n_train) for k in self.ks})]
