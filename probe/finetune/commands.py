"""`probe finetune`: the click command over `probe.finetune.finetune`.

Also runnable as a module, e.g. under torchrun:
`torchrun --standalone --nproc_per_node 4 -m probe.finetune.commands --backbone vit_b ...`.
"""

import sys
from pathlib import Path

import click

from probe import options
from probe.errors import ProbeError

_RECIPE_OPTIONS = [  # (option, type, help); not given = the recipe's value
    ("--epochs", options.COUNT, "Training epochs [paper: 300, frozen: 90]."),
    ("--batch-size", options.COUNT, "Images per optimiser step over all GPUs [paper: 64, frozen: 128]."),
    ("--lr", options.RATE, "Learning rate of the new linear head [paper: 4e-3; frozen: 1e-3 ViT, "
                    "4e-3 ConvNeXt]."),
    ("--backbone-lr", options.NON_NEGATIVE, "Learning rate of the pretrained backbone [paper: 4e-6]."),
    ("--weight-decay", options.NON_NEGATIVE, "AdamW weight decay, never on norms, biases, position "
                              "embeddings and CLS/register tokens [paper: 5e-2; frozen: 1e-2 "
                              "ViT, 5e-2 ConvNeXt]."),
    ("--warmup-epochs", options.NON_NEGATIVE_INT,
     "Linear warm-up epochs, then cosine decay [paper: 20, frozen: 0]."),
    ("--min-lr", options.NON_NEGATIVE, "Learning rate at the end of the cosine decay [0]."),
    ("--label-smoothing", options.BELOW_ONE, "Label smoothing [0.1]."),
    ("--mixup", options.NON_NEGATIVE, "Mixup alpha, 0 = off [paper: 0.8, frozen: 0]."),
    ("--cutmix", options.NON_NEGATIVE, "CutMix alpha, 0 = off [paper: 1.0, frozen: 0]."),
    ("--rand-augment", str, "timm RandAugment config, '' = off [rand-m9-mstd0.5]."),
    ("--random-erasing", options.PROBABILITY, "Random erasing probability [0.25]."),
    ("--drop-path", options.BELOW_ONE, "Stochastic depth [paper: 0.1 ViT, 0.1/0.2/0.3 ConvNeXt S/B/L; "
                           "frozen: 0]."),
]


def _recipe_options(command):
    for name, kind, text in reversed(_RECIPE_OPTIONS):
        command = click.option(name, type=kind, default=None, show_default=False,
                               help=text)(command)
    return command


@click.command("finetune")
@click.option("--backbone", required=True, help="Registry short name (vit_b, convnext_b, ...), "
              "any timm model name, or hf:<hub id or folder>.")
@click.option("--data", "data_root", type=click.Path(path_type=Path), required=True,
              help="CUB-200-2011 root folder (real or from `probe data synth`).")
@click.option("--mask", type=click.Choice(["none", "early", "late"]), default="none",
              help="none = baseline; early = background pixels blacked out before the model; "
                   "late = background cells of a feature map zeroed inside the model.")
@click.option("--stage", type=click.Choice(["L", "L-1"]), default="L",
              help="Late masking after the last stage (L, before the head) or after the "
                   "second-to-last (L-1; the last stage then runs on the masked map).")
@click.option("--mask-source", default="gt",
              help="gt (CUB segmentations), dir:PATH (predicted PNG masks) or none (baseline "
                   "only: no masked-input evaluation).")
@click.option("--head", type=click.Choice(["auto", "cls", "patch", "cls+patch"]), default="auto",
              help="Head input: CLS token, mean of the patch tokens (GAP), or both. auto = "
                   "cls+patch with a CLS token (the study's ViT default), else patch.")
@click.option("--recipe", type=click.Choice(["paper", "frozen"]), default="paper",
              help="paper = the study's fine-tune recipe (Table 2); frozen = only the head trains, "
                   "with the frozen recipe and on-line augmentation (Table 1).")
@_recipe_options
@click.option("--micro-batch", type=options.COUNT, default=None,
              help="Images per forward pass and GPU; gradients accumulate to reach --batch-size.")
@click.option("--accum-steps", type=options.COUNT, default=None,
              help="Gradient accumulation steps (alternative to --micro-batch) [1].")
@click.option("--select-on-val", is_flag=True,
              help="Train on train minus a 10% validation split and report the epoch best on it "
                   "(default: all of train, last epoch). Test splits never choose anything.")
@click.option("--eval-every", default=0,
              help="Also evaluate (and log) every N epochs; 0 = at the end only.")
@click.option("--ckpt-every", default=5, help="Checkpoint every N epochs (and at the end).")
@click.option("--resume", is_flag=True, help="Continue the interrupted run of this configuration.")
@click.option("--force", is_flag=True,
              help="Train anew even if a record or a run folder of this configuration exists "
                   "(the old folder is kept, renamed *.replaced-<time>).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs"),
              help="Root of run folders (checkpoints, log.csv, predictions.csv, weights).")
@options.results
@options.dataset
@options.waterbirds
@options.weights
@options.random_init
@options.image_size
@click.option("--workers", default=4, type=options.NON_NEGATIVE_INT,
              help="DataLoader worker processes per GPU.")
@options.device
@click.option("--seed", default=0, help="Seed of the head's initialisation and of every epoch's "
                                        "randomness.")
def finetune(backbone, data_root, mask, stage, mask_source, head, recipe, micro_batch,
             accum_steps, select_on_val, eval_every, ckpt_every, resume, force, out, results,
             dataset, waterbirds, weights, random_init, image_size, workers, device, seed,
             **recipe_values):
    """Fine-tune a backbone with early or late masking and record its accuracy.

    Evaluates on CUB test and Waterbirds (original and masked inputs) and writes a run record
    that `probe report` shows in the fine-tuned columns. Interrupted? Run the same command with
    --resume. Several GPUs: `torchrun --standalone --nproc_per_node N -m probe finetune ...`.
    """
    from probe.finetune.train import finetune as api

    record = api(backbone, data_root, mask=mask, stage=stage, mask_source=mask_source, head=head,
                 recipe=recipe, select_on_val=select_on_val, accum_steps=accum_steps,
                 micro_batch=micro_batch, eval_every=eval_every, ckpt_every=ckpt_every,
                 resume=resume, force=force, results=results, out=out, dataset=dataset,
                 waterbirds_root=waterbirds, weights=weights, random_init=random_init,
                 image_size=image_size, workers=workers, device=device, seed=seed,
                 **recipe_values)
    if "path" in record:  # rank 0 only
        state = "reused existing record" if record.get("reused") else "run record"
        click.echo(f"{state}: {record['path']}")
        for name, m in record["metrics"].items():
            worst = m.get("worst_group")
            click.echo(f"  {name:<20} top-1 {m['top1']:6.2f}  mean/class {m['mean_per_class']:6.2f}"
                       + (f"  worst group {worst:6.2f}" if worst is not None else "")
                       + f"  n={m['n']}")


if __name__ == "__main__":
    try:
        finetune()
    except ProbeError as err:
        click.secho(f"error: {err}", fg="red", err=True)
        sys.exit(2)
