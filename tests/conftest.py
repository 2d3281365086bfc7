"""Shared fixtures: a tiny hand-written CUB folder, a small synthetic set, an unusable Hub."""

import socket
from pathlib import Path

import huggingface_hub.constants
import huggingface_hub.utils
import numpy as np
import pytest
from PIL import Image

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                   "all_proxy")

TINY_CLASSES = ["001.Alpha_Bird", "002.Beta_Bird", "003.Gamma_Bird"]


def write_tiny_cub(root: Path, per_class: int = 4) -> Path:
    """A CUB-format folder written by hand: 3 classes, odd image modes, soft segmentations."""
    rng = np.random.default_rng(0)
    lines = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": [],
             "bounding_boxes.txt": []}
    image_id = 0
    modes = ["RGB", "L", "P", "CMYK", "RGBA"]
    for c, cls in enumerate(TINY_CLASSES, 1):
        for k in range(per_class):
            image_id += 1
            rel = f"{cls}/{cls[4:]}_{k:04d}.jpg"
            w, h = 60 + 7 * k, 50 + 5 * c
            pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            mode = modes[image_id % len(modes)]
            image = Image.fromarray(pixels)
            image = image.convert(mode) if mode != "RGB" else image
            (root / "images" / cls).mkdir(parents=True, exist_ok=True)
            # CUB names every file .jpg; palette and RGBA content can only be stored as PNG
            image.save(root / "images" / rel, format="PNG" if mode in ("P", "RGBA") else "JPEG")
            seg = np.zeros((h, w), np.uint8)
            seg[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
            seg[h // 4, w // 4: 3 * w // 4] = 128  # soft annotator agreement still counts as bird
            (root / "segmentations" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(seg).save(root / "segmentations" / rel.replace(".jpg", ".png"))
            lines["images.txt"].append(f"{image_id} {rel}")
            lines["image_class_labels.txt"].append(f"{image_id} {c}")
            lines["train_test_split.txt"].append(f"{image_id} {int(k % 2 == 0)}")
            lines["bounding_boxes.txt"].append(f"{image_id} {w // 4}.0 {h // 4}.0 {w // 2}.0 {h // 2}.0")
    for name, content in lines.items():
        (root / name).write_text("\n".join(content) + "\n")
    (root / "classes.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(TINY_CLASSES, 1)))
    return root


@pytest.fixture
def tiny_cub(tmp_path) -> Path:
    return write_tiny_cub(tmp_path / "CUB_200_2011")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic set shared by the whole session (read-only: copy it before damaging)."""
    from probe.data.synth import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synth") / "birds", classes=6, per_class=8,
                          size=64, seed=0, progress=False)


@pytest.fixture
def local_hub(monkeypatch):
    """huggingface_hub talking to local addresses only: no proxy (its shared HTTP client reads
    the proxy settings once, when created, so it is recreated here and after the test) and
    offline mode off. Returns a function pointing the endpoint, downloads included, at a URL."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    huggingface_hub.utils.close_session()

    def point(url: str) -> None:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
        monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            url + "/{repo_id}/resolve/{revision}/{filename}")
    yield point
    huggingface_hub.utils.close_session()


@pytest.fixture(params=["offline", "unreachable"])
def hub_out_of_reach(request, monkeypatch, tmp_path, local_hub):
    """The Hub unusable in both ways users meet: HF_HUB_OFFLINE set, or (not set) an endpoint
    that refuses connections; in both, any request a regression let through is refused too.
    Returns (an empty Hugging Face cache folder, the reason's text)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        local_hub(endpoint)
        if request.param == "offline":
            monkeypatch.setenv("HF_HUB_OFFLINE", "1")
            monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
            yield cache, "offline mode is on (HF_HUB_OFFLINE)"
        else:
            yield cache, f"{endpoint} cannot be reached"
