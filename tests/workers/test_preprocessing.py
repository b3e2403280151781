"""The batched resize + crop + normalise against PIL and timm's eval transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from workers.backbones import CATALOGUE
from workers.preprocessing import (
    BatchPreprocessor,
    Normalizer,
    Prepared,
    batched_resize,
    crop_box,
    prepare,
    preprocess,
    resample_matrix,
    stack_uint8,
)

PRE = CATALOGUE["tf_efficientnet_lite0"].preprocessing


def grey_levels(a: torch.Tensor, b: torch.Tensor, pre=PRE) -> float:
    """Largest difference of two normalised batches, in grey levels of the source."""
    std = torch.tensor(pre.std)[:, None, None]
    return float(((a - b).abs() * std * 255).max())


def pil_batch(images, pre=PRE) -> torch.Tensor:
    return Normalizer(pre)(torch.from_numpy(stack_uint8([preprocess(i, pre) for i in images], pre)))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize(
    ("size", "box", "out"),
    [
        ((28, 28), (1.75, 1.75, 26.25, 26.25), (224, 224)),  # upscaling, a Fashion-MNIST crop
        ((300, 200), (10.0, 0.0, 290.5, 200.0), (96, 64)),  # shrinking: the filter widens
        ((17, 40), (0.0, 3.3, 17.0, 33.1), (17, 50)),  # a side kept, a side stretched
    ],
)
def test_resample_matrix_is_pils_resampler(interpolation, size, box, out):
    # PIL resamples float ("F") images with its exact weights and no rounding or clamping, so
    # its result is rows @ X @ cols^T to float32 precision.
    rng = np.random.default_rng(0)
    X = rng.normal(size=size[::-1]).astype(np.float32)
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation]
    ref = np.asarray(Image.fromarray(X, "F").resize(out, resample, box=box))
    rows = resample_matrix(size[1], out[1], box[1], box[3], interpolation)
    cols = resample_matrix(size[0], out[0], box[0], box[2], interpolation)
    np.testing.assert_allclose(rows @ X @ cols.T, ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(rows.sum(1), 1.0)


def sharp_images():
    """Small sources with hard edges (bicubic overshoots there, so clamping matters)."""
    from workers.sample_data import load_fashion_mnist

    fashion, _ = load_fashion_mnist("test")
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (40, 33, 3), dtype=np.uint8)
    return [Image.fromarray(fashion[i]) for i in range(6)] + [
        Image.fromarray(fashion[6]).convert("RGB"),
        Image.fromarray(noise),
        Image.fromarray(noise[:, :, 0]),
    ]


def test_batched_path_is_timms_eval_transform_to_a_grey_level():
    import timm
    from timm.data import create_transform, resolve_data_config

    for name in ("tf_efficientnet_lite0", "vit_tiny_patch16_224", "mobilenetv3_small_100"):
        pre = CATALOGUE[name].preprocessing
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        reference = create_transform(**resolve_data_config(pretrained_cfg=cfg))
        batch = BatchPreprocessor(pre)
        for img in sharp_images():
            assert batched_resize(img.size[1], img.size[0], len(img.getbands()), pre)
            ref = reference(img.convert("RGB"))[None]
            ours = batch([Prepared(np.asarray(img), resized=False)])
            # One level at most, where a rounding tie falls the other way.
            assert grey_levels(ours, ref, pre) <= 1.01, (name, img.size, img.mode)


def test_batched_and_pil_paths_agree_and_a_mixed_batch_is_its_images_one_by_one():
    images = sharp_images()
    large = Image.fromarray(np.random.default_rng(2).integers(0, 256, (300, 420, 3), np.uint8))
    images.append(large)
    items = [prepare(img, PRE) for img in images]
    assert [it.resized for it in items] == [False] * (len(images) - 1) + [True]
    assert items[-1].pixels.shape == (224, 224, 3)
    assert items[0].pixels.shape == (28, 28)  # kept as decoded
    batch = BatchPreprocessor(PRE)
    x = batch(items)
    assert x.shape == (len(images), 3, 224, 224)
    assert x.is_contiguous(memory_format=torch.channels_last)
    one_by_one = torch.cat([batch([it]) for it in items])
    assert torch.equal(x, one_by_one)
    for reuse in (False, True):  # a batch of PIL-resized images only: normalised in place
        large_only = batch([items[-1], items[-1]], reuse=reuse)
        torch.testing.assert_close(large_only, pil_batch([large, large]), rtol=0, atol=1e-6)
    pil = pil_batch(images)
    assert grey_levels(x, pil) <= 1.01
    std = torch.tensor(PRE.std)[:, None, None]
    # The same pixels but at rounding ties (on the noise images about 1 in 1000).
    assert ((x - pil).abs() * std * 255 > 0.01).float().mean() < 1e-3
    # The clamp holds the batch to the normalised images of grey levels 0..255.
    low = torch.tensor([-m / s for m, s in zip(PRE.mean, PRE.std, strict=True)])
    high = low + 1 / torch.tensor(PRE.std)
    assert (x >= low[:, None, None] - 1e-6).all() and (x <= high[:, None, None] + 1e-6).all()
    assert (x.amin(dim=(0, 2, 3)) < low + 1e-3).all()  # black background reached, not undershot


def test_reused_buffer_and_padding_rows():
    items = [prepare(img, PRE) for img in sharp_images()[:4]]
    batch = BatchPreprocessor(PRE)
    first = batch(items, reuse=True).clone()
    again = batch(items[::-1], reuse=True)
    assert torch.equal(again, first.flip(0))
    padded = batch(items[:3], pad_to=8)
    assert padded.shape[0] == 8 and padded.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(padded[:3], first[:3]) and not padded[3:].any()


def test_a_smaller_batch_reuses_the_first_rows_of_the_kept_buffer():
    items = [prepare(img, PRE) for img in sharp_images()[:4]]
    batch = BatchPreprocessor(PRE)
    whole = batch(items, reuse=True).clone()
    kept = batch._buffer
    two = batch(items[2:], reuse=True)
    assert batch._buffer is kept and two.data_ptr() == kept.data_ptr()
    assert two.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(two, whole[2:])
    one_padded = batch(items[:1], reuse=True, pad_to=3)
    assert torch.equal(one_padded[:1], whole[:1]) and not one_padded[1:].any()
    assert torch.equal(batch(items, reuse=True), whole)  # the padding zeros are overwritten


def test_the_path_depends_only_on_the_source_size():
    pre = CATALOGUE["mobilenetv3_small_100"].preprocessing
    assert batched_resize(28, 28, 1, pre) and batched_resize(64, 64, 3, pre)
    assert not batched_resize(224, 224, 3, pre) and not batched_resize(480, 640, 1, pre)
    assert not batched_resize(2, 4000, 3, pre)  # cheap to resample, but a 32 MB matrix
    box = crop_box((28, 28), pre)
    # 28 px -> 256 (shorter side), centre 224: 16 resized pixels each side, in source pixels.
    assert box == pytest.approx((1.75, 1.75, 26.25, 26.25))
