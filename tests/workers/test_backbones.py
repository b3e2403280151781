"""The catalogue against timm, the weights' sources in order, and the EfficientNet-Lite0 mapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cvxtune.errors import CvxtuneError, InvalidInput, WeightsUnavailable
from workers.backbones import (
    CATALOGUE,
    _read_state_dict,
    catalogue,
    get_spec,
    load_backbone,
    map_by_position,
    weights_available,
    weights_source,
)
from workers.extract import forward


def timm_data_config(name):
    import timm
    from timm.data import resolve_data_config

    return resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict())


NAMES = [
    "mobilenetv3_small_100",
    "mobilenetv3_large_100",
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "tf_efficientnet_lite0",
]


@pytest.fixture(autouse=True)
def _no_hub_cache(tmp_path, monkeypatch):
    """Weights in this machine's model-hub cache must not leak into these tests."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("CVXTUNE_WEIGHTS_DIR", raising=False)


def test_catalogue_names():
    assert sorted(CATALOGUE) == sorted(NAMES)
    with pytest.raises(InvalidInput, match="unknown backbone 'resnet50'"):
        get_spec("resnet50")


@pytest.mark.parametrize("name", NAMES)
def test_preprocessing_is_timms_data_config(name):
    spec = CATALOGUE[name]
    cfg = timm_data_config(name)
    pre = spec.preprocessing
    assert tuple(cfg["input_size"]) == pre.input_size == spec.input_size
    assert cfg["interpolation"] == pre.interpolation
    assert cfg["crop_pct"] == pre.crop_pct
    assert np.allclose(cfg["mean"], pre.mean) and np.allclose(cfg["std"], pre.std)


@pytest.mark.parametrize("name", NAMES)
def test_declared_shapes_match_the_network(name):
    bb = load_backbone(name, allow_random=True, weights_dir="/nonexistent")
    x = torch.randn(2, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    spec = bb.spec
    with torch.inference_mode():
        pooled = forward(bb, x, "pooled")
        fmap = forward(bb, x, "feature_map")
        tokens = forward(bb, x, "tokens")
    assert pooled.shape == (2, spec.embed_dim)
    assert fmap.shape == (2, *spec.feature_map_shape)
    assert tokens.shape == (2, *spec.token_shape)
    if spec.family == "cnn":
        # Tokens are the map's positions; global average pooling of the map feeds the head.
        assert torch.equal(tokens.transpose(1, 2).reshape(fmap.shape), fmap)
    else:
        # The map is the patch grid; the class token comes first.
        assert torch.equal(fmap.flatten(2).transpose(1, 2), tokens[:, 1:])
        assert torch.allclose(pooled, tokens[:, 0], atol=1e-5)


def test_random_weights_only_when_allowed_and_reproducible(tmp_path):
    name = "mobilenetv3_small_100"
    assert not weights_available(name, weights_dir=tmp_path)
    with pytest.raises(WeightsUnavailable) as err:
        load_backbone(name, weights_dir=tmp_path)
    msg = err.value.message
    assert name in msg and "CVXTUNE_WEIGHTS_DIR" in msg and "model hub" in msg
    assert err.value.code == "weights_unavailable"
    a = load_backbone(name, weights_dir=tmp_path, allow_random=True)
    b = load_backbone(name, weights_dir=tmp_path, allow_random=True)
    assert a.source.kind == "random" and a.weights_id == b.weights_id
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("layout", "with_classifier"), [("flat", True), ("hub", False), ("file", True)]
)
def test_local_weights_come_first(tmp_path, layout, with_classifier):
    name = "mobilenetv3_small_100"
    import timm

    torch.manual_seed(3)
    ref = timm.create_model(name, pretrained=False)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if not with_classifier:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    path = {
        "flat": tmp_path / f"{name}.safetensors",
        "hub": tmp_path / name / "model.safetensors",
        "file": tmp_path / "anything.safetensors",
    }[layout]
    path.parent.mkdir(exist_ok=True)
    save_file(state, str(path))
    where = path if layout == "file" else tmp_path
    assert weights_available(name, weights_dir=where)
    bb = load_backbone(name, weights_dir=where, fuse=False)  # the file's tensors, as stored
    assert bb.source.kind == "local" and bb.weights_id.startswith("sha256:")
    got = bb.model.state_dict()
    for k, v in state.items():
        assert torch.equal(got[k], v), k


def test_efficientnet_lite0_weights_come_from_the_package_by_position():
    name = "tf_efficientnet_lite0"
    src = weights_source(name)
    assert src.kind == "package" and src.available and weights_available(name)
    package_state = _read_state_dict(__import__("pathlib").Path(src.location))
    assert len(package_state) == 296
    bb = load_backbone(name, fuse=False)  # the package's tensors, as stored
    model_state = bb.model.state_dict()
    for (pk, pv), (mk, mv) in zip(package_state.items(), model_state.items(), strict=True):
        assert torch.equal(pv, mv), (pk, mk)
    # Real ImageNet weights: a BatchNorm's running statistics are not the initial 0 / 1.
    assert not torch.equal(model_state["bn2.running_var"], torch.ones(1280))


def test_position_mapping_fails_loudly():
    a = {"x.w": torch.zeros(3, 2), "x.b": torch.zeros(3)}
    target = {"y.w": torch.zeros(3, 2), "y.b": torch.zeros(4)}
    with pytest.raises(CvxtuneError, match=r"tensor 1 x.b has shape \(3,\) but y.b needs \(4,\)"):
        map_by_position(a, target, "t")
    with pytest.raises(CvxtuneError, match="1 tensors in the weights file, 2 in the model"):
        map_by_position({"x.w": a["x.w"]}, target, "t")
    assert list(map_by_position(a, {"y.w": target["y.w"], "y.b": a["x.b"]}, "t")) == ["y.w", "y.b"]


def test_catalogue_for_the_api():
    entries = {e["name"]: e for e in catalogue()}
    assert entries["tf_efficientnet_lite0"]["weights_available"] is True
    assert entries["vit_tiny_patch16_224"]["weights_available"] is False
    assert entries["vit_tiny_patch16_224"]["embed_dim"] == 192
    assert entries["mobilenetv3_large_100"]["feature_map_shape"] == [960, 7, 7]


def test_batchnorm_folding_keeps_every_output_and_leaves_no_batchnorm():
    from workers.extract import forward

    plain = load_backbone("tf_efficientnet_lite0", fuse=False)  # real running statistics
    folded = load_backbone("tf_efficientnet_lite0")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.model.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.model.modules())
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for output in ("pooled", "feature_map", "tokens"):
            want, got = forward(plain, x, output), forward(folded, x, output)
            assert float((got - want).abs().max() / want.abs().max()) < 1e-4, output


def test_batchnorm_folding_with_nontrivial_statistics_and_activations():
    import timm

    from workers.backbones import fuse_batchnorm

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_100", pretrained=False).eval()
    for m in model.modules():  # random-init statistics are 0 / 1: make folding do something
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        want = model(x)
        n = fuse_batchnorm(model)
        got = model(x)
    assert n > 30
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4


def test_a_fold_that_changes_the_outputs_is_refused():
    from workers.backbones import fused

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    net[1].running_var.fill_(4.0)
    assert fused(net, (3, 8, 8)) is not net  # folded: same outputs

    class Reordered(torch.nn.Module):  # registered conv -> bn, run bn -> conv: must not fold
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv(self.bn(x))

    other = Reordered().eval()
    other.bn.running_mean.fill_(2.0)
    assert fused(other, (3, 8, 8)) is other
