"""The synthetic benchmark: CUB layout, exact masks, determinism and the background swap."""

import csv
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from probe.data.synth import (
    BEAK,
    BELLY,
    BODY,
    EYE,
    HABITATS,
    HEAD,
    LEGS,
    TAIL,
    WATER,
    WING,
    WINGBAR,
    background,
    make_synthetic,
    plan,
    render,
    species,
)
from probe.errors import ProbeError

CLASSES, PER_CLASS, SIZE = 6, 8, 64
WB = "waterbird_complete95_forest2water2"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synth") / "set", classes=CLASSES,
                          per_class=PER_CLASS, size=SIZE, progress=False)


def table(path: Path) -> dict[int, list[str]]:
    rows = [line.split() for line in path.read_text().splitlines()]
    return {int(r[0]): r[1:] for r in rows}


def load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_layout_and_index_files_agree(root):
    images, labels = table(root / "images.txt"), table(root / "image_class_labels.txt")
    split, classes = table(root / "train_test_split.txt"), table(root / "classes.txt")
    n = CLASSES * PER_CLASS
    assert sorted(images) == sorted(labels) == sorted(split) == list(range(1, n + 1))
    assert sorted(classes) == list(range(1, CLASSES + 1))
    assert len({c[0] for c in classes.values()}) == CLASSES  # class folder names are unique
    for i, (rel,) in images.items():
        label = int(labels[i][0])
        folder, name = rel.split("/")
        assert folder == classes[label][0] and folder.startswith(f"{label:03d}.")
        assert name == f"{folder[4:]}_{i:04d}.jpg"
        for path in (root / "images" / rel, root / WB / rel,
                     (root / "segmentations" / rel).with_suffix(".png")):
            assert path.is_file(), path
    assert Counter(int(v[0]) for v in labels.values()) == {c: PER_CLASS for c in classes}
    train_per_class = Counter(int(labels[i][0]) for i, v in split.items() if v == ["1"])
    assert train_per_class == {c: PER_CLASS // 2 for c in classes}


def test_masks_match_images_and_boxes_are_tight(root):
    boxes = table(root / "bounding_boxes.txt")
    sizes = set()
    for i, (rel,) in table(root / "images.txt").items():
        image = Image.open(root / "images" / rel)
        mask = load((root / "segmentations" / rel).with_suffix(".png"))
        assert image.mode == "RGB" and image.height == SIZE and SIZE <= image.width <= SIZE * 1.25
        assert mask.shape == (image.height, image.width)
        assert Image.open(root / WB / rel).size == image.size
        assert set(np.unique(mask)) == {0, 255}
        rows, cols = np.nonzero(mask)
        tight = [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
        assert [float(v) for v in boxes[i]] == tight
        assert 0.05 < (mask > 0).mean() < 0.5  # a bird, with plenty of background around it
        sizes.add(image.size)
    assert len(sizes) > 1  # aspect ratios vary, so resizing code gets exercised


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(root, tmp_path):
    def run(name: str, seed: int) -> dict[str, str]:
        return digests(make_synthetic(tmp_path / name, classes=CLASSES, per_class=PER_CLASS,
                                      size=SIZE, seed=seed, progress=False))

    reference = digests(root)
    assert run("again", 0) == reference
    other = run("other", 1)
    images = [k for k in reference if k.startswith(("images/", WB + "/"))]
    assert not any(other.get(k) == reference[k] for k in images)


def test_render_depends_only_on_the_image_id():
    sp, items = species(CLASSES, 3), plan(CLASSES, PER_CLASS, 3)
    for it in items[::7]:
        cub, waterbirds, mask = render(it, sp[it.label], SIZE, 3)
        again = render(it, sp[it.label], SIZE, 3)  # after other renders: no shared state
        assert all(np.array_equal(a, b) for a, b in zip((cub, waterbirds, mask), again))


def test_waterbirds_copy_has_the_same_bird_on_another_background(root):
    # before JPEG the bird pixels are identical and every background pixel comes from a texture
    sp, items = species(CLASSES), plan(CLASSES, PER_CLASS)
    for it in items:
        cub, waterbirds, mask = render(it, sp[it.label], SIZE, 0)
        assert np.array_equal(cub[mask], waterbirds[mask])
        assert np.abs(cub[~mask].astype(int) - waterbirds[~mask]).mean() > 10
    # on disk, JPEG blurs block edges: compare the bird's inside, away from its outline
    for rel, in table(root / "images.txt").values():
        cub, waterbirds = (load(r / rel).astype(float) for r in (root / "images", root / WB))
        mask = load((root / "segmentations" / rel).with_suffix(".png")) > 0
        diff = np.abs(cub - waterbirds).mean(2)
        assert diff[ndimage.binary_erosion(mask, iterations=2)].mean() < 5, rel
        assert diff[~mask].mean() > 10, rel


def test_waterbirds_metadata(root):
    with open(root / WB / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["img_id", "img_filename", "y", "split", "place", "place_filename"]
    images, labels = table(root / "images.txt"), table(root / "image_class_labels.txt")
    split = table(root / "train_test_split.txt")
    sp = species(CLASSES)
    assert [int(r["img_id"]) for r in rows] == sorted(images)
    for r in rows:
        i = int(r["img_id"])
        habitat = sp[int(labels[i][0]) - 1].habitat
        assert r["img_filename"] == images[i][0]
        assert r["y"] == str(int(habitat in WATER))
        assert r["split"] == ("0" if split[i] == ["1"] else "2")
        _, place, number = r["place_filename"].split("/")
        assert place in HABITATS and place != habitat and int(number) == i
        assert r["place"] == str(int(place in WATER))
    assert {(r["y"], r["place"]) for r in rows} == {("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")}


def test_plan_matches_habitat_95_percent_and_ood_never():
    sp, items = species(20), plan(20, 200)
    own = np.array([it.habitat == sp[it.label].habitat for it in items])
    assert 0.93 < own.mean() < 0.97
    assert all(it.ood_habitat != sp[it.label].habitat for it in items)
    water = np.array([(sp[it.label].habitat in WATER, it.ood_habitat in WATER) for it in items])
    opposite = np.mean(water[:, 0] != water[:, 1])
    assert 0.7 < opposite < 0.8  # mostly the other water/land type, like Waterbirds
    assert {it.habitat for it in items if it.habitat != sp[it.label].habitat} == set(HABITATS)


def texture_stats(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Colour mean/std and mean gradient across and along rows, over the kept pixels."""
    image = image.astype(float)
    gray = image.mean(2)
    gx, gy = np.abs(np.diff(gray, axis=1)), np.abs(np.diff(gray, axis=0))
    return np.r_[image[keep].mean(0), image[keep].std(0),
                 gx[keep[:, 1:] & keep[:, :-1]].mean(), gy[keep[1:] & keep[:-1]].mean()]


def test_rendered_backgrounds_are_the_planned_distinct_habitats():
    # nearest-centroid on simple texture statistics recognises each habitat: the backgrounds
    # carry the strong, learnable habitat signal the benchmark relies on, and render uses the plan
    full = np.ones((SIZE, SIZE), bool)
    stats = {h: np.stack([texture_stats(background(h, np.random.default_rng(i), SIZE, SIZE), full)
                          for i in range(20)]) for h in HABITATS}
    centres = np.stack([s.mean(0) for s in stats.values()])
    scale = np.stack([s.std(0) for s in stats.values()]).mean(0)
    sp = species(CLASSES)
    hits = []
    for it in plan(CLASSES, PER_CLASS):
        cub, waterbirds, mask = render(it, sp[it.label], SIZE, 0)
        for image, habitat in ((cub, it.habitat), (waterbirds, it.ood_habitat)):
            z = (texture_stats(image, ~mask) - centres) / scale
            hits.append(HABITATS[np.argmin((z**2).sum(1))] == habitat)
    assert np.mean(hits) > 0.95


def test_pairs_differ_in_one_or_two_details_and_live_on_opposite_water_land():
    sp = species(20)
    assert len({s.name for s in sp}) == 20
    for a, b in zip(sp[::2], sp[1::2]):
        assert (a.habitat in WATER) != (b.habitat in WATER)
        shared = [TAIL, LEGS, BODY, WING, BEAK, EYE]
        assert np.array_equal(a.palette[shared], b.palette[shared])
        changed = {"head": not np.array_equal(a.palette[HEAD], b.palette[HEAD]),
                   "belly": not np.array_equal(a.palette[BELLY], b.palette[BELLY]),
                   "wingbar": a.wingbar != b.wingbar
                   or (a.wingbar and not np.array_equal(a.palette[WINGBAR], b.palette[WINGBAR])),
                   "crest": a.crest != b.crest, "beak": a.beak != b.beak}
        assert 1 <= sum(changed.values()) <= 2, (a.name, b.name)


def test_too_small_a_set_is_refused(tmp_path):
    with pytest.raises(ProbeError, match="per_class=1"):
        make_synthetic(tmp_path, per_class=1, progress=False)
