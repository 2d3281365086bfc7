"""A synthetic fine-grained bird set in the CUB-200-2011 layout, with a Waterbirds-style copy.

Classes come in pairs that share every colour and part but one or two details (head colour,
wing-bar, crest, beak length, belly colour). The two members of a pair live in habitats of
opposite type (one water-like, one land), so the background is a shortcut for exactly the
fine-grained decision, as in the real data. CUB backgrounds match the class's habitat with
probability 0.95; the Waterbirds copy pastes the identical bird onto another habitat.

Everything random is drawn from a generator seeded by (seed, stream, id), so one image's
content depends on nothing but its own id: order and parallelism cannot change the output.
"""

from __future__ import annotations

import colorsys
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from probe.errors import ProbeError

MATCH_P = 0.95  # CUB: chance the background is the class's own habitat (Waterbirds' 95%)
OPPOSITE_P = 0.75  # Waterbirds copy: chance the new habitat is of the opposite water/land type,
# the rest stays the same type so all four (bird type, place type) groups are populated.
WATER = ("lake", "sea", "marsh")
LAND = ("forest", "grass", "sand", "snow")
HABITATS = WATER + LAND
NOUNS = ("Finch", "Warbler", "Tern", "Plover", "Heron", "Sparrow", "Grebe", "Wren", "Gull",
         "Thrush", "Kingfisher", "Pipit", "Duck", "Lark", "Rail", "Tanager", "Vireo", "Oriole")
DETAILS = {"head": "Hooded", "wingbar": "Bar_winged", "crest": "Crested", "beak": "Long_billed",
           "belly": "Pale_bellied"}
# Part indices, in drawing order (later parts cover earlier ones); 0 is background.
TAIL, LEGS, BODY, BELLY, WING, WINGBAR, CREST, HEAD, BEAK, EYE = range(1, 11)
RECOLOURED = {"head": [HEAD, CREST], "belly": [BELLY], "wingbar": [WINGBAR]}
_SPECIES, _SPLIT, _PLAN, _BIRD, _BG, _OOD = range(6)  # independent random streams


@dataclass(frozen=True)
class Species:
    name: str
    habitat: str
    palette: np.ndarray  # [11, 3] float RGB per part index
    crest: bool
    wingbar: bool
    beak: float  # beak length in body lengths


@dataclass(frozen=True)
class PlannedImage:
    image_id: int  # 1-based, CUB style
    label: int  # 0-based class index
    rel_path: str  # relative to images/, without extension
    train: bool
    habitat: str  # background of the CUB image
    ood_habitat: str  # background of the Waterbirds image


def _rng(seed: int, stream: int, key: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, key])


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255


