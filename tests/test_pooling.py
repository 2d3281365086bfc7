"""Pooling against hand computations with explicit loops."""

import re

import numpy as np
import pytest
import torch

from probe.errors import ProbeError
from probe.pooling import PoolSpec, keep_cells, pool

N, H, W, D = 3, 2, 3, 4


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, H, W, D)).astype(np.float32)
    prefix = rng.normal(size=(N, 2, D)).astype(np.float32)  # CLS + one register
    keep = rng.random((N, H, W)) > 0.5
    keep[1] = False  # a row without foreground: fgmean must give the zero vector
    keep[2] = True
    return x, prefix, keep


def hand_patch(x, keep, spatial):
    out = np.zeros((N, D))
    for n in range(N):
        total, count = np.zeros(D), 0
        for i in range(H):
            for j in range(W):
                used = {"mean": True, "late": keep[n, i, j], "fgmean": keep[n, i, j],
                        "bg": not keep[n, i, j]}[spatial]
                if used:
                    total += x[n, i, j]
                    count += 1
        if spatial == "fgmean":
            out[n] = total / count if count else 0.0
        else:
            out[n] = total / (H * W)  # zeros of the dropped cells still count
    return out


@pytest.mark.parametrize("spatial", ["mean", "late", "fgmean", "bg"])
def test_patch_matches_loops(arrays, spatial):
    x, _, keep = arrays
    got = pool(x, representation="patch", spatial=spatial, keep=None if spatial == "mean" else keep)
    assert got.dtype == np.float32 and got.shape == (N, D)
    np.testing.assert_allclose(got, hand_patch(x, keep, spatial), rtol=1e-6, atol=1e-6)


def test_fgmean_without_foreground_is_zero_and_late_divides_by_all_cells(arrays):
    x, _, keep = arrays
    np.testing.assert_array_equal(pool(x, spatial="fgmean", keep=keep)[1], 0.0)
    np.testing.assert_array_equal(pool(x, spatial="late", keep=keep)[1], 0.0)
    one = np.zeros((1, H, W), bool)
    one[0, 0, 0] = True
    np.testing.assert_allclose(pool(x[:1], spatial="late", keep=one)[0], x[0, 0, 0] / 6, rtol=1e-6)


@pytest.mark.parametrize("spatial", ["mean", "late", "fgmean", "bg"])
def test_cls_and_concatenation_order(arrays, spatial):
    x, prefix, keep = arrays
    mask = None if spatial == "mean" else keep
    cls = pool(x, representation="cls", spatial=spatial, prefix=prefix, keep=mask)
    np.testing.assert_array_equal(cls, prefix[:, 0])  # CLS token untouched by any masking
    both = pool(x, representation="cls+patch", spatial=spatial, prefix=prefix, keep=mask)
    assert both.shape == (N, 2 * D)
    np.testing.assert_array_equal(both[:, :D], prefix[:, 0])
    np.testing.assert_allclose(both[:, D:], hand_patch(x, keep, spatial), rtol=1e-6, atol=1e-6)


def test_keep_cells_from_area_fraction_and_seed_map():
    area = np.array([[[0.0, 0.2, 0.49], [0.5, 0.7, 1.0]]], np.float16)
    np.testing.assert_array_equal(keep_cells(area, 0.5), [[[0, 0, 0], [1, 1, 1]]])
    np.testing.assert_array_equal(keep_cells(area, 0.2), [[[0, 1, 1], [1, 1, 1]]])
    seed = (area >= 0.5).astype(np.float16)
    for threshold in (0.01, 0.5, 1.0):
        np.testing.assert_array_equal(keep_cells(seed, threshold), seed.astype(bool))
    assert keep_cells(torch.from_numpy(area), 0.5).dtype == torch.bool
    for bad in (0.0, 1.5):
        with pytest.raises(ProbeError, match="threshold"):
            keep_cells(area, bad)
    with pytest.raises(ProbeError, match=r"\[N, h, w\]"):
        keep_cells(area[0], 0.5)


def test_head_norm_is_layer_norm_of_the_pooled_patch(arrays):
    x, _, keep = arrays
    rng = np.random.default_rng(1)
    weight, bias = rng.normal(size=(2, D)).astype(np.float32)
    norm = {"weight": weight, "bias": bias, "eps": 1e-6}
    got = pool(x, spatial="late", keep=keep, head_norm=norm)
    ref = torch.nn.functional.layer_norm(
        torch.tensor(hand_patch(x, keep, "late"), dtype=torch.float32), (D,),
        torch.from_numpy(norm["weight"]), torch.from_numpy(norm["bias"]), norm["eps"])
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="head_norm"):
        pool(x, representation="cls+patch", prefix=np.zeros((N, 1, D), np.float32), head_norm=norm)
    with pytest.raises(ProbeError, match=r"shape \(4,\)"):
        pool(x, head_norm={**norm, "weight": np.ones(D + 1)})


