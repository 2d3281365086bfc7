"""Fine-tuning speed of baseline, early and late masking on the same model.

    python benchmarks/finetune_step.py [--backbone vit_s] [--image-size 112] [--batch 16]

Two figures per strategy, each the best of interleaved repeats (the least disturbed one: on
a shared machine a neighbour only ever slows a step down):
- model step: images/s of one optimisation step (Mixup/CutMix, mask to grid, forward,
  backward, AdamW) on a fixed batch; early masking runs the baseline's model, so only late
  masking can cost anything here;
- data: images/s of one loader item (decode, mask, joint augmentation), single process.
Target: masked / baseline >= 0.95 for the model step.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import machine

from probe.backbones import create_backbone
from probe.data.cub import CUB
from probe.data.synth import make_synthetic
from probe.finetune.data import TrainItems, TrainTransform
from probe.finetune.model import MaskedClassifier
from probe.finetune.recipe import make_recipe
from probe.finetune.train import _Trainer
from probe.dump import _runtime

VARIANTS = {"baseline": None, "early": None, "late L": "L", "late L-1": "L-1"}


def trainers(args, items: dict) -> dict:
    recipe = make_recipe("paper", args.backbone, batch_size=args.batch)
    bb = create_backbone(args.backbone, random_init=True, image_size=args.image_size,
                         drop_path_rate=recipe.drop_path)
    out = {}
    for name, late in VARIANTS.items():  # one shared backbone: the same model for every variant
        torch.manual_seed(0)
        model = MaskedClassifier(bb, 200, "cls+patch" if bb.num_prefix_tokens else "patch", late)
        trainer = _Trainer(model, recipe, _runtime("cpu"), Path("unused"), 0, 0, False)
        trainer.setup(items[name], None, None)
        out[name] = trainer
    return out


def step(trainer: _Trainer, batch: dict) -> float:
    trainer.model.train()
    tic = time.perf_counter()
    trainer.scheduler.step_update(100)  # past warm-up: a real learning rate
    trainer._micro_step(dict(batch), last=True)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return len(batch["image"]) / (time.perf_counter() - tic)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_s")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="probe-bench-") as work:
        root = make_synthetic(Path(work) / "birds", classes=4, per_class=2 * args.batch,
                              size=args.image_size, seed=0, progress=False)
        transform = TrainTransform(args.image_size, (0.5,) * 3, (0.5,) * 3, "rand-m9-mstd0.5", 0.25)
        items = {name: TrainItems(CUB(root, "train", masks="gt" if name != "baseline" else None),
                                  transform, early=name == "early", with_mask=late is not None)
                 for name, late in VARIANTS.items()}
        runs = trainers(args, items)
        collate = torch.utils.data.default_collate
        batches = {name: collate([items[name][i] for i in range(args.batch)]) for name in VARIANTS}
        model_speed = {name: [] for name in VARIANTS}
        data_speed = {name: [] for name in VARIANTS}
        for name in VARIANTS:
            step(runs[name], batches[name])  # warm-up: allocator, kernels
        for _ in range(args.repeats):
            for name in VARIANTS:
                model_speed[name].append(step(runs[name], batches[name]))
                tic = time.perf_counter()
                for i in range(args.batch):
                    items[name][i]
                data_speed[name].append(args.batch / (time.perf_counter() - tic))
    print(f"{args.backbone} (random init), {args.image_size} px, batch {args.batch}, "
          f"{args.repeats} repeats, CPU fp32")
    base_model, base_data = max(model_speed["baseline"]), max(data_speed["baseline"])
    print(f"{'strategy':<10} {'model step img/s':>17} {'ratio':>6} {'data img/s':>11} {'ratio':>6}")
    for name in VARIANTS:
        m, d = max(model_speed[name]), max(data_speed[name])
        print(f"{name:<10} {m:>17.2f} {m / base_model:>6.3f} {d:>11.1f} {d / base_data:>6.3f}")


if __name__ == "__main__":
    main()
