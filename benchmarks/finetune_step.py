"""Fine-tuning speed of baseline, early and late masking on the same model.

    python benchmarks/finetune_step.py [--backbone vit_s] [--image-size 112] [--batch 16]
                                       [--device cpu|cuda]

Two figures per strategy, each the best of interleaved repeats (the least disturbed one: on
a shared machine a neighbour only ever slows a step down):
- model step: images/s of one optimisation step (Mixup/CutMix, mask to grid, forward,
  backward, AdamW) on a fixed batch; early masking runs the baseline's model, so only late
  masking can cost anything here;
- data: images/s of one loader item (decode, mask, joint augmentation), single process;
  loader workers run it alongside the model, so it costs nothing while it outpaces the step.
On a shared machine the end-to-end ratios carry a few % of noise, so the ops late masking adds
to a step are also timed alone ("mask ops"), as a share of the baseline step.
Target: masked / baseline >= 0.95 for the model step.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import machine, synchronize

from probe.backbones import create_backbone
from probe.data.cub import CUB
from probe.data.synth import make_synthetic
from probe.data.transforms import TrainTransform
from probe.dump import runtime
from probe.finetune.data import TrainItems, keep_on_grid
from probe.finetune.model import MaskedClassifier
from probe.finetune.recipe import make_recipe
from probe.finetune.train import Trainer

VARIANTS = {"baseline": None, "early": None, "late L": "L", "late L-1": "L-1"}


def trainers(args, items: dict) -> dict:
    recipe = make_recipe("paper", args.backbone, batch_size=args.batch)
    bb = create_backbone(args.backbone, random_init=True, image_size=args.image_size,
                         drop_path_rate=recipe.drop_path)
    out = {}
    for name, late in VARIANTS.items():  # one shared backbone: the same model for every variant
        torch.manual_seed(0)
        model = MaskedClassifier(bb, 200, "cls+patch" if bb.num_prefix_tokens else "patch", late)
        trainer = Trainer(model, recipe, runtime(args.device), Path("unused"), 0, 0, False)
        trainer.setup(items[name], None, None)
        out[name] = trainer
    return out


def step(trainer: Trainer, batch: dict) -> float:
    trainer.model.train()
    tic = time.perf_counter()
    trainer.train_step([dict(batch)], update=100)  # past warm-up: a real learning rate
    synchronize(trainer.rt.device)
    return len(batch["image"]) / (time.perf_counter() - tic)


def mask_ops(trainer: Trainer, batch: dict, runs: int = 50) -> float:
    """Seconds per step of what late masking adds to a step, timed alone (noise-free bound):
    the mask as a 4th Mixup channel, its resize to the grid, and the product with the map."""
    model = trainer.model
    device = next(model.parameters()).device
    x, m = batch["image"].to(device), batch["mask"].to(device)
    fmap = torch.randn(len(x), *model.mask_grid, model.backbone.dim(model.late), device=device)
    times = []
    for _ in range(runs):
        tic = time.perf_counter()
        mixed = torch.cat([x, m[:, None]], dim=1)
        keep = keep_on_grid(mixed[:, 3] > 0, model.mask_grid)
        fmap * keep[..., None]
        synchronize(device)
        times.append(time.perf_counter() - tic)
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_s")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=45,
                        help="Stop repeating after this long (at least 3 repeats).")
    parser.add_argument("--device", default="cpu",
                        help="cpu, or cuda (bf16 autocast and channels-last, like probe finetune)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="probe-bench-") as work:
        root = make_synthetic(Path(work) / "birds", classes=4, per_class=2 * args.batch,
                              size=args.image_size, seed=0, progress=False)
        transform = TrainTransform(args.image_size, (0.5,) * 3, (0.5,) * 3, "rand-m9-mstd0.5",
                                   0.25)
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
        names, start, done = list(VARIANTS), time.perf_counter(), 0
        while done < args.repeats and (done < 3 or time.perf_counter() - start < args.seconds):
            for name in names[done % 4:] + names[:done % 4]:  # rotated: none always runs first
                model_speed[name].append(step(runs[name], batches[name]))
                tic = time.perf_counter()
                for i in range(args.batch):
                    items[name][i]
                data_speed[name].append(args.batch / (time.perf_counter() - tic))
            done += 1
        extra = {name: mask_ops(runs[name], batches[name]) for name in ("late L", "late L-1")}
        precision = "cuda bf16 autocast" if runs["baseline"].cuda else "CPU fp32"
    print(f"{args.backbone} (random init), {args.image_size} px, batch {args.batch}, "
          f"best of {done} repeats, {precision}")
    base_model, base_data = max(model_speed["baseline"]), max(data_speed["baseline"])
    print(f"{'strategy':<10} {'model step img/s':>17} {'ratio':>6} {'data img/s':>11} {'ratio':>6}"
          f" {'mask ops ms':>12} {'of step':>8}")
    for name in VARIANTS:
        m, d = max(model_speed[name]), max(data_speed[name])
        ops = (f" {1e3 * extra[name]:>12.3f} {100 * extra[name] * base_model / args.batch:>7.2f}%"
               if name in extra else "")
        print(f"{name:<10} {m:>17.2f} {m / base_model:>6.3f} {d:>11.1f} {d / base_data:>6.3f}{ops}")


if __name__ == "__main__":
    main()
