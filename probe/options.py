"""Command-line options shared by several `probe` verbs, declared once so they read the same."""

from pathlib import Path

import click

waterbirds = click.option(
    "--waterbirds", type=click.Path(path_type=Path), default=None,
    help="Waterbirds folder [default: DATA/waterbird_complete95_forest2water2].")
dataset = click.option(
    "--dataset", default=None,
    help="Dataset name in store paths and records [default: cub for CUB_200_2011, else DATA's name].")
weights = click.option(
    "--weights", type=click.Path(path_type=Path), default=None,
    help="Local backbone weights (safetensors or torch checkpoint) instead of the timm tag.")
random_init = click.option("--random-init", is_flag=True,
                           help="Random backbone weights (tests, demos, no network).")
image_size = click.option(
    "--image-size", type=int, default=None,
    help="Input side in pixels [default: the backbone's, 518 for DINOv2, 224 for ConvNeXt].")
device = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                      help="auto = cuda when available (bf16 autocast), else cpu (fp32).")

# value ranges: a bad number is a one-line usage error, not a traceback deep in training
COUNT = click.IntRange(min=1)
NON_NEGATIVE_INT = click.IntRange(min=0)
RATE = click.FloatRange(min=0, min_open=True)
NON_NEGATIVE = click.FloatRange(min=0)
PROBABILITY = click.FloatRange(0, 1)
BELOW_ONE = click.FloatRange(0, 1, max_open=True)

results = click.option("--results", type=click.Path(path_type=Path), default=Path("results"),
                       help="Folder of run records (JSON files under RESULTS/runs/).")
features = click.option("--features", type=click.Path(path_type=Path), default=Path("features"),
                        help="Root folder of feature stores.")
