"""`probe run` and `probe demo`: execute the study's experiment grid, skipping finished work.

`run` takes the plan of `probe.experiments` (dumps, frozen fits, fine-tunes), runs what is
missing in that order and says what it reused; being a sequence of resumable steps, an
interrupted run resumes by running it again. `demo` is the embedded default: a synthetic set and
two tiny random-init backbones, no network, no weights, the frozen cells of Tables 3-6.
"""

import time
from pathlib import Path

from tqdm import tqdm

from probe.dump import dump
from probe.errors import ProbeError
from probe.experiments import TABLES, plan
from probe.fit import fit
from probe.report import build_report

DEMO_BACKBONES = ("test_vit", "test_convnext")  # one ViT with a CLS token, one ConvNeXt


def run(tables=TABLES, backbones=None, *, data_root, features="features", results="results",
        frozen_only=False, mask_source="gt", random_init=False, weights=None, image_size=None,
        batch_size=64, workers=2, waterbirds_root=None, dataset=None, device="auto",
        progress=True) -> dict:
    """Run every missing dump, fit and fine-tune that `tables` need; returns counts of each."""
    dumps, fits, finetunes = plan(tables, backbones, frozen_only, mask_source=mask_source)
    if weights is not None and len({d["backbone"] for d in dumps + fits + finetunes}) > 1:
        raise ProbeError("--weights is one backbone's file: pass a single --backbones entry")
    if finetunes:
        from probe.finetune import finetune
    counts = {"dumps": len(dumps), "fits": len(fits), "finetunes": len(finetunes),
              "new_fits": 0, "new_finetunes": 0}
    steps = [("dump", d) for d in dumps] + [("fit", f) for f in fits] + [("finetune", f) for f in finetunes]
    bar = tqdm(steps, desc="probe run", unit="step", disable=not progress)
    for kind, spec in bar:
        bar.set_postfix_str(f"{kind} {spec['backbone']} " + " ".join(
            f"{k}={v}" for k, v in spec.items() if k not in ("backbone", "masks", "mask_source")))
        if kind == "dump":
            dump(spec["backbone"], data_root, input=spec["input"], masks=spec["masks"],
                 taps=spec["taps"], out=features, random_init=random_init, weights=weights,
                 image_size=image_size, batch_size=batch_size, workers=workers, device=device,
                 waterbirds_root=waterbirds_root, dataset=dataset, progress=False)
        elif kind == "fit":
            record = fit(**spec, features=features, data_root=data_root, dataset=dataset,
                         results=results, device=device, progress=False)  # its own bar above
            counts["new_fits"] += not record.get("reused")
        else:
            record = finetune(**spec, data_root=data_root, results=results, device=device,
                              random_init=random_init, weights=weights, image_size=image_size,
                              waterbirds_root=waterbirds_root, dataset=dataset)
            counts["new_finetunes"] += not record.get("reused")
    return counts


def demo(out="probe-demo", *, classes=20, per_class=24, size=128, seed=0, progress=True) -> dict:
    """Synthetic data -> two tiny random-init backbones -> frozen Tables 3-6 -> report."""
    from probe.data.synth import make_synthetic

    out = Path(out)
    started = time.perf_counter()
    data_root = out / "birds"
    if not (data_root / "images.txt").is_file():
        make_synthetic(data_root, classes=classes, per_class=per_class, size=size, seed=seed,
                       progress=progress)
    counts = run(TABLES, DEMO_BACKBONES, data_root=data_root, features=out / "features",
                 results=out / "results", frozen_only=True, random_init=True, image_size=size,
                 workers=0, device="cpu", progress=progress)
    report = build_report(out / "results", TABLES, out / "reports")
    return {"counts": counts, "report": report, "seconds": time.perf_counter() - started,
            "data_root": data_root}
