"""Dataset formats, validation reports and every refusal, on real Fashion-MNIST images."""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cvxtune.errors import DatasetError
from workers.datasets import decode_image, open_dataset, safe_member_name, validate_dataset
from workers.sample_data import FASHION_CLASSES, png_bytes, write_imagefolder, write_members

CLASSES = sorted(FASHION_CLASSES[c] for c in (0, 1, 7))


def _members(images, labels, prefix=""):
    return [
        (f"{prefix}{FASHION_CLASSES[int(lab)]}/{i:03d}.png", png_bytes(img))
        for i, (img, lab) in enumerate(zip(images, labels, strict=True))
    ]


def _manifest(images, labels, folder="img"):
    rows = ["path,label"]
    members = []
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        rows.append(f"{folder}/{i:03d}.png,{FASHION_CLASSES[int(lab)]}")
        members.append((f"{folder}/{i:03d}.png", png_bytes(img)))
    return "\n".join(rows) + "\n", members


@pytest.mark.parametrize("suffix", ["zip", "tar", "tar.gz", "dir"])
@pytest.mark.parametrize("wrapper", ["", "top/"])
def test_imagefolder_formats_give_the_same_dataset(tmp_path, small_images, suffix, wrapper):
    images, labels = small_images
    dest = tmp_path / ("data" if suffix == "dir" else f"data.{suffix}")
    write_members(dest, _members(images, labels, wrapper))
    with open_dataset(dest) as ds:
        assert ds.classes == CLASSES
        assert len(ds) == 12
        assert ds.report["class_counts"] == dict.fromkeys(CLASSES, 4)
        assert ds.report["skipped"] == []
        # Labels follow the folder names; images come back pixel for pixel.
        for i in (0, 5, 11):
            assert ds.classes[ds.labels[i]] == ds.paths[i].split("/")[-2]
            k = int(Path(ds.paths[i]).stem)
            assert np.array_equal(np.asarray(ds.load_image(i)), images[k])


def test_compressed_tar_is_streamed_to_a_temporary_file_removed_on_close(tmp_path, small_images):
    dest = tmp_path / "data.tar.gz"
    write_imagefolder(dest, *small_images)
    ds = open_dataset(dest, spool_dir=tmp_path / "spool")
    assert len(list((tmp_path / "spool").iterdir())) == 1
    assert sum(1 for _ in ds.iter_images()) == 12
    ds.close()
    assert list((tmp_path / "spool").iterdir()) == []


@pytest.mark.parametrize("where", ["zip", "dir", "csv+zip", "csv+dir"])
def test_csv_manifest(tmp_path, small_images, where):
    images, labels = small_images
    text, members = _manifest(images, labels)
    if where == "zip":
        path = tmp_path / "data.zip"
        write_members(path, [("labels.csv", text.encode()), *members])
        ds = open_dataset(path)
    elif where == "dir":
        write_members(tmp_path / "d", [("labels.csv", text.encode()), *members])
        ds = open_dataset(tmp_path / "d")
    else:
        csv = tmp_path / "labels.csv"
        csv.write_text(text)
        images_at = tmp_path / ("images.zip" if where == "csv+zip" else "images")
        write_members(images_at, members)
        ds = open_dataset(csv, images=images_at)
    with ds:
        assert ds.classes == CLASSES
        assert ds.report["class_counts"] == dict.fromkeys(CLASSES, 4)
        i = ds.paths.index("img/003.png")
        assert ds.classes[ds.labels[i]] == FASHION_CLASSES[int(labels[3])]


def test_manifest_without_header_and_missing_file(tmp_path, small_images):
    images, labels = small_images
    text, members = _manifest(images, labels)
    text = text.split("\n", 1)[1] + "img/999.png,bag\n"
    write_members(tmp_path / "d", [("m.csv", text.encode()), *members])
    report = validate_dataset(tmp_path / "d")
    assert report["n_samples"] == 12
    assert report["skipped"] == [
        {"path": "img/999.png", "reason": "listed in the manifest but not found"}
    ]


def test_junk_files_are_ignored(tmp_path, small_images):
    junk = [("__MACOSX/bag/._000.png", b"j"), ("bag/.DS_Store", b"j"), ("README.txt", b"j")]
    members = [*_members(*small_images), *junk]
    write_members(tmp_path / "d.zip", members)
    report = validate_dataset(tmp_path / "d.zip")
    assert report["n_samples"] == 12
    assert report["ignored"] == ["README.txt"]


# ---------------------------------------------------------------- refusals


def _zip_with(tmp_path, name, data=b"x"):
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(name, data)
    return path


@pytest.mark.parametrize("name", ["../evil/x.png", "a/../../x.png", "/abs/x.png", "C:/x.png"])
def test_path_traversal_in_zip_is_refused(tmp_path, name):
    path = _zip_with(tmp_path, name)
    with pytest.raises(DatasetError, match=r"path traversal|escapes"):
        open_dataset(path)


def test_path_traversal_in_tar_is_refused(tmp_path):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("../../etc/x.png")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DatasetError, match="escapes the archive root"):
        open_dataset(path)


