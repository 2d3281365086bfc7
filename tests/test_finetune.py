"""Fine-tuning: masking inside the model, exact resume, data-parallel evaluation, records."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import torch
from PIL import Image

import probe.finetune.checkpoint as checkpoint_module
from probe.backbones import create_backbone
from probe.data.cub import CUB
from probe.data.transforms import GEOMETRIC_OPS, Preprocess, TrainTransform
from probe.dump import dump, runtime
from probe.errors import ProbeError
from probe.finetune import finetune
from probe.finetune.data import EvalItems, TrainItems, keep_on_grid
from probe.finetune.model import MaskedClassifier
from probe.finetune.recipe import make_recipe
from probe.finetune.train import Trainer
from probe.report import build_report
from probe.results import load_records
from probe.store import FeatureStore

TINY = dict(random_init=True, image_size=64, workers=0, device="cpu", progress=False,
            epochs=2, batch_size=8, warmup_epochs=1)


def _model(name, late, head="patch"):
    bb = create_backbone(name, random_init=True, image_size=64, drop_path_rate=0.1)
    torch.manual_seed(0)
    return MaskedClassifier(bb, 6, head, late)


def _eval_batch(root, model, split="test"):
    cub = CUB(root, split, masks="gt")
    bb = model.backbone
    items = EvalItems(cub, Preprocess(bb.image_size, bb.mean, bb.std), False, True)
    batch = torch.utils.data.default_collate([items[i] for i in range(len(items))])
    return batch["image"], batch["mask"]


@pytest.mark.parametrize("name, late, tapped", [
    ("test_vit", "L", lambda m: m.norm), ("test_convnext", "L", lambda m: m.norm_pre),
    ("test_vit", "L-1", lambda m: m.blocks[-2]), ("test_convnext", "L-1", lambda m: m.stages[-2])])
def test_late_masking_zeroes_background_gradients(synth_root, name, late, tapped):
    model = _model(name, late, head="cls+patch" if name == "test_vit" else "patch").train()
    x, mask = _eval_batch(synth_root, model)
    keep = keep_on_grid(mask[:8], model.mask_grid)
    assert 0 < keep.mean() < 1
    grabbed = {}

    def grab(module, args, out):  # keeps the map the late mask (or the last stage) consumes
        out.retain_grad()
        grabbed["map"] = out

    hook = tapped(model.backbone.model).register_forward_hook(grab)
    loss = torch.nn.functional.cross_entropy(model(x[:8], keep), torch.arange(8) % 6)
    loss.backward()
    hook.remove()
    grad = grabbed["map"].grad
    if name == "test_vit":  # tokens [B, 1 + h*w, D]: CLS first, never masked
        assert (grad[:, 0].abs().sum(-1) > 0).all()
        cells = grad[:, 1:].reshape(8, *model.mask_grid, -1).abs().sum(-1)
    else:  # [B, D, h, w]
        cells = grad.abs().sum(1)
    assert (cells[keep == 0] == 0).all()  # exactly zero, not merely small
    assert (cells[keep == 1] > 0).all()


@pytest.mark.parametrize("name", ["test_vit", "test_convnext"])
def test_features_equal_the_dumped_taps(synth_root, tmp_path, name):
    path = dump(name, synth_root, splits=["test"], taps=("L", "L-1", "L.from-masked-L-1"),
                out=tmp_path, random_init=True, image_size=64, workers=0, progress=False)
    split = FeatureStore.open(path).split("test")
    model = _model(name, "L-1").eval()  # built with drop path: weights equal the dump's
    x, mask = _eval_batch(synth_root, model)
    keep = keep_on_grid(mask, model.mask_grid)
    h, w = model.mask_grid
    np.testing.assert_array_equal(keep.numpy(), split.read(f"fgseed.gt.{h}x{w}"))
    with torch.no_grad():
        masked, masked_prefix = model.features(x, keep)
        model.late = None
        plain, plain_prefix = model.features(x)
    pairs = [(split.read("L.from-masked-L-1.gt"), masked), (split.read("L"), plain)]
    if name == "test_vit":  # the frozen protocol's CLS at L-1 is the one fine-tuning sees
        pairs += [(split.read("prefix.L.from-masked-L-1.gt"), masked_prefix),
                  (split.read("prefix"), plain_prefix)]
    else:
        assert "prefix.L.from-masked-L-1.gt" not in split.names()
    for stored, ours in pairs:
        np.testing.assert_allclose(stored.astype(np.float32), ours.numpy(),
                                   atol=2e-3 * float(ours.abs().max()))  # float16 storage
    assert not np.allclose(masked.numpy(), plain.numpy(), atol=1e-3)


def test_joint_transform_moves_the_mask_with_the_image(synth_root):
    t = TrainTransform(64, (0.0,) * 3, (1.0,) * 3, "rand-m9-mstd0.5", 0.0)
    ra = t.colour[0]
    ra.ops = [op for op in ra.ops if op.name in GEOMETRIC_OPS]  # colour ops would spoil the check
    for op in ra.ops:
        op.prob = 1.0
    s = CUB(synth_root, "train", masks="gt")[0]
    bird = Image.fromarray(s.mask.astype(np.uint8) * 255)
    moved = 0
    for seed in range(20):
        torch.manual_seed(seed)
        np.random.seed(seed)
        x, m = t(bird.convert("RGB"), bird)
        agree = ((x[0] > 0.5) == (m > 0.5)).float().mean()
        assert agree > 0.97, (seed, agree)  # only the interpolation at the edges differs
        moved += not np.array_equal(m.numpy() > 0, np.asarray(bird.resize((64, 64))) > 0)
    assert moved >= 15


def test_recipes():
    assert make_recipe("paper", "convnext_b").drop_path == 0.2
    assert make_recipe("paper", "vit_b").drop_path == 0.1
    frozen = make_recipe("frozen", "vit_b")
    assert (frozen.lr, frozen.weight_decay, frozen.batch_size, frozen.epochs) == \
        (1e-3, 1e-2, 128, 90)
    assert make_recipe("frozen", "convnext_s").lr == 4e-3
    assert make_recipe("paper", "vit_b").label("vit_b") == "paper"
    assert make_recipe("paper", "vit_b", epochs=30).label("vit_b") == "paper(epochs=30)"
    with pytest.raises(ProbeError, match="unknown recipe value"):
        make_recipe("paper", "vit_b", learning_rate=1.0)


def _weights(record):
    return safetensors.torch.load_file(f"{record['run_dir']}/model.safetensors")


@pytest.fixture(scope="module")
def late_run(synth_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("late")
    record = finetune("test_vit", synth_root, mask="late", ckpt_every=1, out=root / "runs",
                      results=root / "results", **TINY)
    return root, record


def test_resumed_run_reproduces_the_uninterrupted_one(synth_root, tmp_path, monkeypatch, late_run):
    real_save = checkpoint_module.save

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # killed right after the first checkpoint

    kwargs = dict(mask="late", ckpt_every=1, out=tmp_path / "runs", results=tmp_path / "results",
                  **TINY)
    monkeypatch.setattr(checkpoint_module, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune("test_vit", synth_root, **kwargs)
    monkeypatch.setattr(checkpoint_module, "save", real_save)
    with pytest.raises(ProbeError, match="--resume"):
        finetune("test_vit", synth_root, **kwargs)
    record = finetune("test_vit", synth_root, resume=True, **kwargs)

    expected, got = _weights(late_run[1]), _weights(record)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    log = pd.read_csv(f"{record['run_dir']}/log.csv")
    assert log.epoch.tolist() == [1, 2]
    assert record["metrics"] == late_run[1]["metrics"]


def test_record_is_in_the_report(late_run, synth_root):
    root, record = late_run
    assert record["metrics"]["waterbirds/masked"]["n"] == len(CUB(synth_root, "waterbirds"))
    assert set(record["metrics"]["waterbirds/original"]["by_group"]) == {
        "landbird/land", "landbird/water", "waterbird/land", "waterbird/water"}
    rows = load_records(root / "results")
    assert set(rows.regime) == {"finetuned"} and set(rows.kind) == {"finetune"}
    assert set(rows.test_input) == {"original", "masked"} and set(rows.stage) == {"L"}
    result = build_report(root / "results", tables=(4,), out=root / "reports")
    assert record["id"] not in result.summary  # listed there only when no table shows it
    table = pd.read_csv(next(f for f in result.files if f.name.startswith("table4-")
                             and f.suffix == ".csv"))
    ours = table.filter(like="fine-tuned: ours").stack()
    assert len(ours) >= 2  # CUB and Waterbirds of the late-masking row


def test_frozen_recipe_trains_the_head_only(synth_root, tmp_path):
    record = finetune("test_convnext", synth_root, recipe="frozen", out=tmp_path / "runs",
                      results=tmp_path / "results", **{**TINY, "warmup_epochs": 0, "epochs": 1})
    assert record["config"]["regime"] == "frozen" and record["config"]["representation"] == "patch"
    trained = _weights(record)
    initial = create_backbone("test_convnext", random_init=True, image_size=64).model.state_dict()
    for key, value in initial.items():
        assert torch.equal(trained[f"backbone.model.{key}"], value), key
    assert finetune("test_convnext", synth_root, recipe="frozen", out=tmp_path / "runs",
                    results=tmp_path / "results",
                    **{**TINY, "warmup_epochs": 0, "epochs": 1})["reused"]


def test_two_process_run_scores_every_image_once(synth_root, tmp_path):
    args = ["--backbone", "test_vit", "--data", str(synth_root), "--mask", "early",
            "--random-init", "--image-size", "64", "--epochs", "1", "--batch-size", "8",
            "--warmup-epochs", "0", "--workers", "0", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "probe.finetune.commands", *args,
                           "--out", str(tmp_path / "two"), "--results", str(tmp_path / "two")],
                          env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    single = finetune("test_vit", synth_root, mask="early", out=tmp_path / "one",
                      results=tmp_path / "one", **{**TINY, "epochs": 1, "warmup_epochs": 0})
    two = load_records(tmp_path / "two")
    assert len(two) == 4 and two.record_id.nunique() == 1
    assert two.record_id.iloc[0] == single["id"]  # world size is not part of the configuration
    counts = {f"{r.dataset}/{r.test_input}": r.n for r in two.itertuples()}
    assert counts == {k: m["n"] for k, m in single["metrics"].items()}
    ids = CUB(synth_root, "test").ids  # Waterbirds holds the same ids
    assert set(counts.values()) == {len(ids)}
    predictions = pd.read_csv(next((tmp_path / "two").glob("**/predictions.csv")))
    for _, group in predictions.groupby("eval"):
        np.testing.assert_array_equal(np.sort(group.image_id), ids)  # each image exactly once


def test_resume_with_other_options_names_what_changed(synth_root, tmp_path):
    from probe.errors import ProbeError
    from probe.finetune import finetune

    common = dict(random_init=True, image_size=64, workers=0, device="cpu", progress=False,
                  out=tmp_path / "runs", results=tmp_path / "results", batch_size=16,
                  warmup_epochs=0)
    finetune("test_vit", synth_root, epochs=1, **common)
    with pytest.raises(ProbeError, match=r"differs in: .*hyper\.epochs"):
        finetune("test_vit", synth_root, epochs=2, resume=True, **common)


def test_force_trains_anew_and_keeps_the_old_run(synth_root, tmp_path):
    from probe.finetune import finetune

    common = dict(random_init=True, image_size=64, workers=0, device="cpu", progress=False,
                  out=tmp_path / "runs", results=tmp_path / "results", batch_size=16,
                  warmup_epochs=0, epochs=1)
    first = finetune("test_vit", synth_root, **common)
    assert finetune("test_vit", synth_root, **common)["reused"]
    again = finetune("test_vit", synth_root, force=True, **common)
    assert not again.get("reused") and again["run_dir"] == first["run_dir"]
    kept = list(Path(first["run_dir"]).parent.glob("*.replaced-*"))
    assert len(kept) == 1 and (kept[0] / "model.safetensors").is_file()


def test_accumulated_step_equals_one_full_batch_step(synth_root):
    """Two micro-batches of 4 with accumulation update the model exactly as one batch of 8."""
    recipe = make_recipe("paper", "test_vit", batch_size=8, mixup=0.0, cutmix=0.0,
                         drop_path=0.0)
    items = TrainItems(CUB(synth_root, "train"), TrainTransform(64, (0.5,) * 3, (0.5,) * 3, "", 0.0),
                       early=False, with_mask=False)
    batch = torch.utils.data.default_collate([items[i] for i in range(8)])
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    trained, grads = {}, {}
    for accum in (1, 2):
        trainer = Trainer(_model("test_vit", None, head="cls+patch"), recipe, runtime("cpu"),
                          Path("unused"), 0, 0, False)
        trainer.setup(items, accum, None)
        adam_step = trainer.optimizer.step

        def spy(accum=accum, trainer=trainer, adam_step=adam_step):  # the gradient AdamW sees
            grads[accum] = [p.grad.clone() for p in trainer.model.parameters()]
            adam_step()
        trainer.optimizer.step = spy
        totals = trainer.train_step([batch] if accum == 1 else halves, update=5)
        assert totals[2] == 8
        trained[accum] = trainer.model.state_dict()
        if accum == 2:
            with pytest.raises(ProbeError, match="a step takes 2 micro-batches, 1 were given"):
                trainer.train_step(halves[:1], update=6)
    for full, accumulated in zip(grads[1], grads[2], strict=True):
        torch.testing.assert_close(accumulated, full, rtol=1e-4, atol=1e-7)
    for name, value in trained[1].items():
        torch.testing.assert_close(trained[2][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_hf_backbone_fine_tunes_with_the_recipes_stochastic_depth(synth_root, tmp_path):
    """DINOv2 in transformers has stochastic depth: the study's 0.1 is applied and recorded;
    a config without it records 0."""
    import transformers

    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56,
              patch_size=14)
    transformers.Dinov2Model(transformers.Dinov2Config(**kw)).save_pretrained(tmp_path / "dinov2")
    transformers.ViTModel(transformers.ViTConfig(intermediate_size=64, **kw)).save_pretrained(
        tmp_path / "vit")
    run = {**TINY, "image_size": 56, "epochs": 1, "warmup_epochs": 0}
    dinov2 = finetune(f"hf:{tmp_path / 'dinov2'}", synth_root, results=tmp_path / "results",
                      out=tmp_path / "runs", **run)
    assert dinov2["config"]["hyper"]["drop_path"] == 0.1
    vit = finetune(f"hf:{tmp_path / 'vit'}", synth_root, results=tmp_path / "results",
                   out=tmp_path / "runs", **run)
    assert vit["config"]["hyper"]["drop_path"] == 0.0
