import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from probe.cli import main
from probe.data import CUB, MaskSource, early_mask
from probe.data.check import check_dataset
from probe.data.cub import CUBIndex
from probe.data.splits import stratified_holdout
from probe.errors import DataError


def test_reader_yields_rgb_samples_with_masks(tiny_cub):
    train = CUB(tiny_cub, "train", masks="gt")
    test = CUB(tiny_cub, "test")
    assert len(train) == 6 and len(test) == 6
    assert set(train.ids).isdisjoint(test.ids)
    assert list(train.ids) == sorted(train.ids)
    modes_on_disk = set()
    for i in range(len(train)):
        sample = train[i]
        modes_on_disk.add(Image.open(train.image_path(i)).mode)
        assert sample.image.mode == "RGB"
        assert sample.mask.shape == (sample.image.height, sample.image.width)
        seg = np.asarray(Image.open(tiny_cub / "segmentations" / sample.path.replace(".jpg", ".png")))
        np.testing.assert_array_equal(sample.mask, seg > 0)
    assert {"L", "P", "CMYK"} & modes_on_disk  # the odd modes really were exercised
    assert train[0].label == int(open(tiny_cub / "image_class_labels.txt").read().split()[1]) - 1


def test_broken_image_names_its_path(tiny_cub):
    ds = CUB(tiny_cub, "train")
    ds.image_path(0).write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match=str(ds.image_path(0).name)):
        ds[0]


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "images.txt").unlink(), "missing index file .*images.txt"),
    (lambda r: (r / "images.txt").write_text("1 a.jpg\nbroken-line\n"), r"images.txt:2: expected"),
    (lambda r: (r / "images.txt").write_text("1 a.jpg\n1 b.jpg\n"), r"images.txt:2: duplicate id 1"),
    (lambda r: (r / "image_class_labels.txt").write_text("1 9\n"), "outside 1..3"),
    (lambda r: (r / "images.txt").write_text("1 ../../etc/passwd\n"), "escapes"),
    (lambda r: (r / "train_test_split.txt").write_text("1 7\n"), "expected 1 \\(train\\) or 0"),
])
def test_malformed_index_files_fail_clearly(tiny_cub, damage, message):
    damage(tiny_cub)
    with pytest.raises(DataError, match=message):
        CUB(tiny_cub, "train")


def test_val_holdout_is_stratified_disjoint_and_order_free(tiny_cub):
    index = CUBIndex.load(tiny_cub)
    train, val, rest = (set(index.ids[index.rows(s)]) for s in ("train", "val", "train.rest"))
    assert val and val.isdisjoint(rest) and val | rest == train
    assert val.isdisjoint(index.ids[index.rows("test")])
    rng = np.random.default_rng(1)
    ids = np.arange(1, 401)
    labels = np.repeat(np.arange(8), 50)
    held = stratified_holdout(ids, labels)
    assert np.bincount(labels[held]).tolist() == [5] * 8
    order = rng.permutation(len(ids))
    np.testing.assert_array_equal(stratified_holdout(ids[order], labels[order]), held[order])


def test_waterbirds_keeps_bird_pixels_and_swaps_background(synth_root):
    cub = CUB(synth_root, "test", masks="gt")
    wb = CUB(synth_root, "waterbirds", masks="gt")
    np.testing.assert_array_equal(cub.ids, wb.ids)
    np.testing.assert_array_equal(cub.labels, wb.labels)
    assert set(np.unique(wb.place)) <= {0, 1} and set(np.unique(wb.waterbird)) <= {0, 1}
    for i in range(0, len(wb), 7):
        a, b = cub[i], wb[i]
        pa = np.asarray(a.image, dtype=float)
        pb = np.asarray(b.image, dtype=float)
        inner = a.mask & np.roll(a.mask, 2, 0) & np.roll(a.mask, -2, 0) & np.roll(a.mask, 2, 1) \
            & np.roll(a.mask, -2, 1)  # away from the edge, where JPEG blends bird and background
        assert np.abs(pa - pb)[inner].mean() < 8
        assert np.abs(pa - pb)[~a.mask].mean() > 20
        assert b.place is not None and b.waterbird is not None


def test_early_mask_zeroes_exactly_the_background(tiny_cub):
    sample = CUB(tiny_cub, "train", masks="gt")[1]
    masked = np.asarray(early_mask(sample.image, sample.mask))
    original = np.asarray(sample.image)
    assert (masked[~sample.mask] == 0).all()
    np.testing.assert_array_equal(masked[sample.mask], original[sample.mask])
    with pytest.raises(DataError, match="mask is"):
        early_mask(sample.image, sample.mask[1:])


def test_mask_sources(tiny_cub, tmp_path):
    ds = CUB(tiny_cub, "train")
    seg = tiny_cub / "segmentations"
    pred = tmp_path / "pred masks"
    shutil.copytree(seg, pred)
    source = MaskSource.parse(f"dir:{pred}")
    assert source.name == "pred-masks" and MaskSource.parse("none").kind == "none"
    # names become store array names: ASCII only, whatever the folder is called
    assert MaskSource.parse(f"dir:{tmp_path / 'm2f_vögel'}").name == "m2f_v-gel"
    assert MaskSource.parse(f"dir:{tmp_path / '鳥'}").name == "masks"
    assert source.missing(tiny_cub, ds.paths) == []
    (pred / ds.paths[0]).with_suffix(".png").unlink()
    assert source.missing(tiny_cub, ds.paths) == [(pred / ds.paths[0]).with_suffix(".png")]
    wrong = np.zeros((5, 5), np.uint8)
    Image.fromarray(wrong).save((pred / ds.paths[1]).with_suffix(".png"))
    with pytest.raises(DataError, match="must have the image's size"):
        CUB(tiny_cub, "train", masks=f"dir:{pred}")[1]
    with pytest.raises(DataError, match="unknown mask source"):
        MaskSource.parse("segs")


def test_check_reports_clean_set_and_lists_damage(synth_root, tmp_path):
    report = check_dataset(synth_root, progress=False)
    assert report.ok, report.problems
    assert report.counts["waterbirds"] == report.counts["test"] > 0
    assert report.mask_coverage and all(v == 1.0 for v in report.mask_coverage.values())
    result = CliRunner().invoke(main, ["data", "check", str(synth_root)])
    assert result.exit_code == 0 and "no problems found" in result.output

    damaged = tmp_path / "damaged"
    shutil.copytree(synth_root, damaged)
    ds = CUB(damaged, "train")
    ds.image_path(0).unlink()
    ds.image_path(1).write_bytes(b"garbage")
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(
        damaged / "segmentations" / ds.paths[2].replace(".jpg", ".png"))
    result = CliRunner().invoke(main, ["data", "check", str(damaged)])
    assert result.exit_code == 1
    assert f"missing image {ds.image_path(0)}" in result.output
    assert f"cannot decode image {ds.image_path(1)}" in result.output
    assert "must have the image's size" in result.output


class _Broken:
    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 2:
            raise DataError("image 3 is broken; re-download it")
        return i


def test_errors_in_dataloader_workers_reach_the_caller_unchanged():
    from probe.data.loading import guarded_loader

    with pytest.raises(DataError) as caught:
        list(guarded_loader(_Broken(), batch_size=1, num_workers=2))
    assert str(caught.value) == "image 3 is broken; re-download it"  # no worker traceback
