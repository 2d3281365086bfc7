"""What every head shares: boundary validation, label encoding, predict, score, fit_select."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError as _SklearnNotFitted

from probe.errors import ProbeError
from probe.metrics import accuracy


class HeadError(ProbeError, ValueError):
    """Bad input to a head (shape, NaN, length mismatch); a ValueError too."""


class NotFittedError(ProbeError, _SklearnNotFitted):
    """A head was used before `fit`; also scikit-learn's NotFittedError."""


def check_features(X, n_features: int | None = None, what: str = "X") -> np.ndarray:
    """``X`` as a finite float32 [N, D] array (N >= 1), with D == ``n_features`` if given."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] == 0:
        raise HeadError(f"{what} must be a non-empty [N, D] feature array, got shape {X.shape}")
    if n_features is not None and X.shape[1] != n_features:
        raise HeadError(f"{what} has {X.shape[1]} features but the head was fitted on {n_features}")
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise HeadError(
            f"{what} has NaN or infinite values in {int(bad.sum())} rows (first: row "
            f"{int(np.flatnonzero(bad)[0])}); check the pooled features"
        )
    return X


def check_labels(X: np.ndarray, y, what: str = "y") -> np.ndarray:
    """``y`` as a 1-D integer array with one label per row of ``X``."""
    y = np.asarray(y)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        raise HeadError(
            f"{what} must be a 1-D array of integer class labels, got {y.dtype} {y.shape}"
        )
    if len(y) != len(X):
        raise HeadError(f"{what} has {len(y)} labels but the features have {len(X)} rows")
    return y


def encode_labels(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes, y as indices 0..C-1 into classes); a head needs at least two classes."""
    classes, yi = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise HeadError(f"need at least 2 classes to fit a head, got {classes.tolist()}")
    return classes, yi


class Head(BaseEstimator):
    """Base of all heads: subclasses implement `_fit(X, yi)` (yi encoded as 0..C-1),
    `_proba(X)` and `_candidates()` (hyper-parameter dicts tried by `fit_select`)."""

    def fit(self, X, y) -> Head:
        X = check_features(X)
        y = check_labels(X, y)
        classes, yi = encode_labels(y)
        self._fit(X, yi, len(classes))
        self.classes_, self.n_features_in_ = classes, X.shape[1]
        return self

    def predict_proba(self, X) -> np.ndarray:
        """[N, C] class probabilities, columns in the order of ``classes_``."""
        if not hasattr(self, "classes_"):
            raise NotFittedError(f"{type(self).__name__} is not fitted yet: call fit first")
        return self._proba(check_features(X, self.n_features_in_))

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)  # checks fitted first
        return self.classes_[proba.argmax(axis=1)]

    def score(self, X, y) -> float:
        """Top-1 accuracy in percent (0-100, like the study; scikit-learn uses fractions)."""
        X = check_features(X)
        return accuracy(check_labels(X, y), self.predict(X))

    def fit_select(self, X_train, y_train, X_val, y_val, X_full=None, y_full=None) -> Head:
        """Choose hyper-parameters, set them on this head, then refit it.

        Every candidate is fitted on (X_train, y_train) only and scored on (X_val, y_val) only;
        no test split enters. The best (first best in candidate order on ties) is set with
        `set_params` and the head is refitted on (X_full, y_full) — the whole train split; by
        default X_train + X_val. Records ``chosen_`` (dict) and ``val_scores_`` (list of dicts
        with the candidate's parameters and its val top-1 in percent).
        """
        X_train = check_features(X_train, what="X_train")
        y_train = check_labels(X_train, y_train, "y_train")
        X_val = check_features(X_val, X_train.shape[1], what="X_val")
        y_val = check_labels(X_val, y_val, "y_val")
        if (X_full is None) != (y_full is None):
            raise HeadError("pass both X_full and y_full, or neither (then train + val is used)")
        if X_full is None:
            X_full, y_full = np.concatenate([X_train, X_val]), np.concatenate([y_train, y_val])
        table = self._val_scores(X_train, y_train, X_val, y_val)
        best = max(range(len(table)), key=lambda i: (table[i]["val_top1"], -i))
        chosen = {k: v for k, v in table[best].items() if k != "val_top1"}
        self.set_params(**chosen)
        self.fit(X_full, y_full)
        self.chosen_, self.val_scores_ = chosen, table
        return self

    def _val_scores(self, X_train, y_train, X_val, y_val) -> list[dict]:
        """Fit one head per candidate on train, score it on val (overridden when batched)."""
        table = []
        for params in self._candidates(len(X_train)):
            head = type(self)(**{**self.get_params(), **params}).fit(X_train, y_train)
            table.append({**params, "val_top1": head.score(X_val, y_val)})
        return table

    def _fit(self, X: np.ndarray, yi: np.ndarray, n_classes: int) -> None:
        raise NotImplementedError

    def _proba(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _candidates(self, n_train: int) -> list[dict]:
        raise NotImplementedError
