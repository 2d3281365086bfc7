"""Heads against independent references: scikit-learn, a plain torch loop, brute-force kNN."""

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.exceptions import NotFittedError as SklearnNotFitted
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from probe.errors import ProbeError
from probe.heads import (
    FROZEN_RECIPES,
    HeadError,
    KNNHead,
    LinearHead,
    LinearSweep,
    LogRegHead,
    make_head,
)
from probe.heads.linear import train_linear_heads
from probe.metrics import accuracy, group_accuracies, mean_per_class_accuracy

C, D = 10, 32


def make_split(rng, means, n):
    y = rng.integers(0, C, n)
    return (means[y] + rng.normal(size=(n, D))).astype(np.float32), y


@pytest.fixture(scope="module")
def data():
    """600 train rows (the last 100 as val) and 300 test rows, class-dependent means."""
    rng = np.random.default_rng(0)
    means = rng.normal(size=(C, D)) * 0.6
    X, y = make_split(rng, means, 600)
    X_test, y_test = make_split(rng, means, 300)
    return {"X": X, "y": y, "Xtr": X[:500], "ytr": y[:500], "Xval": X[500:], "yval": y[500:],
            "Xte": X_test, "yte": y_test}


# ---- linear ------------------------------------------------------------------------------

def test_linear_head_close_to_logistic_regression(data):
    head = LinearHead(epochs=30).fit(data["X"], data["y"])
    ref = LogisticRegression(max_iter=2000).fit(data["X"], data["y"])
    assert head.score(data["Xte"], data["yte"]) > 100 * ref.score(data["Xte"], data["yte"]) - 5


def test_linear_head_deterministic_for_a_seed(data):
    a = LinearHead(epochs=3, seed=1).fit(data["X"], data["y"])
    b = LinearHead(epochs=3, seed=1).fit(data["X"], data["y"])
    c = LinearHead(epochs=3, seed=2).fit(data["X"], data["y"])
    np.testing.assert_array_equal(a.weight_, b.weight_)
    np.testing.assert_array_equal(a.predict_proba(data["Xte"]), b.predict_proba(data["Xte"]))
    assert not np.array_equal(a.weight_, c.weight_)


