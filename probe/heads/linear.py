"""Softmax linear head trained with the study's frozen recipe, alone or as a batched (lr, wd) grid.

One training loop serves both: a `LinearHead` is a grid of one. In a grid every head starts
from the same weights and sees the same batches in the same order, so head h of a
`LinearSweep` is the `LinearHead` with that (lr, weight_decay) and seed, up to float rounding
of the batched matmul.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

from probe.heads.base import (
    Head,
    HeadError,
    NotFittedError,
    check_features,
    check_labels,
    encode_labels,
)

# The study's Table 1 (frozen): AdamW betas (0.9, 0.999), batch 128, 90 epochs, cosine decay,
# label smoothing 0.1; lr / weight decay by backbone family.
FROZEN_RECIPES = {
    "vit": {"lr": 1e-3, "weight_decay": 1e-2},
    "convnext": {"lr": 4e-3, "weight_decay": 5e-2},
}
# Sweep grid around the study's values (both families' lr and wd are in it): 4 x 3 = 12 heads.
SWEEP_LRS = (3e-4, 1e-3, 4e-3, 1e-2)
SWEEP_WEIGHT_DECAYS = (0.0, 1e-2, 5e-2)


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def train_linear_heads(
    X: np.ndarray,
    yi: np.ndarray,
    n_classes: int,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    *,
    epochs: int,
    batch_size: int,
    label_smoothing: float,
    seed: int,
    device: str,
    verbose: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Train len(lrs) softmax heads (head h: lrs[h], weight_decays[h]) in one pass over the data.

    Returns weights [H, D, C] and biases [H, C]. AdamW per head (biases without weight decay,
    as timm's optimizer factory does), cosine decay per update with timm's scheduler, no warm-up.
    ``verbose``: a progress bar over the epochs.
    """
    if epochs < 1 or batch_size < 1:
        raise HeadError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)  # CPU generator: same draws on every device
    n, d = X.shape
    h = len(lrs)
    init = torch.randn(d, n_classes, generator=gen) * 0.01
    weight = init.expand(h, d, n_classes).clone().to(dev)
    bias = torch.zeros(h, n_classes, device=dev)
    base_lr = torch.tensor(lrs, dtype=torch.float32, device=dev)
    decay = torch.tensor(weight_decays, dtype=torch.float32, device=dev)
    adam = [_BatchedAdamW(weight, decay), _BatchedAdamW(bias, torch.zeros_like(decay))]
    steps = epochs * math.ceil(n / batch_size)
    # timm's cosine schedule drives a unit-lr optimiser; its lr is the factor for every head
    unit = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = CosineLRScheduler(unit, t_initial=steps, t_in_epochs=False)

    Xd, yd = torch.tensor(X, device=dev), torch.tensor(yi, dtype=torch.int64, device=dev)
    step = 0
    what = f"linear heads ({h})" if h > 1 else "linear head"
    for _ in tqdm(range(epochs), desc=what, unit="epoch", disable=not verbose, leave=False):
        for idx in torch.randperm(n, generator=gen).to(dev).split(batch_size):
            xb, yb = Xd[idx], yd[idx]
            with torch.no_grad():
                logits = torch.baddbmm(bias[:, None], xb.expand(h, -1, -1), weight)  # [H, B, C]
                # Gradient of the label-smoothed cross-entropy, mean over the batch, by hand:
                # softmax minus the smoothed target. Autograd would also keep the graph.
                dlogits = logits.softmax(dim=-1).sub_(label_smoothing / n_classes)
                dlogits[:, torch.arange(len(idx), device=dev), yb] -= 1 - label_smoothing
                dlogits /= len(idx)
                torch.bmm(xb.T.expand(h, -1, -1), dlogits, out=adam[0].grad)
                torch.sum(dlogits, dim=1, out=adam[1].grad)
                lr = base_lr * unit.param_groups[0]["lr"]
                for state in adam:
                    state.step(lr)
            step += 1
            scheduler.step_update(step)
    return weight.detach().cpu().numpy(), bias.detach().cpu().numpy()