def test_links_in_tar_are_refused(tmp_path):
    path = tmp_path / "link.tar"
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("bag/x.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(DatasetError, match="is a link"):
        open_dataset(path)


def test_path_traversal_in_manifest_is_refused(tmp_path, small_images):
    _, members = _manifest(*small_images)
    bad = b"path,label\n../../secret.png,bag\n"
    write_members(tmp_path / "d.zip", [("labels.csv", bad), *members])
    with pytest.raises(DatasetError, match="escapes the archive root"):
        open_dataset(tmp_path / "d.zip")


def test_zip_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bag/x.png", bytes(8 << 20))  # 8 MiB of zeros squeeze to ~8 KiB
    with pytest.raises(DatasetError, match="decompression bomb"):
        open_dataset(path)


def test_tar_gz_over_the_size_limit_is_refused(tmp_path, small_images):
    path = write_imagefolder(tmp_path / "d.tar.gz", *small_images)
    with pytest.raises(DatasetError, match="decompression bomb"):
        open_dataset(path, max_total_bytes=4096)


def _png_claiming(width, height):
    """A real PNG whose header claims width x height pixels (CRC fixed up)."""
    data = bytearray(png_bytes(np.zeros((4, 4), np.uint8)))
    ihdr = 8 + 8  # signature, then length+type of the IHDR chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def test_image_over_our_pixel_limit_is_refused(tmp_path, small_images):
    members = [*_members(*small_images), ("bag/big.png", _png_claiming(9000, 8000))]
    write_members(tmp_path / "d.zip", members)
    with pytest.raises(DatasetError, match=r"bag/big.png: 9000x8000 = .*decompression bomb"):
        open_dataset(tmp_path / "d.zip")


def test_pixel_bomb_is_refused_whatever_the_policy(tmp_path, small_images):
    members = [*_members(*small_images), ("bag/bomb.png", _png_claiming(40000, 40000))]
    write_members(tmp_path / "d.zip", members)
    for policy in ("skip", "fail"):
        with pytest.raises(DatasetError, match=r"bag/bomb.png: .*decompression bomb"):
            open_dataset(tmp_path / "d.zip", on_bad_image=policy)


@pytest.mark.parametrize(
    "bad",
    [b"not an image at all", png_bytes(np.full((28, 28), 7, np.uint8))[:60]],
    ids=["garbage", "truncated"],
)
def test_unreadable_images_are_skipped_or_refused(tmp_path, small_images, bad):
    members = [*_members(*small_images), ("bag/broken.png", bad)]
    write_members(tmp_path / "d.zip", members)
    report = validate_dataset(tmp_path / "d.zip", on_bad_image="skip")
    assert report["n_samples"] == 12
    assert [s["path"] for s in report["skipped"]] == ["bag/broken.png"]
    assert "unreadable image" in report["skipped"][0]["reason"]
    with pytest.raises(DatasetError, match=r"bag/broken\.png: unreadable image"):
        validate_dataset(tmp_path / "d.zip", on_bad_image="fail")


def test_fewer_than_two_classes_is_refused(tmp_path, small_images):
    images, labels = small_images
    one = labels == labels[0]
    write_imagefolder(tmp_path / "one.zip", images[one], labels[one])
    with pytest.raises(DatasetError, match=r"1 class\(es\).*at least 2"):
        open_dataset(tmp_path / "one.zip")


def test_too_few_samples_per_class_is_refused(tmp_path, small_images):
    path = write_imagefolder(tmp_path / "d.zip", *small_images)
    assert validate_dataset(path, min_per_class=4)["n_samples"] == 12
    with pytest.raises(DatasetError, match=r"too few samples in class\(es\) .*\(4\).*at least 5"):
        validate_dataset(path, min_per_class=5)


def test_not_an_archive_is_refused(tmp_path):
    path = tmp_path / "notes.zip"
    path.write_bytes(b"hello, not a zip")
    with pytest.raises(DatasetError, match="not a zip or tar"):
        open_dataset(path)


def test_too_many_members_is_refused(tmp_path, small_images):
    path = write_imagefolder(tmp_path / "d.zip", *small_images)
    with pytest.raises(DatasetError, match="more than 5 files"):
        open_dataset(path, max_members=5)


def test_safe_member_name_normalises():
    assert safe_member_name("a/./b//c.png", where="t") == "a/b/c.png"
    assert safe_member_name("a\\b.png", where="t") == "a/b.png"


# ---------------------------------------------------------------- colour modes


def _encoded(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_colour_modes_are_converted(fashion_test):
    gray = fashion_test[0][0]
    rgb = np.stack([gray, 255 - gray, gray // 2], axis=-1)
    assert decode_image(_encoded(Image.fromarray(gray))).mode == "L"
    assert np.array_equal(np.asarray(decode_image(_encoded(Image.fromarray(rgb)))), rgb)
    palette = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16)
    assert decode_image(_encoded(palette)).mode == "RGB"
    cmyk = decode_image(_encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG"))
    assert cmyk.mode == "RGB"
    # 16-bit grayscale keeps its relative brightness.
    deep = decode_image(_encoded(Image.fromarray(gray.astype(np.uint16) * 257)))
    assert deep.mode == "L"
    assert np.abs(np.asarray(deep).astype(int) - gray).max() <= 1
    # Transparent pixels are composited on white, opaque ones keep their colour.
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4] = (10, 20, 30, 255)
    out = np.asarray(decode_image(_encoded(Image.fromarray(rgba, "RGBA"))))
    assert out.shape == (8, 8, 3)
    assert (out[:4] == (10, 20, 30)).all()
    assert (out[4:] == 255).all()