def species(classes: int, seed: int = 0) -> list[Species]:
    """The classes: pair k is a base species and a variant differing in one or two details."""
    out = []
    for k in range((classes + 1) // 2):
        rng = _rng(seed, _SPECIES, k)
        hue = rng.random()
        pal = np.zeros((11, 3))
        pal[[TAIL, BODY]] = _hsv(hue, rng.uniform(0.4, 0.9), rng.uniform(0.35, 0.8))
        pal[BELLY] = _hsv(hue + rng.uniform(-0.1, 0.1), *rng.uniform([0.05, 0.75], [0.3, 1]))
        pal[WING] = pal[BODY] * rng.uniform(0.5, 0.8)
        pal[[HEAD, CREST]] = _hsv(hue + rng.uniform(-0.15, 0.15), *rng.uniform([0.5, 0.3], 1))
        pal[WINGBAR] = _hsv(rng.random(), *rng.uniform([0, 0.8], [0.9, 1]))
        pal[[LEGS, BEAK]] = _hsv(*rng.uniform([0.05, 0.6, 0.2], [0.15, 1, 0.95]))
        pal[EYE] = (15, 15, 15)
        base = dict(palette=pal, crest=False, wingbar=bool(rng.random() < 0.5), beak=0.12)
        details = list(rng.choice(list(DETAILS), size=1 + int(rng.random() < 0.5), replace=False))
        var = dict(palette=pal.copy(), crest="crest" in details,
                   wingbar=base["wingbar"] or "wingbar" in details,
                   beak=0.34 if "beak" in details else base["beak"])
        for d in details:  # a list, not a set: the order of random draws must not vary
            if d in RECOLOURED:  # a clearly different hue, bright enough to see at 64 px
                h, s, v = colorsys.rgb_to_hsv(*pal[RECOLOURED[d][0]] / 255)
                new = _hsv(h + rng.uniform(0.3, 0.7), max(s, 0.6), max(v, 0.6))
                var["palette"][RECOLOURED[d]] = new
        noun = NOUNS[k % len(NOUNS)] + (f"_{k // len(NOUNS) + 1}" if k >= len(NOUNS) else "")
        water, land = WATER[k % len(WATER)], LAND[k % len(LAND)]
        pair = [("Common_" + noun, base), ("_".join(DETAILS[d] for d in details) + "_" + noun, var)]
        for i, (name, attrs) in enumerate(pair):
            # alternate which member is the water bird so "variant" does not imply a habitat type
            out.append(Species(name=name, habitat=water if (i + k) % 2 == 0 else land, **attrs))
    return out[:classes]


def _other(rng: np.random.Generator, habitat: str, opposite_p: float) -> str:
    same, opposite = (WATER, LAND) if habitat in WATER else (LAND, WATER)
    pool = opposite if rng.random() < opposite_p else [h for h in same if h != habitat]
    return str(rng.choice(pool))


def plan(classes: int, per_class: int, seed: int = 0) -> list[PlannedImage]:
    """Every image's id, class, split and both backgrounds, without rendering anything."""
    items = []
    for c, sp in enumerate(species(classes, seed)):
        is_train = np.zeros(per_class, bool)  # ~half per class, as in CUB; shuffled per class
        is_train[_rng(seed, _SPLIT, c).permutation(per_class)[: (per_class + 1) // 2]] = True
        for i in range(per_class):
            image_id = c * per_class + i + 1
            rng = _rng(seed, _PLAN, image_id)
            others = [h for h in HABITATS if h != sp.habitat]
            cub = sp.habitat if rng.random() < MATCH_P else str(rng.choice(others))
            rel = f"{c + 1:03d}.{sp.name}/{sp.name}_{image_id:04d}"
            ood = _other(rng, sp.habitat, OPPOSITE_P)
            items.append(PlannedImage(image_id, c, rel, bool(is_train[i]), cub, ood))
    return items


def _noise(rng: np.random.Generator, h: int, w: int, cy: int, cx: int | None = None) -> np.ndarray:
    """Smooth value noise of about [0, 1]: a coarse random grid upsampled bicubically."""
    grid = rng.random((cy, cx or cy), dtype=np.float32)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC))


def _mix(rng: np.random.Generator, a, b, t: np.ndarray) -> np.ndarray:
    """Blend two colours (each jittered per image) by t in [0, 1]."""
    a, b = (np.array(c) * rng.uniform(0.88, 1.12, 3) for c in (a, b))
    return a + (b - a) * np.clip(t, 0, 1)[..., None]


def background(habitat: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A procedural texture [h, w, 3] float with the habitat's colour and structure statistics."""
    y, x = np.mgrid[0:h, 0:w] / h
    warp, phase = _noise(rng, h, w, 4), rng.random()
    if habitat == "lake":  # horizontal ripples brightening towards the horizon
        waves = np.sin(2 * np.pi * (y / rng.uniform(0.06, 0.12) + 1.5 * warp + phase))
        img = _mix(rng, (25, 70, 150), (130, 185, 235), 0.25 * waves + 0.7 * (1 - y) + 0.1)
    elif habitat == "sea":  # dense diagonal swell with white foam caps
        waves = np.sin(2 * np.pi * ((x + 0.5 * y) / rng.uniform(0.05, 0.09) + warp + phase))
        img = _mix(rng, (10, 50, 80), (40, 130, 150), 0.5 + 0.4 * waves)
        img[(_noise(rng, h, w, 10) + 0.2 * waves) > 0.85] = (235, 245, 245)
    elif habitat == "marsh":  # murky water crossed by vertical reeds
        img = _mix(rng, (40, 80, 95), (95, 140, 140), 0.5 * warp + 0.4 * np.sin(20 * y + phase))
        reeds = (rng.random(w) < 0.3)[None] & (y > rng.uniform(0.1, 0.7, w)[None])
        stems = _mix(rng, (90, 100, 30), (150, 130, 60), rng.random(w))  # one colour per column
        img = np.where(reeds[..., None], stems, img)
    elif habitat == "forest":  # quantised canopy blobs with dark trunks
        t = np.floor(3 * (_noise(rng, h, w, 6) + 0.5 * _noise(rng, h, w, 12)) / 1.5) / 2
        img = _mix(rng, (15, 45, 15), (80, 130, 45), t)
        img[:, (_noise(rng, 1, w, 1, 7)[0] > 0.8)] = (60, 40, 25)
    elif habitat == "grass":  # fine vertical blades
        blades = _noise(rng, h, w, 4, w // 2)
        img = _mix(rng, (60, 120, 30), (170, 200, 70), 0.6 * blades + 0.4 * warp)
    elif habitat == "sand":  # soft diagonal ripples
        waves = np.sin(2 * np.pi * ((0.4 * x + y) / rng.uniform(0.1, 0.2) + 0.5 * warp + phase))
        img = _mix(rng, (190, 160, 105), (245, 225, 175), 0.5 + 0.3 * waves)
    elif habitat == "snow":  # bright field with blue-grey drifts
        img = _mix(rng, (165, 180, 205), (250, 250, 252), 1.6 * _noise(rng, h, w, 5) - 0.1)
    else:
        raise ValueError(f"unknown habitat {habitat!r}; known: {', '.join(HABITATS)}")
    return img + rng.normal(0, 6, (h, w, 1))  # grain, so no region is flat


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, n: int = 28
             ) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    px, py = rx * np.cos(t), ry * np.sin(t)
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([cx + c * px - s * py, cy + s * px + c * py], 1)


def _bird_parts(sp: Species, rng: np.random.Generator) -> list[tuple[int, np.ndarray]]:
    """Polygons in body lengths (facing right, y down), with a random pose."""
    wing, tail_tilt = rng.uniform(-0.25, 0.3), rng.uniform(-0.3, 0.3)
    hx, hy = 0.42 + rng.uniform(-0.03, 0.03), -0.28 + rng.uniform(-0.05, 0.05)
    tail = np.array([[-0.35, -0.07], [-0.82, -0.2], [-0.85, 0.05], [-0.35, 0.08]])
    c, s = np.cos(tail_tilt), np.sin(tail_tilt)
    tail = (tail + [0.35, 0]) @ [[c, s], [-s, c]] - [0.35, 0]
    parts = [(TAIL, tail),
             *((LEGS, np.array([[x, 0.2], [x + 0.035, 0.2], [x + 0.06, 0.48], [x + 0.025, 0.48]]))
               for x in (-0.08, 0.06)),
             (BODY, _ellipse(0, 0, 0.5, 0.27)), (BELLY, _ellipse(0.06, 0.1, 0.36, 0.14)),
             (WING, _ellipse(-0.08, -0.04, 0.34, 0.14, wing))]
    if sp.wingbar:
        parts.append((WINGBAR, _ellipse(-0.05, -0.04, 0.26, 0.05, wing)))
    if sp.crest:
        parts.append((CREST, np.array([[0.06, -0.12], [-0.3, -0.34], [-0.1, -0.04]]) + [hx, hy]))
    beak = np.array([[0.12, -0.06], [0.16 + sp.beak, 0.02], [0.12, 0.07]]) + [hx, hy]
    parts += [(HEAD, _ellipse(hx, hy, 0.18, 0.18)), (BEAK, beak),
              (EYE, _ellipse(hx + 0.07, hy - 0.04, 0.035, 0.035, n=10))]
    return parts


def render(item: PlannedImage, sp: Species, size: int, seed: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(CUB image, Waterbirds image, bird mask): both images hold the very same bird pixels."""
    rng = _rng(seed, _BIRD, item.image_id)
    h, w = size, int(rng.integers(size, size * 5 // 4 + 1))  # varied aspect exercises resizing
    angle, flip = rng.uniform(-0.3, 0.3), rng.random() < 0.5
    parts = _bird_parts(sp, rng)
    c, s = np.cos(angle), np.sin(angle)
    pts = [(p * [-1 if flip else 1, 1]) @ [[c, s], [-s, c]] for _, p in parts]
    lo, hi = np.min([p.min(0) for p in pts], 0), np.max([p.max(0) for p in pts], 0)
    # body length in pixels: the bird's mask covers roughly 15-33% of the image, and always fits
    scale = min(size * rng.uniform(0.55, 0.8), 0.98 * w / (hi - lo)[0], 0.98 * h / (hi - lo)[1])
    offset = rng.uniform(0, [w, h] - scale * (hi - lo)) - scale * lo
    labels = Image.new("L", (w, h))
    draw = ImageDraw.Draw(labels)
    for (part, _), p in zip(parts, pts):
        draw.polygon([tuple(q) for q in p * scale + offset], fill=part)
    labels = np.asarray(labels)
    shade = 0.85 + 0.3 * _noise(rng, h, w, 3)[..., None]  # soft lighting across the bird
    bird = sp.palette[labels] * rng.uniform(0.93, 1.07, 3) * shade
    mask = labels > 0
    backgrounds = (background(hab, _rng(seed, stream, item.image_id), h, w)
                   for hab, stream in ((item.habitat, _BG), (item.ood_habitat, _OOD)))
    cub, waterbirds = (np.where(mask[..., None], bird, bg).round().clip(0, 255).astype(np.uint8)
                       for bg in backgrounds)
    return cub, waterbirds, mask


def make_synthetic(out: str | Path, *, classes: int = 20, per_class: int = 24, size: int = 128,
                   seed: int = 0, progress: bool = True) -> Path:
    """Write the synthetic set under `out` in the CUB layout (+ Waterbirds copy); return `out`."""
    if classes < 2 or per_class < 2 or size < 32:
        raise ProbeError(f"synthetic set too small: classes={classes} (need >= 2), per_class="
                         f"{per_class} (need >= 2 for a train and a test image), size={size} "
                         "(need >= 32 px); pass larger values")
    out = Path(out)
    (out / "images.txt").unlink(missing_ok=True)  # written last, see below
    wb_root = out / "waterbird_complete95_forest2water2"
    specs, items = species(classes, seed), plan(classes, per_class, seed)
    boxes = {}
    for it in tqdm(items, desc="synthetic birds", unit="img", disable=not progress):
        cub, waterbirds, mask = render(it, specs[it.label], size, seed)
        for root, ext, arr in ((out / "images", ".jpg", cub), (wb_root, ".jpg", waterbirds),
                               (out / "segmentations", ".png", mask.astype(np.uint8) * 255)):
            path = root / (it.rel_path + ext)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path, **({"quality": 95} if ext == ".jpg" else {}))
        rows, cols = np.nonzero(mask)
        boxes[it.image_id] = (cols.min(), rows.min(), np.ptp(cols) + 1, np.ptp(rows) + 1)

    with open(wb_root / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["img_id", "img_filename", "y", "split", "place", "place_filename"])
        writer.writerows([it.image_id, it.rel_path + ".jpg", int(specs[it.label].habitat in WATER),
                          0 if it.train else 2, int(it.ood_habitat in WATER),
                          f"synthetic/{it.ood_habitat}/{it.image_id:04d}"] for it in items)
    index = {
        "classes.txt": (f"{c + 1} {c + 1:03d}.{sp.name}" for c, sp in enumerate(specs)),
        "image_class_labels.txt": (f"{it.image_id} {it.label + 1}" for it in items),
        "train_test_split.txt": (f"{it.image_id} {int(it.train)}" for it in items),
        "bounding_boxes.txt": (f"{i} " + " ".join(f"{v:.1f}" for v in b) for i, b in boxes.items()),
        # images.txt last: a run that was interrupted leaves no index a reader would trust
        "images.txt": (f"{it.image_id} {it.rel_path}.jpg" for it in items),
    }
    for name, lines in index.items():
        (out / name).write_text("".join(line + "\n" for line in lines))
    return out
