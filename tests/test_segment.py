import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import probe.segment.train as train_module
from probe.backbones import create_backbone
from probe.cli import ProbeGroup
from probe.data import CUB
from probe.errors import ConfigMismatchError, ProbeError
from probe.finetune import checkpoint
from probe.segment.commands import segment
from probe.segment.evaluate import evaluate
from probe.segment.models import build, load
from probe.segment.predict import assemble, predict, tile_boxes
from probe.segment.train import train
from probe.segment.unsupervised import (
    _cls_attention_scorer,
    centre_oriented,
    first_component,
    unsupervised,
)

LIGHT = dict(model="light", backbone="test_vit", random_init=True, image_size=64, batch_size=8,
             workers=0, progress=False)
SPLITS = ("train", "test", "waterbirds")
# Mask2Former with every dimension shrunk (GroupNorm needs multiples of 32 channels)
TINY_M2F = dict(backbone=dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                              window_size=4, drop_path_rate=0.0),
                feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
                encoder_layers=1, decoder_layers=2, num_attention_heads=1, dim_feedforward=32,
                num_queries=4, train_num_points=256)


def cli(args: list[str]):
    """The segment commands under the same error handling as the `probe` command."""
    return CliRunner().invoke(ProbeGroup(commands=[segment]), ["segment", *map(str, args)])


def gt_masks(root, split) -> list[np.ndarray]:
    cub = CUB(root, split, masks="gt")
    return [cub[i].mask for i in range(len(cub))]


def numpy_ious(preds, gts) -> dict:
    """Reference IoUs (%), written from the definitions with | and & rather than confusions."""
    fg_i = sum((p & g).sum() for p, g in zip(preds, gts))
    fg_u = sum((p | g).sum() for p, g in zip(preds, gts))
    bg_i = sum((~p & ~g).sum() for p, g in zip(preds, gts))
    bg_u = sum((~p | ~g).sum() for p, g in zip(preds, gts))
    per = [((p & g).sum() / (p | g).sum(), (~p & ~g).sum() / (~p | ~g).sum())
           for p, g in zip(preds, gts)]
    return {"n": len(preds), "fg_iou": 100 * fg_i / fg_u, "bg_iou": 100 * bg_i / bg_u,
            "miou": 50 * (fg_i / fg_u + bg_i / bg_u),
            "miou_per_image": 100 * np.mean([(f + b) / 2 for f, b in per]),
            "fg_iou_per_image": 100 * np.mean([f for f, _ in per])}


@pytest.fixture(scope="module")
def light(synth_root, tmp_path_factory):
    """A light segmenter trained briefly, and its masks for all three splits."""
    tmp = tmp_path_factory.mktemp("light")
    model = train(synth_root, out=tmp / "model", epochs=12, lr=3e-3, **LIGHT)
    return model, predict(synth_root, model, tmp / "masks" / "light", workers=0, progress=False)


def test_light_training_lowers_the_loss_and_learns_the_bird(light, synth_root):
    model, masks = light
    info = json.loads((model / "segmenter.json").read_text())
    losses = info["loss_per_epoch"]
    assert len(losses) == 12 and losses[-1] < 0.75 * losses[0]
    assert sorted(p.name for p in model.iterdir()) == ["segmenter.json", "segmenter.safetensors"]
    gts = gt_masks(synth_root, "test")
    all_fg = numpy_ious([np.ones_like(g) for g in gts], gts)
    assert evaluate(synth_root, f"dir:{masks}", splits=["test"], workers=0,
                    progress=False)["test"]["fg_iou"] > all_fg["fg_iou"] + 15


def test_predicted_masks_are_a_mask_source_for_every_split(light, synth_root):
    _, masks = light
    for split in SPLITS:
        cub = CUB(synth_root, split, masks=f"dir:{masks}")
        assert not cub.missing_masks()
        for i in range(len(cub)):
            folder = masks / "waterbirds" if split == "waterbirds" else masks
            file = Image.open(folder / cub.paths[i].replace(".jpg", ".png"))
            image = Image.open(cub.image_path(i))
            assert file.mode == "L" and file.size == image.size  # the original, non-square size
            assert set(np.unique(np.asarray(file))) <= {0, 255}
            np.testing.assert_array_equal(cub[i].mask, np.asarray(file) > 0)


def test_predict_resumes_and_refuses_another_producer(light, synth_root, tmp_path):
    model, masks = light
    out = tmp_path / "masks"
    shutil.copytree(masks, out)
    cub = CUB(synth_root, "test")
    gone, kept = (out / cub.paths[i].replace(".jpg", ".png") for i in (0, 1))
    gone.unlink()
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(kept)  # a finished file is never redone
    predict(synth_root, model, out, splits=["test"], workers=0, progress=False)
    assert Image.open(gone).size == Image.open(cub.image_path(0)).size
    assert Image.open(kept).size == (2, 2)
    with pytest.raises(ConfigMismatchError, match="another configuration.*choose another --out"):
        unsupervised("test_vit", synth_root, out, random_init=True, image_size=64, splits=["test"],
                     workers=0, progress=False)


