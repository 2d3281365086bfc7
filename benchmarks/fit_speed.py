"""Speed of one frozen experiment: heads vs scikit-learn, pooling vs a plain read, and the
cached protocol vs the study's (a backbone forward for every image in every epoch).

    python benchmarks/fit_speed.py [--rows 3000] [--dim 768] [--classes 200]
"""

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import machine, synchronize, timed
from sklearn.linear_model import LogisticRegression

from probe.backbones import create_backbone
from probe.fit import pooled
from probe.heads import LinearHead, LinearSweep
from probe.heads.linear import resolve_device
from probe.pooling import PoolSpec
from probe.store import ArraySpec, FeatureStore


def pooled_features(rows, dim, classes, rng):
    """Train and test draws shaped like backbone features: class means plus noise, seen
    through a power-law spectrum (real embeddings are far from isotropic, which is what
    makes L-BFGS need many iterations on them)."""
    means = rng.normal(size=(classes, dim)).astype(np.float32) * 0.25
    y = np.arange(rows) % classes
    spectrum = (np.arange(1, dim + 1) ** -0.5).astype(np.float32) * 4
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0].astype(np.float32)
    draw = lambda: ((means[y] + rng.normal(size=(rows, dim))) * spectrum @ basis).astype(np.float32)  # noqa: E731
    return draw(), y, draw(), y


def heads(args, rng, out: dict):
    X, y, Xt, yt = pooled_features(args.rows, args.dim, args.classes, rng)
    val = rng.random(len(y)) < 0.1
    if resolve_device(args.device).type == "cuda":  # CUDA context and kernels load on first use
        LinearHead(epochs=1, device=args.device).fit(X[:256], y[:256])
    with timed(out, "paper"):
        paper = LinearHead(lr=1e-3, weight_decay=1e-2, device=args.device).fit(X, y)
    with timed(out, "sweep"):
        sweep = LinearSweep(device=args.device).fit(X[~val], y[~val], X[val], y[val])
    with timed(out, "sklearn"):
        sk = LogisticRegression(max_iter=1000).fit(X, y)
    print(f"features: {args.rows} train rows x {args.dim} dims, {args.classes} classes "
          f"(and as many test rows)")
    print(f"linear head, paper recipe (90 epochs): {out['paper']:7.2f} s, "
          f"test top-1 {paper.score(Xt, yt):.1f}%")
    print(f"linear sweep, {len(sweep.grid)} heads in one pass: {out['sweep']:7.2f} s, "
          f"test top-1 of the val-chosen head {sweep.best_head_.score(Xt, yt):.1f}%")
    print(f"scikit-learn LogisticRegression (lbfgs): {out['sklearn']:7.2f} s, "
          f"test top-1 {100 * sk.score(Xt, yt):.1f}%")
    print(f"ratio sweep / one scikit-learn fit: {out['sweep'] / out['sklearn']:.2f} (target <= 1)")
    sweep_floor(args, len(sweep.grid), int((~val).sum()), out)


def sweep_floor(args, n_heads, rows, out: dict):
    """The sweep's unavoidable arithmetic on this machine: per step, the forward matmul of all
    heads and the weight-gradient matmul, timed alone on the same shapes."""
    device = resolve_device(args.device)
    batch, steps = 128, 90 * -(-rows // 128)
    x = torch.randn(batch, args.dim, device=device)
    weight = torch.randn(n_heads, args.dim, args.classes, device=device)
    grad = torch.randn(n_heads, batch, args.classes, device=device)
    step = lambda: (x @ weight, x.T @ grad)  # noqa: E731
    for _ in range(3):
        step()
    synchronize(device)
    repeats = 20
    with timed(out, "matmuls"):
        for _ in range(repeats):
            step()
        synchronize(device)
    floor = out["matmuls"] / repeats * steps
    flops = 2 * 2 * batch * args.dim * args.classes * n_heads * steps
    print(f"sweep floor: {steps} steps x 2 matmuls = {flops / 1e12:.2f} TFLOP at "
          f"{flops / floor / 1e9:.0f} GFLOP/s measured here = {floor:.2f} s; "
          f"floor / one scikit-learn fit: {floor / out['sklearn']:.2f}")


def pooling(args, work: Path, rng, out: dict):
    """Late-masked cls+patch pooling of a ViT-B-like L map against reading the same bytes."""
    n, h, d = args.store_rows, 16, args.dim
    store = FeatureStore.create(work / "store.zarr", {"backbone": "bench"})
    index = {"ids": np.arange(n), "labels": np.zeros(n, np.int64)}
    split = store.create_split("train", n, h * h * d * 2, index)
    arrays = {"L": (h, h, d), "prefix": (1, d), "fgseed.gt.16x16": (h, h)}
    for name, tail in arrays.items():
        array = split.require(name, ArraySpec(tail, "float16"))
        for lo in range(0, n, split.chunk_rows):
            hi = min(lo + split.chunk_rows, n)
            values = rng.random((hi - lo, *tail), dtype=np.float32)
            array[lo:hi] = (values > 0.5) if name.startswith("fg") else values
    split.finish(list(arrays))
    with timed(out, "read"):
        for chunk in range(split.n_chunks):
            lo, hi = split.chunk_range(chunk)
            for name in arrays:
                split[name][lo:hi]
    spec = PoolSpec("L", "cls+patch", "late", "gt", "seed")
    with timed(out, "pool"):
        pooled(store, split, spec)
    with timed(out, "cached"):
        pooled(store, split, spec)
    gb = n * (h * h * d + d + h * h) * 2 / 1e9
    print(f"store: {n} rows of a {h}x{h}x{d} float16 map ({gb:.2f} GB)")
    print(f"plain chunked read: {gb / out['read']:6.2f} GB/s; pooling (late, cls+patch): "
          f"{gb / out['pool']:6.2f} GB/s; ratio {out['read'] / out['pool']:.2f} (target >= 0.5); "
          f"cached second pooling: {out['cached'] * 1e3:.1f} ms")


def versus_study(args, out: dict):
    """The study recomputes the backbone for every image in each of its 90 epochs; the forward
    runs where the heads train, in bf16 autocast on a GPU like the dumper."""
    device = resolve_device(args.device)
    model = create_backbone(args.backbone, random_init=True, image_size=args.image_size).to(device)
    x = torch.randn(16 if device.type == "cpu" else 128, 3, args.image_size, args.image_size,
                    device=device)
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
        model.forward_taps(x)
        synchronize(device)
        with timed(out, "forward"):
            model.forward_taps(x)
            synchronize(device)
    per_image = out["forward"] / len(x)
    study = 90 * args.rows * per_image
    ours = out["pool"] * args.rows / args.store_rows + out["paper"]
    print(f"{args.backbone} forward on {device.type}: {per_image * 1e3:.2f} ms/image "
          f"({args.image_size} px, random init, batch {len(x)})")
    print(f"one frozen experiment on {args.rows} train images: study's way (90 epochs of forward "
          f"passes, head excluded) ~{study:,.0f} s; from the store (pool + paper-recipe head) "
          f"{ours:.1f} s; ratio {study / ours:,.0f}x (the store's one forward pass per image, "
          f"{args.rows * per_image:.0f} s, is paid once for every experiment)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--store-rows", type=int, default=600)
    parser.add_argument("--backbone", default="vit_s")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cpu", help="where the linear heads train (cpu, cuda)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="probe-bench-"))
    out = {}
    try:
        heads(args, rng, out)
        pooling(args, work, rng, out)
        versus_study(args, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
