"""Backbone taps against independent computations with the plain timm / transformers models."""
import re
import warnings

import pytest
import safetensors.torch
import timm
import torch
from timm.layers import resample_abs_pos_embed

from probe.backbones import MASKED, REGISTRY, create_backbone, list_backbones
from probe.errors import ProbeError, WeightsUnavailableError

TINY_VIT = dict(image_size=56, depth=2, embed_dim=48, num_heads=2)  # 4x4 grid of 14 px patches
TINY_CONVNEXT = dict(image_size=64, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def batch(size, n=2, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def keep_map(n, h, w, seed=1):
    keep = (torch.rand(n, h, w, generator=torch.Generator().manual_seed(seed)) > 0.5).float()
    keep[:, 0, 0], keep[:, -1, -1] = 1, 0  # neither all background nor all foreground
    return keep


def tiny_timm_vit(**kw):
    """The plain timm model that create_backbone("vit_s", **TINY_VIT) wraps."""
    args = dict(num_classes=0, img_size=56, depth=2, embed_dim=48, num_heads=2) | kw
    return timm.create_model("vit_small_patch14_dinov2", **args)


@pytest.mark.parametrize("name, prefix", [("vit_s", 1), ("vit_s_reg", 5)])
def test_vit_taps_match_timm(name, prefix):
    bb = create_backbone(name, random_init=True, **TINY_VIT)
    m, x = bb.model, batch(56)
    assert (bb.kind, bb.num_prefix_tokens, bb.grid("L"), bb.dim("L"), bb.grid("L-1")) == \
        ("vit", prefix, (4, 4), 48, (4, 4))
    keep = keep_map(2, 4, 4)
    with torch.no_grad():
        out = bb.forward_taps(x, taps=("L", "prefix", "L-1"), lm1_keep=keep)
        tokens = m.forward_features(x)
        lm1, lm1_prefix = m.forward_intermediates(
            x, indices=[0], return_prefix_tokens=True, intermediates_only=True)[0]
        patches = lm1.flatten(2).transpose(1, 2) * keep.flatten(1)[..., None]
        masked_tokens = m.norm(m.blocks[-1](torch.cat([lm1_prefix, patches], 1)))
        masked = masked_tokens[:, prefix:]
        all_ones = bb.forward_taps(x, taps=(), lm1_keep=torch.ones(2, 4, 4))
        bool_keep = bb.forward_taps(x, taps=(), lm1_keep=keep.bool())
    masked_prefix = f"prefix.{MASKED}"  # the CLS that attended to the masked map
    assert set(out) == {"L", "prefix", "L-1", MASKED, masked_prefix}
    assert set(all_ones) == {MASKED, masked_prefix}
    close(out[masked_prefix], masked_tokens[:, :prefix])
    close(all_ones[masked_prefix], out["prefix"])
    assert not torch.allclose(out[masked_prefix], out["prefix"])
    close(out["prefix"], tokens[:, :prefix])
    close(out["L"], tokens[:, prefix:].reshape(2, 4, 4, 48))
    close(out["L-1"], lm1.permute(0, 2, 3, 1))
    close(out[MASKED], masked.reshape(2, 4, 4, 48))
    close(bool_keep[MASKED], out[MASKED])
    close(all_ones[MASKED], out["L"])
    assert not torch.allclose(out[MASKED], out["L"])


def test_convnext_taps_match_timm():
    bb = create_backbone("convnext_s", random_init=True, **TINY_CONVNEXT)
    m, x = bb.model, batch(64)
    assert (bb.kind, bb.channels_last, bb.num_prefix_tokens) == ("convnext", True, 0)
    assert (bb.grid("L"), bb.dim("L"), bb.grid("L-1"), bb.dim("L-1")) == ((2, 2), 64, (4, 4), 32)
    keep = keep_map(2, 4, 4)
    with torch.no_grad():
        out = bb.forward_taps(x, taps=("L", "L-1"), lm1_keep=keep)
        lm1 = m.forward_intermediates(x, indices=[2], intermediates_only=True)[0]
        masked = m.stages[3](lm1 * keep[:, None])
        all_ones = bb.forward_taps(x, taps=(), lm1_keep=torch.ones(2, 4, 4))[MASKED]
        close(out["L"], m.forward_features(x).permute(0, 2, 3, 1))
    assert set(out) == {"L", "L-1", MASKED}
    close(out["L-1"], lm1.permute(0, 2, 3, 1))
    close(out[MASKED], masked.permute(0, 2, 3, 1))
    close(all_ones, out["L"])
    norm = bb.head_norm()
    assert norm["eps"] == m.head.norm.eps
    assert (norm["weight"] == m.head.norm.weight.detach().numpy()).all()
    assert (norm["bias"] == m.head.norm.bias.detach().numpy()).all()


def test_generic_cnn_gives_last_map_only():
    bb = create_backbone("test_resnet", random_init=True, image_size=64)
    x = batch(64)
    with torch.no_grad():
        out = bb.forward_taps(x)
        close(out["L"], bb.model.forward_features(x).permute(0, 2, 3, 1))
    assert bb.kind == "cnn" and bb.head_norm() is None and out["L"].shape[1:3] == bb.grid("L")
    with pytest.raises(ProbeError, match="no tap"):
        bb.forward_taps(x, taps=("L-1",))
    with pytest.raises(ProbeError, match="cannot recompute"):
        bb.forward_taps(x, lm1_keep=torch.ones(2, 2, 2))


def test_random_init_is_reproducible_and_metadata():
    a = create_backbone("vit_s", random_init=True, **TINY_VIT)
    b = create_backbone("vit_s", random_init=True, **TINY_VIT)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert (a.model_id, a.weights_id, a.image_size, a.training) == \
        ("vit_small_patch14_dinov2.lvd142m", "random-init", 56, False)
    assert (a.mean, a.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert set(list_backbones()) == set(REGISTRY) >= {"vit_b", "vit_l_reg", "convnext_l"}


def test_input_errors():
    bb = create_backbone("vit_s", random_init=True, **TINY_VIT)
    with pytest.raises(ProbeError, match="expects 56x56"):
        bb.forward_taps(batch(70))
    with pytest.raises(ProbeError, match="lm1_keep has shape"):
        bb.forward_taps(batch(56), lm1_keep=torch.ones(2, 3, 3))
    with pytest.raises(ProbeError, match="needs lm1_keep"):
        bb.forward_taps(batch(56), taps=(MASKED,))
    with pytest.raises(ProbeError, match="multiple of 14.* 56, 70"):
        create_backbone("vit_s", random_init=True, **{**TINY_VIT, "image_size": 60})


@pytest.mark.parametrize("typo, suggestion", [("vit_bb", "vit_b"),
                                              ("convnext_smal", "convnext_small")])
def test_unknown_name_suggests(typo, suggestion):
    with pytest.raises(ProbeError, match=f"Did you mean:.*\\b{suggestion}\\b"):
        create_backbone(typo, random_init=True)


def test_hub_out_of_reach_without_cache_says_why_and_how_out(hub_out_of_reach):
    """The reason comes from probe's own check, before any download is tried (a download
    would retry for ~30 s and report "downloading ... failed")."""
    _, reason = hub_out_of_reach
    with pytest.raises(WeightsUnavailableError) as err:
        create_backbone("vit_s", **TINY_VIT)
    for part in ("--weights", "--random-init", "HF_HOME", "vit_small_patch14_dinov2.lvd142m",
                 reason):
        assert part in str(err.value)
    with pytest.raises(WeightsUnavailableError) as err:
        create_backbone("hf:facebook/dinov2-base")
    assert "--random-init" in str(err.value) and reason in str(err.value)


def test_weights_file_round_trip(tmp_path):
    model = tiny_timm_vit().eval()
    with torch.no_grad():  # unlike the fixed-seed random init, so loading must really happen
        for p in model.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    sd = model.state_dict()
    safetensors.torch.save_file(sd, tmp_path / "w.safetensors")
    nested = {f"module.{k}": v for k, v in sd.items()} | {"module.head.weight": torch.zeros(9, 48)}
    torch.save({"model": nested, "epoch": 3}, tmp_path / "w.pt")
    x = batch(56)
    with torch.no_grad():
        expected = model.forward_features(x)[:, 1:].reshape(2, 4, 4, 48)
    ids = set()
    for file in ("w.safetensors", "w.pt"):
        bb = create_backbone("vit_s", weights=tmp_path / file, **TINY_VIT)
        with torch.no_grad():
            close(bb.forward_taps(x)["L"], expected)
        assert bb.weights_id.startswith("file:sha256:")
        assert len(bb.weights_id) == len("file:sha256:") + 16
        ids.add(bb.weights_id)
    assert len(ids) == 2
    # Another image size: timm's checkpoint filter resamples the position embeddings.
    bb = create_backbone("vit_s", weights=tmp_path / "w.pt", **{**TINY_VIT, "image_size": 70})
    assert bb.grid("L") == (5, 5)
    close(bb.model.pos_embed.detach(), resample_abs_pos_embed(sd["pos_embed"], (5, 5), (4, 4), 1))


def test_weights_file_errors(tmp_path):
    wide = tiny_timm_vit(embed_dim=64)
    safetensors.torch.save_file(wide.state_dict(), tmp_path / "wide.safetensors")
    with pytest.raises(WeightsUnavailableError, match=r"do not fit.*another shape: "
                       r"blocks.0.attn.proj.bias \(model \(48,\), file \(64,\)\)"):
        create_backbone("vit_s", weights=tmp_path / "wide.safetensors", **TINY_VIT)
    shallow = {k: v for k, v in wide.state_dict().items() if not k.startswith("blocks.1.")}
    torch.save(shallow, tmp_path / "shallow.pt")
    with pytest.raises(WeightsUnavailableError, match="missing key.*blocks.1."):
        create_backbone("vit_s", weights=tmp_path / "shallow.pt", **{**TINY_VIT, "embed_dim": 64})
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        create_backbone("vit_s", weights=tmp_path / "nope.pt", **TINY_VIT)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="cannot read weights file"):
        create_backbone("vit_s", weights=tmp_path / "junk.pt", **TINY_VIT)
    with pytest.raises(ProbeError, match="not both"):
        create_backbone("vit_s", weights=tmp_path / "wide.safetensors", random_init=True)


@pytest.mark.parametrize("registers", [0, 4])
def test_hf_dinov2_matches_transformers(tmp_path, registers):
    import transformers

    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56,
              patch_size=14)
    if registers:
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **kw))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
    model.save_pretrained(tmp_path)
    bb = create_backbone(f"hf:{tmp_path}")
    p, x = 1 + registers, batch(56)
    assert (bb.kind, bb.num_prefix_tokens, bb.grid("L"), bb.dim("L")) == ("hf", p, (4, 4), 32)
    assert bb.weights_id.startswith("file:sha256:")
    with torch.no_grad():
        out = bb.forward_taps(x, taps=("L", "prefix", "L-1"))
        tokens = model.eval()(pixel_values=x).last_hidden_state
        lm1 = model.encoder.layer[0](model.embeddings(x))  # output of the second-to-last layer
    close(out["prefix"], tokens[:, :p])
    close(out["L"], tokens[:, p:].reshape(2, 4, 4, 32))
    close(out["L-1"], lm1[:, p:].reshape(2, 4, 4, 32))
    with pytest.raises(ProbeError, match="cannot recompute"):
        bb.forward_taps(x, lm1_keep=torch.ones(2, 4, 4))
    assert create_backbone(f"hf:{tmp_path}", random_init=True).weights_id == "random-init"


