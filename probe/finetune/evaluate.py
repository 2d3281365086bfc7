"""Evaluation over all ranks: each rank predicts a disjoint stride of the set, then every rank
gathers all predictions, so every image is scored exactly once whatever the world size."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

from probe.data.loading import guarded_loader
from probe.errors import ProbeError
from probe.finetune.data import EvalItems, keep_on_grid
from probe.finetune.model import MaskedClassifier
from probe.metrics import eval_metrics


@torch.inference_mode()
def predict(model: MaskedClassifier, items: EvalItems, *, device: torch.device, rank: int = 0,
            world: int = 1, batch_size: int = 64,
            workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image ids, predicted classes) of every image of ``items``, in ascending id order."""
    rows = list(range(rank, len(items), world))  # disjoint strides: no padding, no duplicates
    loader = guarded_loader(torch.utils.data.Subset(items, rows), batch_size=batch_size,
                            num_workers=workers, pin_memory=device.type == "cuda")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else nullcontext())
    was_training = model.training
    model.eval()
    ids, preds = [], []
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        keep = None
        if model.late:
            keep = keep_on_grid(batch["mask"].to(device), model.mask_grid)
        with autocast:
            preds.append(model(x, keep).argmax(dim=1).cpu())
        ids.append(batch["id"])
    model.train(was_training)
    local = (torch.cat(ids).numpy() if ids else np.zeros(0, np.int64),
             torch.cat(preds).numpy() if preds else np.zeros(0, np.int64))
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, local)
    else:
        parts = [local]
    all_ids = np.concatenate([p[0] for p in parts])
    all_preds = np.concatenate([p[1] for p in parts])
    order = np.argsort(all_ids, kind="stable")
    all_ids, all_preds = all_ids[order], all_preds[order]
    if not np.array_equal(all_ids, items.cub.ids):
        raise ProbeError(f"evaluation of split {items.cub.split!r} gathered {len(all_ids)} "
                         f"predictions for {len(items)} images; ranks disagree on the dataset")
    return all_ids, all_preds


def metrics(items: EvalItems, ids: np.ndarray, pred: np.ndarray) -> dict:
    """The run record's metrics of one eval set (same keys as `probe fit`), in percent."""
    cub = items.cub
    rows = np.searchsorted(cub.ids, ids)  # a split's rows follow ascending image id
    labels = cub.labels[rows]
    if cub.place is None:
        return eval_metrics(labels, pred)
    return eval_metrics(labels, pred, cub.place[rows], cub.waterbird[rows])