class _BatchedAdamW:
    """torch's AdamW update (betas 0.9/0.999, eps 1e-8) with one lr and weight decay per head.

    A few in-place whole-tensor operations per step for all heads: torch's AdamW needs a param
    group per head, and its per-group Python work and kernel launches cost more than the update
    itself (most of all on a GPU, where a sweep step takes well under a millisecond).
    """

    def __init__(self, param: torch.Tensor, weight_decay: torch.Tensor,
                 betas=(0.9, 0.999), eps: float = 1e-8):
        self.param, self.betas, self.eps, self.t = param, betas, eps, 0
        self.shape = (-1,) + (1,) * (param.dim() - 1)  # broadcast [H] over each head's tensor
        self.weight_decay = weight_decay.view(self.shape)
        self.grad = torch.zeros_like(param)  # the caller writes it before each step
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self.denom = torch.empty_like(param)

    def step(self, lr: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.t += 1
        lr = lr.view(self.shape)
        self.param.mul_(1 - lr * self.weight_decay)
        self.exp_avg.lerp_(self.grad, 1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(self.grad, self.grad, value=1 - b2)
        torch.sqrt(self.exp_avg_sq, out=self.denom).div_(math.sqrt(1 - b2 ** self.t))
        # addcdiv_ takes one scalar, so each head's step size goes into the denominator
        self.denom.add_(self.eps).div_(lr / (1 - b1 ** self.t))
        self.param.addcdiv_(self.exp_avg, self.denom, value=-1)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class LinearHead(Head):
    """Softmax linear layer, the study's frozen recipe by default (Table 1, ViT values).

    `fit(X, y)` trains one head with (lr, weight_decay). `fit_select(X_train, y_train, X_val,
    y_val, X_full, y_full)` trains the (lrs x weight_decays) grid on train as one batched model,
    picks (lr, weight_decay) on val accuracy, and refits this head with them on X_full (the whole
    train split; default train + val).
    """

    def __init__(
        self,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        epochs: int = 90,
        batch_size: int = 128,
        label_smoothing: float = 0.1,
        seed: int = 0,
        device: str = "cpu",
        lrs: Sequence[float] = SWEEP_LRS,
        weight_decays: Sequence[float] = SWEEP_WEIGHT_DECAYS,
        verbose: bool = False,
    ) -> None:
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.label_smoothing = label_smoothing
        self.seed = seed
        self.device = device
        self.lrs = lrs
        self.weight_decays = weight_decays
        self.verbose = verbose

    def _recipe(self) -> dict:
        keys = ("epochs", "batch_size", "label_smoothing", "seed", "device", "verbose")
        return {k: getattr(self, k) for k in keys}

    def _fit(self, X, yi, n_classes) -> None:
        weights, biases = train_linear_heads(
            X, yi, n_classes, [self.lr], [self.weight_decay], **self._recipe()
        )
        self.weight_, self.bias_ = weights[0], biases[0]

    def _proba(self, X) -> np.ndarray:
        return _softmax(X @ self.weight_ + self.bias_)

    def _val_scores(self, X_train, y_train, X_val, y_val) -> list[dict]:
        sweep = LinearSweep(self.lrs, self.weight_decays, **self._recipe())
        return sweep.fit(X_train, y_train, X_val, y_val).val_scores_


class LinearSweep:
    """A grid of linear heads, every (lr, weight_decay) of ``lrs x weight_decays``, trained as
    one batched model (like DINOv2's linear evaluation) and chosen on a validation split.

    `fit(X, y, X_val, y_val)`: all heads are trained on (X, y) only; (X_val, y_val) only ranks
    them. Sets ``val_scores_`` (one dict per head: lr, weight_decay, val_top1 in percent),
    ``best_params_`` (first best in grid order on ties) and ``best_head_`` (that head as a
    fitted `LinearHead`, trained on X). `refit(X_full, y_full)` then trains a fresh `LinearHead`
    with ``best_params_`` on the whole train split, as the project's protocol requires.
    """

    def __init__(
        self,
        lrs: Sequence[float] = SWEEP_LRS,
        weight_decays: Sequence[float] = SWEEP_WEIGHT_DECAYS,
        *,
        epochs: int = 90,
        batch_size: int = 128,
        label_smoothing: float = 0.1,
        seed: int = 0,
        device: str = "cpu",
        verbose: bool = False,
    ) -> None:
        if not lrs or not weight_decays:
            raise HeadError("the sweep needs at least one lr and one weight decay")
        self.grid = [{"lr": float(lr), "weight_decay": float(wd)}
                     for lr in lrs for wd in weight_decays]
        self.recipe = {"epochs": epochs, "batch_size": batch_size,
                       "label_smoothing": label_smoothing, "seed": seed, "device": device,
                       "verbose": verbose}

    def fit(self, X, y, X_val, y_val) -> LinearSweep:
        X = check_features(X)
        y = check_labels(X, y)
        X_val = check_features(X_val, X.shape[1], what="X_val")
        y_val = check_labels(X_val, y_val, "y_val")
        classes, yi = encode_labels(y)
        weights, biases = train_linear_heads(
            X, yi, len(classes),
            [g["lr"] for g in self.grid], [g["weight_decay"] for g in self.grid], **self.recipe,
        )
        heads = []
        for params, weight, bias in zip(self.grid, weights, biases, strict=True):
            head = LinearHead(**params, **self.recipe)
            head.weight_, head.bias_ = weight, bias
            head.classes_, head.n_features_in_ = classes, X.shape[1]
            heads.append(head)
        self.val_scores_ = [{**params, "val_top1": head.score(X_val, y_val)}
                            for params, head in zip(self.grid, heads)]
        best = int(np.argmax([row["val_top1"] for row in self.val_scores_]))  # first on ties
        self.best_index_, self.best_params_ = best, dict(self.grid[best])
        self.best_head_ = heads[best]
        return self

    def refit(self, X_full, y_full) -> LinearHead:
        """A new `LinearHead` with ``best_params_`` fitted on (X_full, y_full), the whole train."""
        if not hasattr(self, "best_params_"):
            raise NotFittedError(
                "LinearSweep.refit needs a fitted sweep: call fit(X, y, X_val, y_val) first"
            )
        return LinearHead(**self.best_params_, **self.recipe).fit(X_full, y_full)
