import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import probe.dump as dump_module
from probe.backbones import create_backbone
from probe.cli import main
from probe.data import CUB
from probe.data.transforms import Preprocess, TrainTransform, seeded
from probe.dump import add_masks, dump
from probe.errors import ConfigMismatchError, ProbeError
from probe.store import FeatureStore

VIT = dict(backbone="test_vit", random_init=True, image_size=64, workers=0, progress=False)
TAPS = ("L", "L-1", "L.from-masked-L-1")


@pytest.fixture(scope="module")
def vit_store(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("features")
    return FeatureStore.open(dump(data_root=synth_root, taps=TAPS, out=out, chunk_rows=10, **VIT))


def _batch(synth_root, split, masked=False):
    """Preprocessed images of a split, computed here independently of the dumper's loader."""
    cub = CUB(synth_root, split, masks="gt")
    pre = Preprocess(64, (0.5,) * 3, (0.5,) * 3)
    images, masks = [], []
    for i in range(len(cub)):
        s = cub[i]
        pixels = np.asarray(s.image).copy()
        if masked:
            pixels[~s.mask] = 0  # blacked out by hand
        images.append(pre.image(Image.fromarray(pixels)))
        masks.append(pre.mask(s.mask))
    return torch.stack(images), masks


def _close(stored, expected, tol=2e-2):
    expected = expected.detach().float().numpy()
    np.testing.assert_allclose(stored.astype(np.float32), expected, atol=tol * np.abs(expected).max())


def test_vit_taps_equal_a_direct_timm_forward(vit_store, synth_root):
    model = create_backbone("test_vit", random_init=True, image_size=64).model
    split = vit_store.split("test")
    x, _ = _batch(synth_root, "test")
    with torch.no_grad():
        tokens = model.forward_features(x)
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for block in model.blocks[:-1]:
            h = block(h)
        keep = torch.from_numpy(split.read("fgseed.gt.4x4").astype(np.float32)).reshape(len(x), -1)
        masked = h.clone()
        masked[:, 1:] *= keep[:, :, None]  # CLS untouched
        from_masked = model.norm(model.blocks[-1](masked))
    grid = lambda t: t[:, 1:].reshape(len(x), 4, 4, -1)  # noqa: E731
    _close(split.read("prefix"), tokens[:, :1])
    _close(split.read("L"), grid(tokens))
    _close(split.read("L-1"), grid(h))
    _close(split.read("L.from-masked-L-1.gt"), grid(from_masked))
    assert not np.allclose(split.read("L.from-masked-L-1.gt"), split.read("L"), atol=1e-3)
    np.testing.assert_array_equal(split.read("ids"), CUB(synth_root, "test").ids)
    wb = vit_store.split("waterbirds")
    np.testing.assert_array_equal(wb.read("place"), CUB(synth_root, "waterbirds").place)


def test_fg_maps_are_area_averages_and_the_seed_rule(vit_store, synth_root):
    split = vit_store.split("train")
    _, masks = _batch(synth_root, "train")
    area = np.stack([m[0].numpy() for m in masks]).reshape(-1, 4, 16, 4, 16).mean(axis=(2, 4))
    nearest = np.stack([m[1].numpy() for m in masks])[:, 8::16, 8::16]  # centre pixel of each cell
    np.testing.assert_allclose(split.read("fg.gt.4x4"), area, atol=1e-3)
    np.testing.assert_array_equal(split.read("fgseed.gt.4x4"), nearest)
    assert 0.05 < area.mean() < 0.8


def test_masked_input_store_equals_images_blacked_out_by_hand(synth_root, tmp_path):
    path = dump(data_root=synth_root, input="masked", splits=["test"], out=tmp_path, **VIT)
    assert path.name == "masked-gt.zarr"
    model = create_backbone("test_vit", random_init=True, image_size=64).model
    x, _ = _batch(synth_root, "test", masked=True)
    with torch.no_grad():
        tokens = model.forward_features(x)
    _close(FeatureStore.open(path).split("test").read("L"), tokens[:, 1:].reshape(len(x), 4, 4, -1))


def test_convnext_taps_and_head_norm(synth_root, tmp_path):
    path = dump("test_convnext", synth_root, splits=["test"], taps=TAPS, out=tmp_path,
                random_init=True, image_size=64, workers=0, progress=False)
    store = FeatureStore.open(path)
    bb = create_backbone("test_convnext", random_init=True, image_size=64)
    x, _ = _batch(synth_root, "test")
    x = (x * 0.5 + 0.5 - torch.tensor(bb.mean)[:, None, None]) / torch.tensor(bb.std)[:, None, None]
    with torch.no_grad():
        expected = bb.model.forward_features(x).permute(0, 2, 3, 1)
    _close(store.split("test").read("L"), expected, tol=3e-2)
    assert "prefix" not in store.split("test").names()
    np.testing.assert_allclose(store.attrs["head_norm"]["weight"],
                               bb.model.head.norm.weight.detach().numpy())
    assert {"fg.gt.2x2", "fgseed.gt.4x4", "L.from-masked-L-1.gt"} <= set(store.split("test").names())


def _arrays(path):
    store = FeatureStore.open(path)
    return {(s, n): store.split(s).read(n) for s in store.splits() for n in store.split(s).names()
            if not n.startswith("progress.")}


def test_interrupted_dump_resumes_to_an_identical_store(synth_root, tmp_path, monkeypatch):
    reference = dump(data_root=synth_root, splits=["train"], taps=TAPS, out=tmp_path / "a",
                     chunk_rows=5, **VIT)
    real_write, calls = dump_module._write_chunk, []

    def crash_mid_chunk(split, progress, chunk, arrays):
        calls.append(chunk)
        if len(calls) == 3:  # half of a chunk written, its done flag never set: like kill -9
            first = next(iter(arrays))
            start, end = split.chunk_range(chunk)
            split.group[first][start:end] = arrays[first] * 0 + 7
            raise KeyboardInterrupt
        real_write(split, progress, chunk, arrays)

    monkeypatch.setattr(dump_module, "_write_chunk", crash_mid_chunk)
    with pytest.raises(KeyboardInterrupt):
        dump(data_root=synth_root, splits=["train"], taps=TAPS, out=tmp_path / "b", chunk_rows=5, **VIT)
    monkeypatch.setattr(dump_module, "_write_chunk", real_write)
    resumed = dump(data_root=synth_root, splits=["train"], taps=TAPS, out=tmp_path / "b",
                   chunk_rows=5, **VIT)
    a, b = _arrays(reference), _arrays(resumed)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


def test_torchrun_two_processes_equal_one_process(synth_root, tmp_path):
    one = dump(data_root=synth_root, splits=["train", "test"], out=tmp_path / "one", chunk_rows=4, **VIT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "probe", "dump", "--backbone", "test_vit", "--random-init", "--image-size", "64",
           "--data", str(synth_root), "--splits", "train,test", "--workers", "0", "--device", "cpu",
           "--chunk-rows", "4", "--out", str(tmp_path / "two")]
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # a hang must not leave workers behind
    try:
        _, stderr = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 0, stderr[-3000:]
    two = tmp_path / "two" / one.relative_to(tmp_path / "one")
    a, b = _arrays(one), _arrays(two)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


def test_configuration_mismatch_is_refused(vit_store, synth_root):
    out = vit_store.path.parents[2]
    with pytest.raises(ConfigMismatchError, match="image_size: store has 64, requested 48"):
        dump(data_root=synth_root, out=out, **{**VIT, "image_size": 48})


def test_rerun_does_nothing_and_cli_says_so(vit_store, synth_root):
    out = vit_store.path.parents[2]
    result = CliRunner().invoke(main, ["dump", "--backbone", "test_vit", "--random-init",
                                       "--image-size", "64", "--data", str(synth_root),
                                       "--taps", ",".join(TAPS), "--workers", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "already complete, nothing to do" in result.output


def test_add_masks_and_missing_masks(synth_root, tmp_path):
    data = tmp_path / "birds"
    shutil.copytree(synth_root, data)
    path = dump(data_root=data, splits=["test"], out=tmp_path / "f", **VIT)
    pred = tmp_path / "pred"
    shutil.copytree(data / "segmentations", pred)
    add_masks(path, data, f"dir:{pred}", workers=0, progress=False)
    split = FeatureStore.open(path).split("test")
    np.testing.assert_array_equal(split.read("fg.pred.4x4"), split.read("fg.gt.4x4"))
    np.testing.assert_array_equal(split.read("fgseed.pred.4x4"), split.read("fgseed.gt.4x4"))
    victim = next(pred.rglob("*.png"))
    victim.unlink()
    with pytest.raises(ProbeError, match=f"1 of .* have no mask.*\n.*{victim.name}"):
        dump(data_root=data, splits=["test"], masks=f"dir:{pred}", input="masked",
             out=tmp_path / "f", **VIT)


def test_augmented_views_store_the_geometry_of_each_view(synth_root, tmp_path):
    from probe.dump import view_seed

    path = dump(data_root=synth_root, splits=["train"], views=2, out=tmp_path, **VIT)
    aug = FeatureStore.open(path).split("train.aug")
    cub = CUB(synth_root, "train", masks="gt")
    np.testing.assert_array_equal(aug.read("ids"), np.repeat(cub.ids, 2))
    np.testing.assert_array_equal(aug.read("view"), np.tile([0, 1], len(cub)))
    augment = TrainTransform(64, (0.5,) * 3, (0.5,) * 3, "rand-m9-mstd0.5", 0.25)
    fg = aug.read("fg.gt.4x4")
    for row in (0, 1, 7):
        sample = cub[row // 2]
        with seeded(view_seed(sample.image_id, row % 2)):
            _, mask = augment(sample.image, Image.fromarray(sample.mask.astype(np.uint8) * 255))
        np.testing.assert_allclose(fg[row], mask.reshape(4, 16, 4, 16).mean(axis=(1, 3)), atol=1e-3)
    assert not np.array_equal(aug.read("L")[0], aug.read("L")[1])  # two different views
    again = dump(data_root=synth_root, splits=["train"], views=2, out=tmp_path / "again", **VIT)
    np.testing.assert_array_equal(FeatureStore.open(again).split("train.aug").read("L"), aug.read("L"))


def test_store_identity_covers_waterbirds_and_mask_folders(synth_root, tmp_path):
    data = tmp_path / "birds"
    shutil.copytree(synth_root, data)
    path = dump(data_root=data, splits=["test", "waterbirds"], out=tmp_path / "f", **VIT)
    metadata = data / "waterbird_complete95_forest2water2" / "metadata.csv"
    metadata.write_text(metadata.read_text().replace("synthetic/", "other/"))
    with pytest.raises(ConfigMismatchError, match="waterbirds_fingerprint"):
        dump(data_root=data, splits=["test", "waterbirds"], out=tmp_path / "f", **VIT)
    for parent in ("a", "b"):
        shutil.copytree(data / "segmentations", tmp_path / parent / "pred")
    add_masks(path, data, f"dir:{tmp_path / 'a' / 'pred'}", workers=0, progress=False)
    with pytest.raises(ConfigMismatchError, match="mask source name 'pred' already stands for"):
        add_masks(path, data, f"dir:{tmp_path / 'b' / 'pred'}", workers=0, progress=False)


def test_a_split_left_half_created_is_rebuilt(synth_root, tmp_path):
    reference = dump(data_root=synth_root, splits=["test"], out=tmp_path / "a", **VIT)
    path = dump(data_root=synth_root, splits=["test"], out=tmp_path / "b", **VIT)
    store = FeatureStore.open(path, mode="a")
    store.split("test").group["ids"].attrs["complete"] = False  # as if killed while indexing
    dump(data_root=synth_root, splits=["test"], out=tmp_path / "b", **VIT)
    a, b = _arrays(reference), _arrays(path)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


def test_masks_of_the_wrong_size_are_refused_before_any_work(synth_root, tmp_path):
    pred = tmp_path / "pred"
    shutil.copytree(synth_root / "segmentations", pred)
    victim = sorted(pred.rglob("*.png"))[3]
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(victim)
    with pytest.raises(ProbeError, match=f"1 masks of split .* differ in size.*\n.*{victim.name} is 7x5"):
        dump(data_root=synth_root, masks=f"dir:{pred}", out=tmp_path / "f", **VIT)


def test_transformers_backbones_refuse_the_l_minus_1_recomputation(synth_root, tmp_path):
    import transformers

    from probe.fit import fit

    folder = tmp_path / "dinov2"
    transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56,
        patch_size=14)).save_pretrained(folder)
    common = dict(out=tmp_path / "features", workers=0, device="cpu", progress=False,
                  splits=["train"])
    with pytest.raises(ProbeError, match=r"has no tap\(s\) \['L.from-masked-L-1'\]"):
        dump(f"hf:{folder}", synth_root, taps=("L", "L.from-masked-L-1"), **common)
    assert not (tmp_path / "features").exists()  # refused before any store was written
    dump(f"hf:{folder}", synth_root, **common)
    with pytest.raises(ProbeError, match="use the timm model of the same weights"):
        fit(f"hf:{folder}", features=tmp_path / "features", mask="late", stage="L-1",
            results=tmp_path / "results", progress=False)