def test_pretrained_tag_loads_from_the_cache_without_the_hub(hub_out_of_reach):
    """The default weights: timm's Hugging Face repo for the tag, read from the hub cache."""
    cache, _ = hub_out_of_reach
    model = tiny_timm_vit()
    with torch.no_grad():
        model.pos_embed.add_(1.0)  # differs from the fixed-seed random init
    repo, commit = cache / "models--timm--vit_small_patch14_dinov2.lvd142m", "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    safetensors.torch.save_file(model.state_dict(), snapshot / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    bb = create_backbone("vit_s", **TINY_VIT)
    assert bb.weights_id == "timm:vit_small_patch14_dinov2.lvd142m"
    assert torch.equal(bb.model.pos_embed, model.pos_embed)


def _tiny_dinov2(folder):
    import transformers

    model = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14))
    model.save_pretrained(folder)
    return model


def test_hf_local_folder_never_asks_the_hub(tmp_path, monkeypatch):
    from probe import hub

    _tiny_dinov2(tmp_path / "model")  # no preprocessor_config.json: ImageNet statistics
    monkeypatch.setattr(hub, "unreachable", lambda: pytest.fail("asked the Hub for a folder"))
    monkeypatch.setenv("HOME", str(tmp_path))  # hf:~/model, as typed in a shell (no expansion)
    for name in (f"hf:{tmp_path / 'model'}", "hf:~/model"):
        bb = create_backbone(name)
        assert bb.mean == timm.data.IMAGENET_DEFAULT_MEAN
        assert bb.weights_id.startswith("file:sha256:") and bb.model_id == str(tmp_path / "model")
    with pytest.raises(WeightsUnavailableError, match="no such folder"):
        create_backbone(f"hf:{tmp_path / 'missing'}")