def test_chunkwise_equals_whole():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 4, 5, 8)).astype(np.float16)
    prefix = rng.normal(size=(10, 1, 8)).astype(np.float16)
    keep = keep_cells(rng.random((10, 4, 5)), 0.3)
    whole = pool(x, representation="cls+patch", spatial="late", prefix=prefix, keep=keep)
    parts = [
        pool(x[a:b], representation="cls+patch", spatial="late", prefix=prefix[a:b], keep=keep[a:b])
        for a, b in ((0, 3), (3, 7), (7, 10))
    ]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_float16_accumulates_in_float32(arrays):
    x, prefix, keep = arrays
    x16, p16 = x.astype(np.float16), prefix.astype(np.float16)
    got = pool(x16, representation="cls+patch", spatial="bg", prefix=p16, keep=keep)
    assert got.dtype == np.float32
    ref = hand_patch(x16.astype(np.float64), keep, "bg")
    np.testing.assert_allclose(got[:, D:], ref, rtol=1e-3, atol=1e-3)
    # 6 cells of 60000 overflow a float16 sum (max 65504) but not a float32 one.
    big = np.full((1, H, W, D), 60000, np.float16)
    np.testing.assert_array_equal(pool(big), np.full((1, D), 60000, np.float32))


def test_torch_in_torch_out(arrays):
    x, prefix, keep = arrays
    opts = dict(representation="cls+patch", spatial="fgmean")
    t_prefix, t_keep = torch.from_numpy(prefix), torch.from_numpy(keep)
    got = pool(torch.from_numpy(x), prefix=t_prefix, keep=t_keep, **opts)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), pool(x, prefix=prefix, keep=keep, **opts))


def test_boundary_errors(arrays):
    x, prefix, keep = arrays
    cases = [
        (dict(x=x[0]), r"\[N, h, w, D\]"),
        (dict(x=x, representation="cls"), "prefix tokens"),
        (dict(x=x, representation="cls", prefix=prefix[:, :, :3]), r"\[N=3, P>=1, D=4\]"),
        (dict(x=x, representation="cls", prefix=prefix[:2]), "prefix must be"),
        (dict(x=x, spatial="late"), "needs keep"),
        (dict(x=x, spatial="late", keep=keep[:, :1]), "keep must be"),
        (dict(x=x, keep=keep), "uses no mask"),
        (dict(x=x, representation="gap"), "representation must be one of"),
        (dict(x=x, spatial="max"), "spatial pooling must be one of"),
        (dict(x=x.tolist()), "numpy array or a torch tensor"),
    ]
    for kwargs, message in cases:
        x_arg = kwargs.pop("x")
        with pytest.raises(ProbeError, match=message):
            pool(x_arg, **kwargs)


def test_pool_spec_keys_and_masks():
    specs = [
        PoolSpec(),
        PoolSpec(representation="cls"),
        PoolSpec(tap="L.from-masked-L-1.gt", representation="patch"),
        PoolSpec(spatial="late", mask="gt"),
        PoolSpec(spatial="late", mask="gt", fg_rule="area", threshold=0.5),
        PoolSpec(spatial="late", mask="gt", fg_rule="area", threshold=0.25),
        PoolSpec(spatial="fgmean", mask="m2f_swin-t"),
        PoolSpec(spatial="bg", mask="gt"),
    ]
    keys = [s.key() for s in specs]
    assert len(set(keys)) == len(keys)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", k) for k in keys)
    assert specs[0].key() == "L.cls-patch.mean"
    assert specs[3].fg_array(37, 37) == "fgseed.gt.37x37"
    assert specs[4].fg_array(7, 7) == "fg.gt.7x7"
    area = np.array([[[0.3, 0.6]]])
    np.testing.assert_array_equal(specs[5].keep(area), [[[True, True]]])
    np.testing.assert_array_equal(specs[4].keep(area), [[[False, True]]])
    with pytest.raises(ProbeError, match="need a mask source"):
        PoolSpec(spatial="late")
    with pytest.raises(ProbeError, match="need a mask source"):
        PoolSpec(mask="gt")
    with pytest.raises(ProbeError, match="letters, digits"):
        PoolSpec(spatial="late", mask="my masks/v1")
    with pytest.raises(ProbeError, match="fg_rule"):
        PoolSpec(spatial="late", mask="gt", fg_rule="soft")


def test_late_masking_at_l_minus_1_takes_no_second_mask_rule():
    from probe.fit import pool_spec

    common = dict(head="patch", mask="late", stage="L-1", mask_source="gt", fg_threshold=0.5)
    assert pool_spec(fg_rule="seed", pooling="mean", **common).tap == "L.from-masked-L-1.gt"
    with pytest.raises(ProbeError, match="--fg-rule area applies to late masking at L only"):
        pool_spec(fg_rule="area", pooling="mean", **common)
    with pytest.raises(ProbeError, match="use --pooling mean"):
        pool_spec(fg_rule="seed", pooling="fgmean", **common)
