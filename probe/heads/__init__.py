"""Heads fitted on pooled features: scikit-learn style fit / predict / predict_proba / score.

`make_head(name, **params)` builds one by name. Hyper-parameter choice is the same for all:
`head.fit_select(X_train, y_train, X_val, y_val, X_full, y_full)` chooses on val with models
fitted on train, then refits on the whole train split (see `Head.fit_select`).
"""

from __future__ import annotations

from probe.heads.base import Head, HeadError, NotFittedError
from probe.heads.knn import KNNHead
from probe.heads.linear import FROZEN_RECIPES, LinearHead, LinearSweep
from probe.heads.logreg import LogRegHead

HEADS: dict[str, type[Head]] = {"linear": LinearHead, "logreg": LogRegHead, "knn": KNNHead}


def make_head(name: str, **params) -> Head:
    """A new, unfitted head by registry name ("linear", "logreg", "knn")."""
    if name not in HEADS:
        raise HeadError(f"unknown head {name!r}; choose one of {sorted(HEADS)}")
    cls = HEADS[name]
    unknown = set(params) - set(cls._get_param_names())
    if unknown:
        raise HeadError(f"head {name!r} has no parameter(s) {sorted(unknown)}; "
                        f"it takes {cls._get_param_names()}")
    return cls(**params)


__all__ = ["FROZEN_RECIPES", "HEADS", "Head", "HeadError", "KNNHead", "LinearHead",
           "LinearSweep", "LogRegHead", "NotFittedError", "make_head"]