def test_training_loop_is_the_frozen_recipe(data):
    """Same draws, plain torch: AdamW (no decay on the bias), cosine per step, smoothing 0.1."""
    X, y, lr, wd, epochs, bs = data["X"], data["y"], 3e-3, 5e-2, 3, 128
    gen = torch.Generator().manual_seed(7)
    weight = torch.nn.Parameter(torch.randn(D, C, generator=gen) * 0.01)
    bias = torch.nn.Parameter(torch.zeros(C))
    opt = torch.optim.AdamW([{"params": [weight], "weight_decay": wd},
                             {"params": [bias], "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999))
    total, step = epochs * math.ceil(len(X) / bs), 0
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    for _ in range(epochs):
        for idx in torch.randperm(len(X), generator=gen).split(bs):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            opt.zero_grad()
            F.cross_entropy(Xt[idx] @ weight + bias, yt[idx], label_smoothing=0.1).backward()
            opt.step()
            step += 1
    w, b = train_linear_heads(X, y, C, [lr], [wd], epochs=epochs, batch_size=bs,
                              label_smoothing=0.1, seed=7, device="cpu")
    np.testing.assert_allclose(w[0], weight.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(b[0], bias.detach().numpy(), atol=1e-6)


def test_sweep_heads_equal_heads_trained_alone(data):
    recipe = dict(epochs=5, seed=3)
    sweep = LinearSweep(lrs=(1e-4, 1e-3, 1e-2), weight_decays=(0.0, 0.5), **recipe)
    sweep.fit(data["Xtr"], data["ytr"], data["Xval"], data["yval"])
    scores = [row["val_top1"] for row in sweep.val_scores_]
    assert len(scores) == 6 and sweep.best_index_ == int(np.argmax(scores))
    best_row = sweep.val_scores_[sweep.best_index_]
    assert sweep.best_params_ == {"lr": best_row["lr"], "weight_decay": best_row["weight_decay"]}
    for row in sweep.val_scores_:
        alone = LinearHead(lr=row["lr"], weight_decay=row["weight_decay"], **recipe)
        alone.fit(data["Xtr"], data["ytr"])
        assert alone.score(data["Xval"], data["yval"]) == pytest.approx(row["val_top1"], abs=1.0)
    best_alone = LinearHead(**sweep.best_params_, **recipe).fit(data["Xtr"], data["ytr"])
    np.testing.assert_allclose(sweep.best_head_.weight_, best_alone.weight_, atol=1e-5)
    np.testing.assert_array_equal(sweep.best_head_.predict(data["Xte"]),
                                  best_alone.predict(data["Xte"]))

    refit = sweep.refit(data["X"], data["y"])
    again = LinearHead(**sweep.best_params_, **recipe).fit(data["X"], data["y"])
    np.testing.assert_array_equal(refit.weight_, again.weight_)


def test_default_sweep_grid_surrounds_the_study_recipes():
    grid = LinearSweep().grid
    assert len(grid) >= 12
    for recipe in FROZEN_RECIPES.values():
        assert recipe in grid
    assert LinearHead().get_params()["lr"] == FROZEN_RECIPES["vit"]["lr"]


def test_linear_fit_select_chooses_on_val_then_refits_on_full(data):
    recipe = dict(epochs=4, seed=0, lrs=(1e-4, 1e-2), weight_decays=(0.0,))
    head = LinearHead(**recipe).fit_select(data["Xtr"], data["ytr"], data["Xval"], data["yval"],
                                           data["X"], data["y"])
    assert head.chosen_ == {"lr": 1e-2, "weight_decay": 0.0} and head.lr == 1e-2
    ref = LinearHead(**{**recipe, **head.chosen_}).fit(data["X"], data["y"])
    np.testing.assert_array_equal(head.weight_, ref.weight_)


# ---- logistic regression -----------------------------------------------------------------

def test_logreg_selects_C_on_val_and_refits_on_all_of_train(data):
    params = list(inspect.signature(LogRegHead.fit_select).parameters)
    assert params == ["self", "X_train", "y_train", "X_val", "y_val", "X_full", "y_full"]
    head = LogRegHead().fit_select(data["Xtr"], data["ytr"], data["Xval"], data["yval"])
    grid = [row["C"] for row in head.val_scores_]
    assert head.chosen_["C"] in grid and head.C == head.chosen_["C"]
    for row in head.val_scores_:  # each candidate: fitted on train only, scored on val only
        ref = make_pipeline(StandardScaler(), LogisticRegression(C=row["C"], max_iter=1000))
        ref.fit(data["Xtr"], data["ytr"])
        assert row["val_top1"] == 100 * ref.score(data["Xval"], data["yval"])
    assert head.chosen_["C"] == grid[int(np.argmax([row["val_top1"] for row in head.val_scores_]))]
    assert head.model_[0].n_samples_seen_ == 600  # refit on train + val = all of train
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=head.C, max_iter=1000))
    ref.fit(data["X"], data["y"])
    np.testing.assert_allclose(head.predict_proba(data["Xte"]), ref.predict_proba(data["Xte"]),
                               atol=1e-6)


def test_logreg_keeps_original_labels(data):
    y = np.array([3, 7, 9])[data["ytr"] % 3]
    head = LogRegHead(C=0.1).fit(data["Xtr"], y)
    np.testing.assert_array_equal(head.classes_, [3, 7, 9])
    assert set(head.predict(data["Xte"])) <= {3, 7, 9}


# ---- kNN ---------------------------------------------------------------------------------

def brute_force_knn(X_train, y_train, X, k, T, n_classes):
    def normalise(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    sims = normalise(X.astype(np.float64)) @ normalise(X_train.astype(np.float64)).T
    votes = np.zeros((len(X), n_classes))
    for i in range(len(X)):
        for j in np.argsort(-sims[i], kind="stable")[:k]:
            votes[i, y_train[j]] += np.exp(sims[i, j] / T)
    return votes / votes.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("k", [1, 7, 20, 500])
def test_knn_equals_brute_force(k):
    rng = np.random.default_rng(k)
    X_train, y_train = rng.normal(size=(200, 16)).astype(np.float32), rng.integers(0, 5, 200)
    X = rng.normal(size=(80, 16)).astype(np.float32)
    head = KNNHead(k=k).fit(X_train, y_train)
    ref = brute_force_knn(X_train, y_train, X, min(k, 200), 0.07, 5)
    np.testing.assert_array_equal(head.predict(X), ref.argmax(axis=1))
    np.testing.assert_allclose(head.predict_proba(X), ref, atol=1e-4)


def test_knn_zero_vector_and_selection(data):
    head = KNNHead(ks=(1, 5, 1000)).fit_select(data["Xtr"], data["ytr"], data["Xval"], data["yval"])
    assert [row["k"] for row in head.val_scores_] == [1, 5, 500]  # clipped to the train size
    assert head.k == head.chosen_["k"]
    proba = head.predict_proba(np.zeros((1, D), np.float32))  # fgmean without foreground
    assert np.isfinite(proba).all() and proba.sum() == pytest.approx(1.0)


# ---- shared boundary ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["linear", "logreg", "knn"])
def test_boundary_errors(name, data):
    X, y = data["Xtr"], data["ytr"]
    head = make_head(name, **({"epochs": 1} if name == "linear" else {}))
    with pytest.raises(ProbeError, match="not fitted") as info:
        head.predict(X)
    assert isinstance(info.value, SklearnNotFitted)
    with pytest.raises(HeadError, match="500 labels but the features have 499 rows"):
        head.fit(X[:-1], y)
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(HeadError, match="NaN or infinite values in 1 rows.*row 3"):
        head.fit(bad, y)
    with pytest.raises(HeadError, match="integer class labels"):
        head.fit(X, y.astype(float))
    with pytest.raises(HeadError, match="at least 2 classes"):
        head.fit(X, np.zeros(len(X), int))
    head.fit(X, y)
    with pytest.raises(ValueError, match="has 31 features but the head was fitted on 32"):
        head.predict(X[:, :-1])
    pred = head.predict(data["Xval"])
    assert head.score(data["Xval"], data["yval"]) == accuracy(data["yval"], pred)


def test_make_head_registry():
    assert isinstance(make_head("knn", k=3), KNNHead)
    with pytest.raises(HeadError, match="unknown head 'svm'"):
        make_head("svm")
    with pytest.raises(HeadError, match=r"no parameter\(s\) \['C'\]"):
        make_head("linear", C=1.0)


# ---- metrics -----------------------------------------------------------------------------

def test_metrics_equal_hand_computations():
    y = np.array([0, 0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 0, 1, 0, 1, 2])
    assert accuracy(y, pred) == pytest.approx(100 * 5 / 7)
    assert mean_per_class_accuracy(y, pred) == pytest.approx(100 * (3 / 4 + 1 / 2 + 1) / 3)
    groups = {"a": y == 0, "b": y > 0, "empty": np.zeros(7, bool)}
    expected = {"a": 75.0, "b": pytest.approx(200 / 3), "empty": None}
    assert group_accuracies(y, pred, groups) == expected
    with pytest.raises(ProbeError, match="one length"):
        accuracy(y, pred[:-1])
    with pytest.raises(ValueError, match="boolean mask"):
        group_accuracies(y, pred, {"a": np.arange(7)})


def test_linear_progress_bar_only_when_verbose(data, capsys):
    quiet = LinearHead(epochs=2).fit(data["X"], data["y"])
    assert capsys.readouterr().err == ""
    loud = LinearHead(epochs=2, verbose=True).fit(data["X"], data["y"])
    assert "linear head:" in capsys.readouterr().err
    np.testing.assert_array_equal(quiet.weight_, loud.weight_)  # a bar changes nothing else
    LinearSweep(lrs=(1e-3, 1e-2), weight_decays=(0.0,), epochs=2, verbose=True).fit(
        data["Xtr"], data["ytr"], data["Xval"], data["yval"])
    assert "linear heads (2):" in capsys.readouterr().err
