"""`probe finetune`: train a backbone and a linear head on images, with the study's recipes.

Resuming is exact because every epoch draws its randomness (batch order, augmentations,
Mixup/CutMix, stochastic depth, DataLoader worker seeds) from a seed derived from (seed, epoch,
rank) alone, so an epoch replayed after a checkpoint draws what the uninterrupted run drew.
"""

from __future__ import annotations

import json
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

from probe.backbones import create_backbone, hf_config
from probe.data.cub import CUB, WATERBIRDS_DIRNAME, waterbirds_fingerprint
from probe.data.loading import guarded_loader
from probe.data.masks import MaskSource
from probe.data.transforms import Preprocess, TrainTransform
from probe.dump import check_masks, default_dataset_name, runtime
from probe.errors import ProbeError
from probe.files import atomic
from probe.finetune import checkpoint
from probe.finetune.data import EvalItems, TrainItems, keep_on_grid
from probe.finetune.evaluate import metrics, predict
from probe.finetune.model import MaskedClassifier
from probe.finetune.recipe import Recipe, make_recipe
from probe.results import find_record, record_id, write_record
from probe.store import safe_name

STRATEGIES = {"none": "baseline", "early": "early", "late": "late"}


def finetune(backbone: str, data_root, *, mask: str = "none", stage: str = "L",
             mask_source: str = "gt", head: str = "auto", recipe: str = "paper",
             select_on_val: bool = False, accum_steps: int | None = None,
             micro_batch: int | None = None, eval_every: int = 0, ckpt_every: int = 5,
             resume: bool = False, force: bool = False, results="results", out="runs",
             dataset: str | None = None, waterbirds_root=None, weights=None,
             random_init: bool = False, image_size: int | None = None,
             model_kwargs: dict | None = None, workers: int = 4, device: str = "auto",
             seed: int = 0, progress: bool = True, **recipe_values) -> dict:
    """Fine-tune ``backbone`` on CUB train with ``mask`` (none|early|late at ``stage``), evaluate
    on CUB test and Waterbirds (original and masked inputs) and return the run record.

    ``recipe_values`` override the recipe (epochs, batch_size, lr, backbone_lr, weight_decay,
    warmup_epochs, min_lr, label_smoothing, mixup, cutmix, rand_augment, random_erasing,
    drop_path, freeze_backbone). An identical finished run is reused (its record returned)
    unless ``force``; an interrupted one continues from its last checkpoint with ``resume``.
    """
    started = time.perf_counter()
    if mask not in STRATEGIES:
        raise ProbeError(f"--mask must be one of {list(STRATEGIES)}, got {mask!r}")
    if stage not in ("L", "L-1") or (stage == "L-1" and mask != "late"):
        raise ProbeError(f"--stage must be L or L-1 (L-1 only with --mask late), got {stage!r}")
    if ckpt_every < 1 or eval_every < 0:
        raise ProbeError(f"--ckpt-every must be >= 1 and --eval-every >= 0, got {ckpt_every} "
                         f"and {eval_every}")
    source = MaskSource.parse(mask_source)
    if mask != "none" and source.kind == "none":
        raise ProbeError(f"--mask {mask} needs a mask source: --mask-source gt or dir:PATH")
    root = Path(data_root).expanduser()
    if waterbirds_root is not None and not Path(waterbirds_root).expanduser().is_dir():
        raise ProbeError(f"Waterbirds folder {waterbirds_root} does not exist")
    wb_root = Path(waterbirds_root or root / WATERBIRDS_DIRNAME).expanduser()
    dataset = dataset or default_dataset_name(root)
    r = make_recipe(recipe, backbone, **recipe_values)
    rt = runtime(device)
    if rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    kwargs = dict(model_kwargs or {})
    if backbone.startswith("hf:") and not hasattr(hf_config(backbone), "drop_path_rate"):
        r = replace(r, drop_path=0.0)  # a transformers model without stochastic depth: record it
    else:  # timm models, and transformers configs that have it, take it at creation
        kwargs.setdefault("drop_path_rate", r.drop_path)
    bb = create_backbone(backbone, weights=weights, random_init=random_init,
                         image_size=image_size, **kwargs)
    head = ("cls+patch" if bb.num_prefix_tokens else "patch") if head == "auto" else head
    late = stage if mask == "late" else None
    train_cub = CUB(root, "train.rest" if select_on_val else "train",
                    masks=source if mask != "none" else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the new head's initialisation
        model = MaskedClassifier(bb, len(train_cub.class_names), head, late)

    config = {
        "dataset": dataset, "backbone": backbone,
        "regime": "frozen" if r.freeze_backbone else "finetuned",
        "strategy": STRATEGIES[mask], "stage": late, "representation": head, "pooling": "mean",
        "mask_source": source.name if source.kind != "none" else None,
        "fg_rule": "seed" if late else None,
        "train_input": "masked" if mask == "early" else "original", "classifier": "linear",
        "recipe": r.label(backbone), "views": 0, "seed": seed,
        "hyper": asdict(r), "select_on_val": select_on_val, "model_id": bb.model_id,
        "weights": bb.weights_id, "image_size": bb.image_size,
        "model_kwargs": dict(model_kwargs or {}),
        "dataset_fingerprint": train_cub.index.fingerprint(),
        # what the run is evaluated on and with which masks: a record is reused only for these
        "waterbirds_fingerprint": waterbirds_fingerprint(wb_root),
        "mask_source_spec": source.spec if source.kind != "none" else None,
    }
    if not force and (previous := find_record(config, results)) is not None:
        previous["reused"] = True
        previous["path"] = str(Path(results) / "runs" / f"{previous['id']}.json")
        return previous
    rid = record_id(config)
    tag = "-".join(filter(None, [STRATEGIES[mask], late, safe_name(head), rid]))
    run_dir = Path(out) / safe_name(dataset) / safe_name(backbone) / tag

    if resume and not run_dir.is_dir():
        _no_run_to_resume(run_dir, config)
    if force and not resume and run_dir.is_dir() and rt.rank == 0:  # start over, keep the old run
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"))
    rt.barrier()
    _require_masks(train_cub)
    eval_sets = _eval_sets(root, source, late, waterbirds_root, bb)
    if select_on_val:
        val = CUB(root, "val", masks=source if source.kind != "none" else None)
        eval_sets = {f"val/{config['train_input']}": EvalItems(
            val, Preprocess(bb.image_size, bb.mean, bb.std), mask == "early", late is not None),
            **eval_sets}
    trainer = Trainer(model, r, rt, run_dir, seed, workers, progress)
    trainer.setup(TrainItems(train_cub, TrainTransform(bb.image_size, bb.mean, bb.std,
                                                       r.rand_augment, r.random_erasing),
                             early=mask == "early", with_mask=late is not None),
                  accum_steps, micro_batch)
    if rt.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    chosen = trainer.fit(eval_sets, eval_every, ckpt_every, resume, select_on_val)

    eval_started = time.perf_counter()
    scores = {}
    predictions = []
    for name, items in eval_sets.items():
        if name.startswith("val/"):
            continue
        ids, pred = trainer.predict(items)  # ids: exactly the split's, in its order
        scores[name] = metrics(items, ids, pred)
        predictions += [(name, *row) for row in zip(ids.tolist(), items.cub.labels.tolist(),
                                                     pred.tolist())]
    record = {"kind": "finetune", "config": config, "chosen": chosen, "metrics": scores,
              "run_dir": str(run_dir),
              "execution": {"world_size": rt.world, "micro_batch": trainer.micro,
                            "accum_steps": trainer.accum, "device": rt.device.type,
                            "amp": "bf16" if rt.device.type == "cuda" else None},
              "timings": {"train_seconds": round(trainer.train_seconds, 3),
                          "eval_seconds": round(time.perf_counter() - eval_started, 3),
                          "total_seconds": round(time.perf_counter() - started, 3)}}
    if rt.rank == 0:
        _write_predictions(run_dir / "predictions.csv", predictions)
        record["path"] = str(write_record(record, results))
    rt.barrier()
    return record


def _no_run_to_resume(run_dir: Path, config: dict) -> None:
    """--resume must continue a run, never silently start another: name what changed."""
    runs = sorted(run_dir.parent.glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise ProbeError(f"--resume: no interrupted run under {run_dir.parent}; drop --resume to start")
    def flat(c: dict) -> dict:  # recipe values are nested under "hyper"
        return {f"{k}.{i}" if isinstance(v, dict) else k: (w if isinstance(v, dict) else v)
                for k, v in c.items() for i, w in (v.items() if isinstance(v, dict) else [(0, v)])}

    latest, wanted = flat(json.loads(runs[-1].read_text())), flat(config)
    changed = sorted(k for k in set(wanted) | set(latest) if latest.get(k) != wanted.get(k))
    raise ProbeError(f"--resume: no run with these options; the latest run here "
                     f"({runs[-1].parent.name}) differs in: {', '.join(changed)}. Use the "
                     "interrupted run's options, or drop --resume to start a new run")


def _require_masks(cub: CUB) -> None:
    if cub.masks.kind != "none":
        check_masks(cub, cub.masks)


def _eval_sets(root: Path, source: MaskSource, late: str | None, waterbirds_root,
               bb) -> dict[str, EvalItems]:
    """CUB test and Waterbirds (when present), each on original and (with masks) masked input."""
    preprocess = Preprocess(bb.image_size, bb.mean, bb.std)
    wb = Path(waterbirds_root or root / WATERBIRDS_DIRNAME).expanduser()
    splits = {"cub": "test"} | ({"waterbirds": "waterbirds"} if wb.is_dir() else {})
    inputs = ("original", "masked") if source.kind != "none" else ("original",)
    sets = {}
    for name, split in splits.items():
        cub = CUB(root, split, masks=source if source.kind != "none" else None,
                  waterbirds_root=waterbirds_root)
        _require_masks(cub)
        for test_input in inputs:
            sets[f"{name}/{test_input}"] = EvalItems(cub, preprocess, test_input == "masked",
                                                     late is not None)
    return sets


def _write_predictions(path: Path, rows: list[tuple]) -> None:
    with atomic(path) as tmp:
        tmp.write_text("eval,image_id,label,pred\n" + "".join(",".join(map(str, row)) + "\n"
                                                             for row in rows))


def _epoch_seed(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Seed every RNG the epoch uses from (seed, epoch, rank); see the module docstring."""
    value = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
    return torch.Generator().manual_seed(value)


class Trainer:
    """The optimisation loop of one run: optimiser, schedule, mixing, checkpoints, log."""

    def __init__(self, model: MaskedClassifier, recipe: Recipe, rt, run_dir: Path, seed: int,
                 workers: int, progress: bool):
        self.model, self.r, self.rt, self.run_dir = model.to(rt.device), recipe, rt, run_dir
        self.seed, self.workers, self.progress = seed, workers, progress and rt.rank == 0
        self.cuda = rt.device.type == "cuda"
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda
                         else nullcontext())
        if self.cuda and model.backbone.channels_last:
            model.to(memory_format=torch.channels_last)
        if recipe.freeze_backbone:
            model.backbone.requires_grad_(False)
        self.train_seconds = 0.0

    def setup(self, items: TrainItems, accum_steps: int | None, micro_batch: int | None) -> None:
        r, world = self.r, self.rt.world
        if micro_batch:
            self.micro, self.accum = micro_batch, r.batch_size // (world * micro_batch)
        else:
            self.accum = accum_steps or 1
            self.micro = r.batch_size // (world * self.accum)
        if self.micro * self.accum * world != r.batch_size or (accum_steps and
                                                               self.accum != accum_steps):
            raise ProbeError(f"batch size {r.batch_size} is not {world} rank(s) x micro-batch "
                             f"{micro_batch or self.micro} x accumulation "
                             f"{accum_steps or self.accum}; choose values whose product is the "
                             "batch size")
        self.mixup = None
        if r.mixup or r.cutmix:
            if self.micro % 2:
                raise ProbeError(f"Mixup/CutMix pair images within a micro-batch, so it must be "
                                 f"even; got {self.micro} (change --micro-batch or --accum-steps)")
            self.mixup = Mixup(mixup_alpha=r.mixup, cutmix_alpha=r.cutmix,
                               label_smoothing=r.label_smoothing,
                               num_classes=self.model.fc.out_features)
        self.criterion = (SoftTargetCrossEntropy() if self.mixup else
                          LabelSmoothingCrossEntropy(r.label_smoothing) if r.label_smoothing
                          else torch.nn.CrossEntropyLoss())
        self.items = items
        per_rank = -(-len(items) // world)  # DistributedSampler pads to equal shares
        self.steps = per_rank // self.micro // self.accum
        if self.steps == 0:
            raise ProbeError(f"{len(items)} training images cannot fill one batch of "
                             f"{r.batch_size}; lower --batch-size")
        groups = []
        if not r.freeze_backbone:
            bb = self.model.backbone.model
            skip = set(getattr(bb, "no_weight_decay", lambda: ())())
            groups += [dict(g, lr=r.backbone_lr, name="backbone") for g in
                       param_groups_weight_decay(bb, r.weight_decay, no_weight_decay_list=skip)]
        groups += [dict(g, lr=r.lr, name="head")
                   for g in param_groups_weight_decay(self.model.fc, r.weight_decay)]
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
        # Per update: linear warm-up from 0, then one cosine over the remaining updates.
        warmup = r.warmup_epochs * self.steps
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=r.epochs * self.steps - warmup,
                                           lr_min=r.min_lr, warmup_t=warmup, warmup_lr_init=0.0,
                                           warmup_prefix=True, t_in_epochs=False)
        self.net = self.model
        if world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.rt.device.index] if self.cuda else None,
                find_unused_parameters=self.model.backbone.kind == "hf")

    def fit(self, eval_sets: dict, eval_every: int, ckpt_every: int, resume: bool,
            select_on_val: bool) -> dict:
        """Train to the recipe's last epoch (from the last checkpoint when resuming)."""
        r, rank = self.r, self.rt.rank
        epoch, step, best = 0, 0, None
        found = checkpoint.latest(self.run_dir)
        if found and not resume:
            raise ProbeError(f"{self.run_dir} holds a run of this configuration ({found.name});"
                             " pass --resume to continue it, or delete the folder to start over")
        if found:
            state = checkpoint.load(found, self.model)
            if state["steps_per_epoch"] != self.steps:
                raise ProbeError(f"{found} was trained with {state['steps_per_epoch']} steps per "
                                 f"epoch, this launch makes {self.steps}; resume with the same "
                                 "number of processes and batch size")
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            epoch, step, best = state["epoch"], state["step"], state["best"]
            self.train_seconds = state["train_seconds"]
            if self.progress:
                tqdm.write(f"resuming {self.run_dir} after epoch {epoch}")
        val_name = next((n for n in eval_sets if n.startswith("val/")), None)
        columns = ["epoch", "step", "lr_backbone", "lr_head", "loss", "train_top1",
                   "images_per_s", "seconds", *eval_sets]
        log = checkpoint.CsvLog(self.run_dir / "log.csv", columns, epoch, enabled=rank == 0)
        while epoch < r.epochs:
            row = self._epoch(epoch, step)
            epoch, step = epoch + 1, step + self.steps
            due = eval_every and epoch % eval_every == 0
            for name, items in eval_sets.items():
                if due or (name == val_name and not eval_every):  # val: every epoch by default
                    row[name] = metrics(items, *self.predict(items))["top1"]
            if val_name in row and (best is None or row[val_name] > best["val_top1"]):
                best = {"epoch": epoch, "val_top1": row[val_name]}
                if rank == 0:
                    checkpoint.save_weights(self.model, self.run_dir / "best.safetensors")
            log.write(row)
            if self.progress:
                tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in row.items()))
            if epoch % ckpt_every == 0 or epoch == r.epochs:
                if rank == 0:
                    checkpoint.save(self.run_dir, epoch, self.model, {
                        "epoch": epoch, "step": step, "steps_per_epoch": self.steps, "best": best,
                        "train_seconds": self.train_seconds,
                        "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()})
                self.rt.barrier()
        if rank == 0:
            checkpoint.save_weights(self.model, self.run_dir / "model.safetensors")
        if select_on_val and best is not None:
            self.rt.barrier()
            checkpoint.load_weights(self.model, self.run_dir / "best.safetensors")
            return best
        return {"epoch": r.epochs}

    def predict(self, items: EvalItems):
        return predict(self.model, items, device=self.rt.device, rank=self.rt.rank,
                       world=self.rt.world, batch_size=max(self.micro, 1), workers=self.workers)

    def _epoch(self, epoch: int, step: int) -> dict:
        rt, model = self.rt, self.model
        gen = _epoch_seed(self.seed, epoch, rt.rank)
        if rt.world > 1:
            sampler = torch.utils.data.DistributedSampler(self.items, rt.world, rt.rank,
                                                          shuffle=True, seed=self.seed)
            sampler.set_epoch(epoch)
        else:
            sampler = torch.utils.data.RandomSampler(self.items, generator=gen)
        batches = guarded_loader(self.items, batch_size=self.micro, sampler=sampler,
                                 drop_last=True, num_workers=self.workers, generator=gen,
                                 pin_memory=self.cuda)
        model.train()
        if self.r.freeze_backbone:
            model.backbone.eval()  # no stochastic depth or dropout in a frozen feature extractor
        totals = torch.zeros(3, dtype=torch.float64, device=rt.device)  # loss sum, correct, n
        bar = tqdm(total=self.steps, desc=f"epoch {epoch + 1}/{self.r.epochs}", unit="step",
                   disable=not self.progress, leave=False)
        tic = time.perf_counter()
        for s in range(self.steps):
            totals += self.train_step(batches, step + s)
            bar.update()
            if self.progress:  # one device sync per step, only when someone is watching
                bar.set_postfix(loss=f"{float(totals[0] / totals[2]):.4f}")
        bar.close()
        batches.close()  # the steps may leave micro-batches unread: stop the workers now
        if rt.world > 1:
            torch.distributed.all_reduce(totals)  # gloo and nccl both reduce float64
        seconds = time.perf_counter() - tic
        self.train_seconds += seconds
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        return {"epoch": epoch + 1, "step": step + self.steps,
                "lr_backbone": lrs.get("backbone", 0.0), "lr_head": lrs["head"],
                "loss": float(totals[0] / totals[2]),
                "train_top1": float(100 * totals[1] / totals[2]),
                "images_per_s": float(totals[2] / seconds), "seconds": round(seconds, 3)}

    def train_step(self, micro_batches, update: int) -> torch.Tensor:
        """One optimisation step, the ``update``-th of the run: the schedule's learning rate,
        then ``accum`` micro-batches taken from ``micro_batches`` (a list, or an iterator left
        at the next unread one), then AdamW. Returns [loss sum, correct, images] over the step,
        on the device."""
        self.scheduler.step_update(update)
        batches, totals = iter(micro_batches), 0
        for a in range(self.accum):
            if (batch := next(batches, None)) is None:  # a step must end in the gradient sync
                self.optimizer.zero_grad(set_to_none=True)
                raise ProbeError(f"a step takes {self.accum} micro-batches, {a} were given")
            totals = totals + self._micro_step(batch, last=a == self.accum - 1)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals

    def _micro_step(self, batch: dict, last: bool) -> torch.Tensor:
        dev, model = self.rt.device, self.model
        x = batch["image"].to(dev, non_blocking=True)
        y = batch["label"].to(dev, non_blocking=True)
        m = batch["mask"].to(dev, non_blocking=True) if model.late else None
        target = y
        if self.mixup is not None:
            if m is None:
                x, target = self.mixup(x, y)
            else:  # mix the mask as a 4th channel: CutMix pastes it, Mixup blends it
                mixed, target = self.mixup(torch.cat([x, m[:, None]], dim=1), y)
                x, m = mixed[:, :3], mixed[:, 3] > 0  # a blended cell is bird if either is
        keep = keep_on_grid(m, model.mask_grid) if model.late else None
        if self.cuda and model.backbone.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        sync = self.net.no_sync() if self.rt.world > 1 and not last else nullcontext()
        with sync:
            with self.autocast:
                logits = self.net(x, keep)
                loss = self.criterion(logits, target)
            (loss / self.accum).backward()
        hard = target.argmax(dim=1) if target.ndim == 2 else target  # Mixup: the larger share
        correct = (logits.argmax(dim=1) == hard).sum()
        return torch.stack([loss.detach().double() * len(x), correct.double(),
                            torch.tensor(float(len(x)), dtype=torch.float64, device=dev)])
