"""Extraction end to end on real images: outputs, cache, bad images, in-memory images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import workers.extract
from cvxtune.errors import DatasetError, InvalidInput
from workers.backbones import load_backbone
from workers.datasets import open_dataset
from workers.extract import embed_images, extract, forward
from workers.preprocessing import preprocess, stack_uint8
from workers.sample_data import png_bytes, write_members

MOBILE = "mobilenetv3_small_100"
VIT = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def mobile():
    return load_backbone(MOBILE, allow_random=True, weights_dir="/nonexistent")


def test_preprocessing_matches_timms_eval_transform(fashion_test):
    import timm
    from timm.data import create_transform, resolve_data_config

    from workers.backbones import CATALOGUE

    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8))
    images = [Image.fromarray(fashion_test[0][0]).convert("RGB")]
    images += [smooth.resize(size, Image.BICUBIC) for size in [(300, 200), (97, 131)]]
    for name in ("tf_efficientnet_lite0", "vit_tiny_patch16_224", MOBILE):
        pre = CATALOGUE[name].preprocessing
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        reference = create_transform(**resolve_data_config(pretrained_cfg=cfg))
        for img in images:
            ref = reference(img).numpy()
            ours = stack_uint8([preprocess(img, pre)], pre)[0].transpose(2, 0, 1) / 255.0
            ours = (ours - np.array(pre.mean)[:, None, None]) / np.array(pre.std)[:, None, None]
            # At most one grey level apart, from rounding inside the resampler.
            levels = np.abs(ref - ours) * np.array(pre.std)[:, None, None] * 255
            assert levels.max() <= 1.01, (name, img.size)


def test_pooled_extraction_is_cached_by_content(small_zip, cache_dir, mobile):
    calls = []
    first = extract(small_zip, MOBILE, cache_dir=cache_dir, allow_random=True,
                    weights_dir="/nonexistent", batch_size=5, num_workers=1,
                    progress=lambda *a: calls.append(a))  # fmt: skip
    assert not first.cache_hit
    assert first.X.shape == (12, 1024) and first.X.dtype == np.float32
    assert np.isfinite(first.X).all()
    assert first.classes == ["sneaker", "trouser", "tshirt_top"]
    assert [first.classes[k] for k in first.y] == [p.split("/")[1] for p in first.paths]
    fractions = [c[0] for c in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(calls) == 3
    assert all(rate > 0 and eta >= 0 for _, rate, eta in calls)

    again = extract(small_zip, MOBILE, cache_dir=cache_dir, allow_random=True,
                    weights_dir="/nonexistent", progress=lambda *a: calls.append(a))  # fmt: skip
    assert again.cache_hit and again.key == first.key
    assert np.array_equal(again.X, first.X) and np.array_equal(again.y, first.y)
    assert again.paths == first.paths and again.classes == first.classes

    # A loaded backbone with the same weights gives the same key; another output another key.
    same = extract(small_zip, mobile, cache_dir=cache_dir)
    assert same.cache_hit and same.key == first.key
    tokens = extract(small_zip, mobile, cache_dir=cache_dir, output="tokens")
    assert not tokens.cache_hit and tokens.key != first.key


def test_batch_size_and_workers_do_not_change_embeddings(small_zip, mobile):
    a = extract(small_zip, mobile, batch_size=12, num_workers=0)
    b = extract(small_zip, mobile, batch_size=5, num_workers=2)
    assert np.allclose(a.X, b.X, atol=1e-4)


def test_every_path_gives_the_pil_transforms_embeddings(tmp_path, small_images, mobile):
    """Small sources (batched resize) and large ones (PIL's), grey, RGB, palette and RGBA,
    through every loader layout and embed_images: the same embeddings, which are those of
    PIL's resize followed by normalisation (but at rounding ties)."""
    from workers.datasets import decode_image
    from workers.preprocessing import Normalizer

    rng = np.random.default_rng(0)
    grey = small_images[0][:3]
    sources = [
        Image.fromarray(grey[0]),  # 28 x 28 grey: batched
        Image.fromarray(np.stack([grey[1]] * 3, axis=-1)),  # 28 x 28 RGB: batched
        Image.fromarray(rng.integers(0, 256, (41, 53, 3), dtype=np.uint8)),  # batched
        Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)),  # PIL
        Image.fromarray(grey[2]).resize((240, 240)),  # large grey: PIL
        Image.fromarray(grey[0]).convert("P"),  # palette
        Image.fromarray(rng.integers(0, 256, (30, 30, 4), dtype=np.uint8), "RGBA"),
    ]
    data = [_png(img) for img in sources]
    members = [(f"c{i % 2}/img{i}.png", b) for i, b in enumerate(data)]
    archive = tmp_path / "mixed.zip"
    write_members(archive, members)
    runs = [
        extract(archive, mobile, batch_size=4, num_workers=0),
        extract(archive, mobile, batch_size=3, num_workers=1),
        extract(archive, mobile, batch_size=7, num_workers=1, normalize_in_workers=True),
    ]
    order = [int(p.split("img")[1].split(".")[0]) for p in runs[0].paths]
    for run in runs[1:]:
        assert run.paths == runs[0].paths
        np.testing.assert_allclose(run.X, runs[0].X, rtol=0, atol=1e-5)
    served = embed_images(mobile, [data[i] for i in order], batch_size=3)
    np.testing.assert_allclose(served, runs[0].X, rtol=0, atol=1e-5)
    pre = mobile.spec.preprocessing
    pil = [preprocess(decode_image(data[i]), pre) for i in order]
    with torch.inference_mode():
        x = Normalizer(pre)(torch.from_numpy(stack_uint8(pil, pre)))
        ref = mobile.model.forward_head(mobile.model.forward_features(x), pre_logits=True)
    rel = np.linalg.norm(runs[0].X - ref.numpy(), axis=1) / np.linalg.norm(ref.numpy(), axis=1)
    assert rel.max() < 1e-3, rel  # measured: 7e-5 at most (a rounding tie)


