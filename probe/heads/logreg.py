"""Multinomial logistic regression (scikit-learn, L-BFGS) on standardised features."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from probe.heads.base import Head

C_GRID = tuple(float(c) for c in np.logspace(-3, 2, 6))  # 1e-3 ... 1e2


class LogRegHead(Head):
    """StandardScaler -> L-BFGS multinomial LogisticRegression with inverse regularisation C.

    `fit(X, y)` uses ``C``. `fit_select(X_train, y_train, X_val, y_val, X_full, y_full)` fits
    one model per C in ``Cs`` on train, picks C on val accuracy (smallest C on ties), and refits
    on X_full (the whole train split; default train + val).
    """

    def __init__(self, C: float = 1.0, Cs: Sequence[float] = C_GRID, max_iter: int = 1000,
                 seed: int = 0) -> None:
        self.C = C
        self.Cs = Cs
        self.max_iter = max_iter
        self.seed = seed

    def _fit(self, X, yi, n_classes) -> None:
        logreg = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed)
        self.model_: Pipeline = make_pipeline(StandardScaler(), logreg).fit(X, yi)

    def _proba(self, X) -> np.ndarray:
        return self.model_.predict_proba(X)  # columns 0..C-1 = classes_, all seen in fit

    def _candidates(self, n_train: int) -> list[dict]:
        return [{"C": float(c)} for c in sorted(self.Cs)]