def test_hf_hub_id_from_the_cache_without_the_hub(hub_out_of_reach):
    """Weights cached, processor config not: the model loads, and the guessed statistics
    are announced instead of silently used."""
    cache, reason = hub_out_of_reach
    repo, commit = cache / "models--org--tiny-dinov2", "0" * 40
    model = _tiny_dinov2(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    expected = re.escape(f"config is not in the Hugging Face cache and {reason}")
    with pytest.warns(UserWarning, match=expected + ".*; normalising with ImageNet"):
        bb = create_backbone("hf:org/tiny-dinov2")
    assert bb.weights_id == f"hf:org/tiny-dinov2@{commit}"  # the snapshot's commit
    assert torch.equal(bb.model.embeddings.position_embeddings,
                       model.embeddings.position_embeddings)
    # once the Hub has said the repository has none (remembered in the cache), no warning
    (repo / ".no_exist" / commit).mkdir(parents=True)
    (repo / ".no_exist" / commit / "preprocessor_config.json").touch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert create_backbone("hf:org/tiny-dinov2").mean == timm.data.IMAGENET_DEFAULT_MEAN


def test_hf_model_options_override_config_fields(tmp_path):
    _tiny_dinov2(tmp_path / "model")
    bb = create_backbone(f"hf:{tmp_path / 'model'}", drop_path_rate=0.1)
    assert bb.model.config.drop_path_rate == 0.1
    assert [layer.drop_path.drop_prob for layer in bb.model.encoder.layer] == [0.1, 0.1]
    for not_a_field in ("depth", "to_dict"):  # an unknown name, a method of the config
        with pytest.raises(ProbeError, match=rf"Dinov2Config has no field\(s\) \['{not_a_field}'\]"):
            create_backbone(f"hf:{tmp_path / 'model'}", **{not_a_field: 2})