def test_resume_continues_exactly(synth_root, tmp_path, monkeypatch):
    whole = train(synth_root, out=tmp_path / "whole", epochs=2, **LIGHT)
    save = train_module._save_checkpoint

    def crash_after_first_epoch(*args):
        save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_save_checkpoint", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(synth_root, out=tmp_path / "cut", epochs=2, **LIGHT)
    monkeypatch.setattr(train_module, "_save_checkpoint", save)
    assert checkpoint.latest(tmp_path / "cut").name == "checkpoint-0001"
    with pytest.raises(ProbeError, match="unfinished run.*--resume"):
        train(synth_root, out=tmp_path / "cut", epochs=2, **LIGHT)
    with pytest.raises(ConfigMismatchError, match="lr"):
        train(synth_root, out=tmp_path / "cut", epochs=2, lr=0.5, resume=True, **LIGHT)
    resumed = train(synth_root, out=tmp_path / "cut", epochs=2, resume=True, **LIGHT)
    a, b = load(whole).decoder.state_dict(), load(resumed).decoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    info = [json.loads((p / "segmenter.json").read_text()) for p in (whole, resumed)]
    assert info[0]["loss_per_epoch"] == info[1]["loss_per_epoch"]


def test_tiles_cover_the_image_and_average_overlaps():
    for w, h in [(64, 64), (79, 64), (64, 200), (500, 333), (1000, 120)]:
        covered = np.zeros((h, w), int)
        for x0, y0, side in tile_boxes(w, h):
            assert side == min(w, h) and x0 + side <= w and y0 + side <= h
            covered[y0:y0 + side, x0:x0 + side] += 1
        assert covered.min() >= 1
    boxes = tile_boxes(100, 60)  # two tiles overlapping on columns 40..59
    full = assemble(torch.stack([torch.full((3, 3), 1.0), torch.full((3, 3), 3.0)]), boxes,
                    (100, 60))
    expected = torch.ones(60, 100)
    expected[:, 40:60], expected[:, 60:] = 2, 3
    torch.testing.assert_close(full, expected)


def test_iou_equals_numpy_on_hand_made_masks(tiny_cub, tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "hand"
    expected = {}
    for split in ("train", "test"):
        cub, preds = CUB(tiny_cub, split, masks="gt"), []
        for i in range(len(cub)):
            gt = cub[i].mask
            pred = rng.random(gt.shape) < (0.2 if i == 0 else 0.6)  # noisy, some far off
            pred[: gt.shape[0] // 3] |= gt[: gt.shape[0] // 3]  # partly right
            preds.append(pred)
            path = folder / cub.paths[i].replace(".jpg", ".png")
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pred.astype(np.uint8) * 200).save(path)  # any value > 0 is bird
        expected[split] = numpy_ious(preds, [cub[i].mask for i in range(len(cub))])
    got = evaluate(tiny_cub, f"dir:{folder}", workers=0, progress=False)
    assert set(got) == {"train", "test"}  # no Waterbirds folder: not scored
    for split in got:
        assert got[split] == pytest.approx(expected[split], rel=1e-9)
    assert evaluate(tiny_cub, "gt", workers=0, progress=False)["test"]["miou"] == 100
    result = cli(["eval", "--data", tiny_cub, "--masks", f"dir:{folder}", "--masks", "gt",
                  "--workers", 0])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0][:3] == ["masks", "split", "images"] and len(rows) == 5
    assert float(rows[1][3]) == pytest.approx(expected["train"]["miou"], abs=0.05)


def test_eval_lists_missing_masks_and_rejects_other_sizes(tiny_cub, tmp_path):
    folder = tmp_path / "partial"
    shutil.copytree(tiny_cub / "segmentations", folder)
    cub = CUB(tiny_cub, "test")
    for rel in cub.paths[:4]:
        (folder / rel.replace(".jpg", ".png")).unlink()
    result = cli(["eval", "--data", tiny_cub, "--masks", f"dir:{folder}", "--workers", 0])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: 4 of 6 images of split 'test' have no mask" in result.output
    assert cub.paths[0].replace(".jpg", ".png") in result.output
    shutil.copytree(tiny_cub / "segmentations", folder, dirs_exist_ok=True)
    wrong = folder / cub.paths[4].replace(".jpg", ".png")
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(wrong)
    with pytest.raises(ProbeError, match=f"{wrong.name} is 9x7, its image"):
        evaluate(tiny_cub, f"dir:{folder}", splits=["test"], workers=0, progress=False)
    result = cli(["eval", "--data", tiny_cub, "--masks", f"dir:{folder}", "--workers", 2])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "differ in size from their image" in result.output