def _png(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_embed_images_matches_extract(small_zip, small_images, mobile):
    ref = extract(small_zip, mobile)
    with open_dataset(small_zip) as ds:
        pil = [ds.load_image(i) for i in range(len(ds))]
        raw = [ds.read_bytes(i) for i in range(len(ds))]
    assert np.allclose(embed_images(mobile, pil), ref.X, atol=1e-4)
    assert np.allclose(embed_images(mobile, raw, batch_size=5), ref.X, atol=1e-4)
    arrays = [np.asarray(img) for img in pil]
    assert np.allclose(embed_images(mobile, arrays), ref.X, atol=1e-4)
    with pytest.raises(InvalidInput, match="image 1: not an image"):
        embed_images(mobile, [raw[0], b"nope"])


def test_a_kept_preprocessor_gives_every_batch_what_a_fresh_one_gives(small_zip, mobile):
    """As a serving runner calls it: one preprocessor, batches of changing sizes."""
    from workers.preprocessing import BatchPreprocessor

    with open_dataset(small_zip) as ds:
        raw = [ds.read_bytes(i) for i in range(len(ds))]
    kept = BatchPreprocessor(mobile.spec.preprocessing, mobile.device)
    for chunk in (raw[:5], raw[5:7], raw[:1], raw[2:8]):
        fresh = embed_images(mobile, chunk, batch_size=4)
        again = embed_images(mobile, chunk, batch_size=4, preprocessor=kept)
        assert np.array_equal(again, fresh)
    assert kept._buffer is not None and len(kept._buffer) == 4


def test_padded_batches_take_few_shapes_and_give_the_same_embeddings(
    monkeypatch, small_images, mobile
):
    from workers.extract import bucket_size, bucket_sizes

    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert bucket_sizes(4) == [1, 2, 4] and bucket_sizes(6) == [1, 2, 4, 6]
    assert [bucket_size(n, 6) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    images = list(small_images[0][:7])
    seen = []

    def spy(bb, x, output):
        seen.append(len(x))
        return forward(bb, x, output)

    monkeypatch.setattr(workers.extract, "forward", spy)
    padded = embed_images(mobile, images, batch_size=4, pad_batches=True)
    for output in ("feature_map", "tokens"):
        Z = embed_images(mobile, images[:3], output=output, pad_batches=True)
        assert np.allclose(Z, embed_images(mobile, images[:3], output=output), atol=1e-5)
    # 7 images in batches of 4: 4, then 3 padded to 4; 3 images: padded to 4, unpadded 3.
    assert seen == [4, 4, 4, 3, 4, 3]
    assert padded.shape[0] == 7
    assert np.allclose(padded, embed_images(mobile, images, batch_size=4), atol=1e-5)


def test_vit_outputs_end_to_end(small_zip, cache_dir):
    kw = dict(cache_dir=cache_dir, allow_random=True, weights_dir="/nonexistent")
    pooled = extract(small_zip, VIT, **kw)
    tokens = extract(small_zip, VIT, output="tokens", **kw)
    fmap = extract(small_zip, VIT, output="feature_map", **kw)
    assert pooled.X.shape == (12, 192)
    assert tokens.X.shape == (12, 197, 192)
    assert fmap.X.shape == (12, 192, 14, 14)
    assert np.allclose(tokens.X[:, 1:], fmap.X.reshape(12, 192, 196).transpose(0, 2, 1))
    assert np.allclose(tokens.X[:, 0], pooled.X, atol=1e-5)


def test_cnn_feature_map_pools_to_the_embedding(small_zip, cache_dir):
    # EfficientNet-Lite0's embedding is the global average of its last feature map.
    kw = dict(cache_dir=cache_dir, batch_size=6)
    fmap = extract(small_zip, "tf_efficientnet_lite0", output="feature_map", **kw)
    pooled = extract(small_zip, "tf_efficientnet_lite0", **kw)
    assert fmap.X.shape == (12, 1280, 7, 7)
    assert np.allclose(fmap.X.mean(axis=(2, 3)), pooled.X, atol=1e-4)


def test_images_unreadable_at_decode_time_are_skipped_or_refused(tmp_path, small_images, mobile):
    images, labels = small_images
    members = [(f"c{int(lab)}/{i:02d}.png", png_bytes(img)) for i, (img, lab) in
               enumerate(zip(images, labels, strict=True))]  # fmt: skip
    members.append(("c1/zz-broken.png", png_bytes(images[0])[:-30]))  # IEND cut off
    path = tmp_path / "d.tar"
    write_members(path, members)
    # Skipping validation's check leaves the broken file to the decoder.
    with open_dataset(path, check_images=False) as ds:
        assert len(ds) == 13
        out = extract(ds, mobile, cache_dir=tmp_path / "cache", batch_size=4)
    assert out.X.shape == (12, 1024) and len(out.paths) == 12 == len(out.y)
    assert "c1/zz-broken.png" not in out.paths
    assert [s["path"] for s in out.report["skipped"]] == ["c1/zz-broken.png"]
    again = extract(path, mobile, cache_dir=tmp_path / "cache")
    assert again.cache_hit and np.array_equal(again.X, out.X)
    with (
        open_dataset(path, check_images=False) as ds,
        pytest.raises(DatasetError, match=r"c1/zz-broken\.png: unreadable image data"),
    ):
        extract(ds, mobile, on_bad_image="fail")


def test_unknown_output_is_refused(small_zip, mobile):
    with pytest.raises(InvalidInput, match="unknown output 'logits'"):
        extract(small_zip, mobile, output="logits")


def test_inference_leaves_no_grad_state(small_zip, mobile):
    extract(small_zip, mobile)
    assert not any(p.requires_grad for p in mobile.model.parameters())
    assert not mobile.model.training
    assert torch.is_grad_enabled()


@pytest.mark.slow
def test_efficientnet_lite0_embeddings_classify_fashion_mnist(tmp_path, fashion_test):
    """Logistic regression on pretrained EfficientNet-Lite0 embeddings, 2k train / 1k test.

    Measured: 0.879 with C=0.01 (0.869 with C=0.1); the issue asks for >= 0.85.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from workers.sample_data import balanced_indices, load_fashion_mnist, write_imagefolder

    train_images, train_labels = load_fashion_mnist("train")
    test_images, test_labels = fashion_test
    itr, ite = balanced_indices(train_labels, 200), balanced_indices(test_labels, 100)
    train = write_imagefolder(tmp_path / "train.zip", train_images[itr], train_labels[itr])
    test = write_imagefolder(tmp_path / "test.tar.gz", test_images[ite], test_labels[ite])
    a = extract(train, "tf_efficientnet_lite0", cache_dir=tmp_path / "cache")
    b = extract(test, "tf_efficientnet_lite0", cache_dir=tmp_path / "cache")
    assert a.X.shape == (2000, 1280) and b.X.shape == (1000, 1280)
    assert a.classes == b.classes
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=3000))
    accuracy = clf.fit(a.X, a.y).score(b.X, b.y)
    assert accuracy >= 0.85


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_autocast_agrees_with_cpu(small_zip):
    cpu = extract(small_zip, "tf_efficientnet_lite0", device="cpu", num_workers=0)
    gpu = extract(small_zip, "tf_efficientnet_lite0", device="cuda", num_workers=1)
    assert gpu.X.dtype == np.float32
    cos = (cpu.X * gpu.X).sum(1) / np.linalg.norm(cpu.X, axis=1) / np.linalg.norm(gpu.X, axis=1)
    assert cos.min() > 0.99  # bf16/fp16 autocast, not bit-identical


def test_a_cpu_forward_on_two_cores_decodes_in_process(monkeypatch):
    import workers.extract as ex

    for cpus, cpu_workers, cuda_workers in [(1, 0, 1), (2, 0, 1), (4, 2, 2), (64, 8, 8)]:
        monkeypatch.setattr(ex, "usable_cpus", lambda c=cpus: c)
        assert ex.default_num_workers("cpu") == cpu_workers
        assert ex.default_num_workers("cuda") == cuda_workers
        # One stream per core where decoding is in process, else one.
        assert ex.default_streams("cpu", cpu_workers) == (2 if cpus == 2 else 1)
        assert ex.default_streams("cuda", cuda_workers) == 1


def test_streams_give_the_same_rows_in_order_and_stop_on_a_bad_image(
    tmp_path, small_images, mobile
):
    images, labels = small_images
    members = [(f"c{int(lab)}/{i:02d}.png", png_bytes(img)) for i, (img, lab) in
               enumerate(zip(images, labels, strict=True))]  # fmt: skip
    path = tmp_path / "d.zip"
    write_members(path, [*members, ("c1/03-broken.png", png_bytes(images[0])[:-30])])
    threads = torch.get_num_threads()
    seen: dict[int, list[float]] = {1: [], 3: []}

    def run(streams: int, **kw):
        # Opened each time: extract drops the rows it could not decode from the dataset.
        with open_dataset(path, check_images=False) as ds:
            return extract(ds, mobile, batch_size=2, num_workers=0, streams=streams, **kw)

    one, three = (run(k, progress=lambda f, *_, k=k: seen[k].append(f)) for k in (1, 3))
    assert torch.get_num_threads() == threads  # restored after the streams
    assert one.paths == three.paths and len(three.paths) == 12
    np.testing.assert_allclose(three.X, one.X, rtol=0, atol=1e-5)
    assert seen[3] == seen[1] and len(seen[3]) == 7  # after each batch, in order
    assert seen[3] == sorted(seen[3]) and seen[3][-1] == 1.0
    with pytest.raises(DatasetError, match=r"c1/03-broken\.png"):
        run(3, on_bad_image="fail")
    assert torch.get_num_threads() == threads


def test_normalizer_is_timms_normalisation_for_grey_and_rgb_batches():
    import torch

    from workers.backbones import CATALOGUE
    from workers.preprocessing import Normalizer

    pre = CATALOGUE["tf_efficientnet_lite0"].preprocessing
    mean, std = np.array(pre.mean), np.array(pre.std)
    norm = Normalizer(pre)
    rng = np.random.default_rng(0)
    for shape in [(4, 224, 224, 3), (4, 224, 224, 1), (2, 224, 224, 3), (4, 224, 224, 3)]:
        u8 = rng.integers(0, 256, shape, dtype=np.uint8)
        for reuse in (False, True):
            x = norm(torch.from_numpy(u8), reuse=reuse)
            assert x.shape == (shape[0], 3, 224, 224)
            assert x.is_contiguous(memory_format=torch.channels_last)
            want = ((u8 / 255.0 - mean) / std).transpose(0, 3, 1, 2)
            np.testing.assert_allclose(x.numpy(), want, rtol=0, atol=1e-5)
