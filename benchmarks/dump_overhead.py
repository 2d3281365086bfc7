"""Dumper throughput against a bare decode + transform + forward loop on the same images.

    python benchmarks/dump_overhead.py [--backbone vit_s] [--image-size 224] [--classes 20]

The dumper adds mask decoding, foreground maps, float16 conversion, Zarr compression and
writing; all of it should hide behind the forward pass (target: ratio >= 0.9).
"""

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from common import machine, timed

from probe.backbones import create_backbone
from probe.data.cub import CUB
from probe.data.images import load_rgb
from probe.data.synth import make_synthetic
from probe.data.transforms import Preprocess
from probe.dump import dump


class Images(torch.utils.data.Dataset):
    def __init__(self, cub: CUB, preprocess: Preprocess):
        self.cub, self.preprocess = cub, preprocess

    def __len__(self):
        return len(self.cub)

    def __getitem__(self, i):
        return self.preprocess.image(load_rgb(self.cub.image_path(i)))


def bare_loop(root, model, batch_size, workers, device) -> int:
    """What any feature extraction must do at least: decode, transform, forward."""
    n = 0
    for split in ("train", "test", "waterbirds"):
        images = Images(CUB(root, split), Preprocess(model.image_size, model.mean, model.std))
        loader = torch.utils.data.DataLoader(images, batch_size=batch_size, num_workers=workers,
                                             pin_memory=device.type == "cuda")
        autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
        with torch.inference_mode(), autocast:
            for x in loader:
                x = x.to(device, non_blocking=True)
                model.forward_taps(x, taps=("L", *(["prefix"] if model.num_prefix_tokens else [])))
                n += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return n


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_s")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast, like the dumper)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="probe-bench-"))
    try:
        root = make_synthetic(work / "birds", classes=args.classes, per_class=args.per_class,
                              size=128, progress=False)
        device = torch.device(args.device)
        model = create_backbone(args.backbone, random_init=True, image_size=args.image_size).to(device)
        times = {}
        bare_loop(root, model, args.batch_size, args.workers, device)  # warm-up: caches, allocator
        with timed(times, "bare"):
            n = bare_loop(root, model, args.batch_size, args.workers, device)
        with timed(times, "dump"):
            dump(args.backbone, root, out=work / "features", random_init=True,
                 image_size=args.image_size, batch_size=args.batch_size, workers=args.workers,
                 device=args.device, progress=False)
        bare, dumper = n / times["bare"], n / times["dump"]
        print(f"machine: {machine()}")
        print(f"model: {args.backbone} (random init), {args.image_size} px, grid "
              f"{model.grid('L')}, dim {model.dim('L')}; {n} images, batch {args.batch_size}, "
              f"{args.workers} decode worker(s)")
        print(f"bare decode+transform+forward: {bare:8.1f} img/s ({times['bare']:.1f} s)")
        print(f"probe dump (L + prefix + fg maps, Zarr): {dumper:8.1f} img/s ({times['dump']:.1f} s)")
        print(f"ratio dump / bare: {dumper / bare:.2f} (target >= 0.9)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