def test_pca_helpers():
    tokens = torch.randn(6, 5, 8) * 0.1
    tokens[2:4, 1:3] += torch.linspace(-1, 1, 8)  # a compact object standing out
    score = first_component(tokens)
    assert score.shape == (6, 5) and abs(float(score.mean())) < 1e-5
    inside = torch.zeros(6, 5, dtype=torch.bool)
    inside[2:4, 1:3] = True
    sign = score[inside][0].sign()
    assert (score[inside] * sign > 0).all() and (score[~inside] * sign < 0).all()
    blob = -torch.ones(30, 40)
    blob[10:20, 12:28] = 1
    assert torch.equal(centre_oriented(blob), blob) and torch.equal(centre_oriented(-blob), blob)


def test_unsupervised_pca_separates_the_bird(synth_root, tmp_path):
    out = unsupervised("test_vit", synth_root, tmp_path / "pca", random_init=True, image_size=64,
                       splits=["test", "waterbirds"], workers=0, progress=False)
    got = evaluate(synth_root, f"dir:{out}", splits=["test", "waterbirds"], workers=0,
                   progress=False)
    gts = gt_masks(synth_root, "test")
    all_fg = numpy_ious([np.ones_like(g) for g in gts], gts)
    all_bg = numpy_ious([np.zeros_like(g) for g in gts], gts)
    for split in got:  # random features only see colour and texture, yet the bird stands out
        assert got[split]["miou"] > all_fg["miou"] + 25 and got[split]["miou"] > all_bg["miou"] + 5
        assert got[split]["fg_iou"] > all_fg["fg_iou"] + 8


def test_cls_attention_is_the_attention_timm_computes(synth_root, tmp_path):
    bb = create_backbone("test_vit", random_init=True, image_size=64)
    score = _cls_attention_scorer(bb)
    x = torch.randn(3, 3, 64, 64)
    attn = bb.model.blocks[-1].attn
    attn.fused_attn = False  # timm's explicit path, whose softmax output attn_drop receives
    seen = []
    attn.attn_drop.register_forward_hook(lambda m, args, out: seen.append(out))
    with torch.no_grad():
        got = score(x, [3])
    expected = seen[-1].mean(1)[:, 0, 1:].reshape(3, 4, 4)
    torch.testing.assert_close(got, expected)
    out = unsupervised("test_vit", synth_root, tmp_path / "att", method="cls-attention",
                       random_init=True, image_size=64, splits=["test"], workers=0, progress=False)
    assert not CUB(synth_root, "test", masks=f"dir:{out}").missing_masks()
    with pytest.raises(ProbeError, match="needs a timm ViT.*--method pca"):
        unsupervised("test_convnext", synth_root, tmp_path / "x", method="cls-attention",
                     random_init=True, image_size=64, workers=0, progress=False)


def test_mask2former_without_the_hub_is_one_clear_message(synth_root, tmp_path, hub_out_of_reach):
    _, reason = hub_out_of_reach
    result = cli(["train", "--data", synth_root, "--out", tmp_path / "m2f"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: Mask2Former weights")
    for part in ("--weights FOLDER", "HF_HOME", "--model light", "mask2former-swin-tiny", reason):
        assert part in lines[0]


def test_bad_names():
    with pytest.raises(ProbeError, match="Did you mean mask2former-swin-t"):
        build("mask2former")
    with pytest.raises(ProbeError, match="needs --backbone"):
        build("light")
    with pytest.raises(ProbeError, match="Did you mean:.*vit_s"):
        build("light", backbone="vit_ss", random_init=True)


def test_tiny_mask2former_trains_predicts_and_loads_local_weights(synth_root, tmp_path):
    common = dict(model="mask2former-swin-t", image_size=64, epochs=1, batch_size=12, workers=0,
                  progress=False, model_kwargs=TINY_M2F)
    model = train(synth_root, random_init=True, out=tmp_path / "m2f", **common)
    loss = json.loads((model / "segmenter.json").read_text())["loss_per_epoch"][0]
    assert np.isfinite(loss)
    masks = predict(synth_root, model, tmp_path / "masks", splits=["test"], workers=0,
                    progress=False)
    assert not CUB(synth_root, "test", masks=f"dir:{masks}").missing_masks()
    # A local "pretrained" folder: loaded with its class head swapped for background / bird.
    load(model).model.save_pretrained(tmp_path / "pretrained")
    again = build("mask2former-swin-t", weights=tmp_path / "pretrained", image_size=64)
    assert again.spec["source"] == str(tmp_path / "pretrained")
    assert again.model.config.num_labels == 2
