"""timm's eval transform (resize the shorter side, centre crop, normalise), fast on batches.

Two resamplers compute the same bicubic (or bilinear) resize with the same taps and weights:

- PIL's, one image at a time (`preprocess`), for large sources, where PIL's banded filter does
  far less work than a dense product;
- `BatchPreprocessor`'s, for small sources (`batched_resize`): each axis's resampling weights are
  a small matrix (`resample_matrix`), and a batch of same-size images is resized and cropped
  by two matrix products, the second writing the float batch in channels_last layout, which is
  then rounded, clamped and normalised in place, on the forward's threads (or on the GPU). For
  a 28 x 28 source this costs a third of PIL's resize plus the normalising pass
  (bench/README.md, "Batched resizing").

Like PIL, the batched path resamples horizontally, rounds and clamps to 0..255, then
vertically, rounds and clamps again, so the two give the same pixels but at rounding ties (one
grey level, measured on 5 in a million pixels of Fashion-MNIST images). Which path an image
takes depends only on its size, so an image gets the same pixels in extraction and in serving.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.backbones import Preprocessing

# The batched path takes a source when its two products cost at most this many multiply-adds
# per image: below it they beat PIL's resize plus the normalising pass on a 2-core CPU
# (measured, bench/README.md "Batched resizing"); a 28 x 28 grey source is about 4.7M.
BATCHED_MAX_MACS = 24_000_000
_MATRIX_CACHE = 16  # source sizes whose matrices a BatchPreprocessor keeps


def crop_box(size: tuple[int, int], pre: Preprocessing) -> tuple[float, float, float, float]:
    """The source region (left, top, right, bottom) that becomes the model's input.

    timm's eval transform resizes the shorter side to `pre.resize_to` (torchvision's Resize(int)
    truncates the longer side) and crops the centre; resampling exactly that box of the source
    to the input size gives the same pixels without computing the part the crop throws away.
    """
    out_h, out_w = pre.input_size[1:]
    w, h = size
    scale = pre.resize_to / min(w, h)
    rw, rh = (pre.resize_to, int(h * scale)) if w <= h else (int(w * scale), pre.resize_to)
    # torchvision's CenterCrop offsets, in resized pixels, mapped back to source pixels.
    left, top = round((rw - out_w) / 2), round((rh - out_h) / 2)
    sx, sy = w / rw, h / rh
    return (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)


def preprocess(img: Any, pre: Preprocessing) -> np.ndarray:
    """timm's eval transform in one PIL resize: uint8 (H, W) for grayscale or (H, W, 3)."""
    from PIL import Image

    out_h, out_w = pre.input_size[1:]
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}.get(
        pre.interpolation, Image.BICUBIC
    )
    return np.asarray(img.resize((out_w, out_h), resample, box=crop_box(img.size, pre)))


def stack_uint8(arrays: Sequence[np.ndarray], pre: Preprocessing) -> np.ndarray:
    """(B, H, W, 1) uint8 when every image is grayscale, else (B, H, W, 3).

    Grayscale stays one channel until normalisation broadcasts it to three, which writes the
    float batch once instead of copying each image three times first.
    """
    channels = 1 if all(a.ndim == 2 for a in arrays) else 3
    out = np.empty((len(arrays), *pre.input_size[1:], channels), dtype=np.uint8)
    for i, a in enumerate(arrays):
        out[i] = a[:, :, None] if a.ndim == 2 else a
    return out


class Normalizer:
    """uint8 NHWC batch -> normalised float NCHW in channels_last memory, on `device`."""

    def __init__(self, pre: Preprocessing, device: Any = "cpu"):
        import torch

        mean = torch.tensor(pre.mean, dtype=torch.float32, device=device)
        std = torch.tensor(pre.std, dtype=torch.float32, device=device)
        # (x / 255 - mean) / std == x * scale - shift, one fused pass over the batch; NHWC
        # memory read as NCHW is exactly channels_last, so the permute copies nothing.
        self.scale = 1.0 / (255.0 * std)
        self.neg_shift = -mean / std
        self.device = device
        self._buffer: Any = None
        self._full: dict[tuple[int, ...], tuple[Any, Any]] = {}

    def __call__(self, batch: Any, *, reuse: bool = False, out: Any = None) -> Any:
        """Into `out` (a float (B, H, W, 3) tensor) when given; with `reuse`, into a buffer kept
        for the next batch of that shape: on a CPU, faulting in fresh pages for every batch
        costs as much as the arithmetic."""
        import torch

        x = batch.to(self.device, non_blocking=True)
        shape = (*x.shape[:3], 3)
        if out is None and reuse:
            if self._buffer is None or tuple(self._buffer.shape) != shape:
                self._buffer = torch.empty(shape, dtype=torch.float32, device=self.device)
            out = self._buffer
        if out is not None and x.shape[3] == 3:
            # A per-channel operand broadcast along the innermost axis keeps the CPU kernel
            # from vectorising: converting first and taking the operands at full size is 2-3x
            # faster (measured on 32 x 224 x 224 x 3).
            if shape[1:] not in self._full:
                self._full[shape[1:]] = (
                    self.neg_shift.expand(shape[1:]).contiguous(),
                    self.scale.expand(shape[1:]).contiguous(),
                )
            neg_shift, scale = self._full[shape[1:]]
            out.copy_(x)
            return torch.addcmul(neg_shift, out, scale, out=out).permute(0, 3, 1, 2)
        return torch.addcmul(self.neg_shift, x, self.scale, out=out).permute(0, 3, 1, 2)


# ---------------------------------------------------------------- the batched resampler


def _bicubic(x: np.ndarray) -> np.ndarray:
    # Keys' cubic convolution with a = -0.5, as PIL's BICUBIC.
    a, x = -0.5, np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(1.0 - np.abs(x), 0.0)


_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_triangle, 1.0)}


@functools.lru_cache(maxsize=256)
def resample_matrix(
    in_size: int, out_size: int, start: float, stop: float, interpolation: str = "bicubic"
) -> np.ndarray:
    """(out_size, in_size) float64 weights resampling the span [start, stop) of a line.

    The taps and weights of PIL's resampler: output pixel i is centred at start + (i + 0.5) *
    scale in source coordinates; when shrinking, the filter widens by the scale (an antialiasing
    low-pass); taps outside the line are dropped and each row is normalised to sum to one.
    Cached (read-only): a dataset's images mostly share a few sizes.
    """
    kernel, support = _FILTERS.get(interpolation, _FILTERS["bicubic"])
    scale = (stop - start) / out_size
    widen = max(scale, 1.0)
    support *= widen
    center = start + (np.arange(out_size) + 0.5) * scale
    lo = np.maximum(np.floor(center - support + 0.5), 0)[:, None]
    hi = np.minimum(np.floor(center + support + 0.5), in_size)[:, None]
    taps = np.arange(in_size)[None, :]
    inside = (taps >= lo) & (taps < hi)
    w = np.where(inside, kernel((taps - center[:, None] + 0.5) / widen), 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=w, where=total != 0.0)
    w.flags.writeable = False
    return w


def batched_macs(h: int, w: int, channels: int, pre: Preprocessing) -> int:
    """Multiply-adds per image of the batched path's two products for an (h, w) source."""
    out_h, out_w = pre.input_size[1:]
    return 3 * out_w * (h * w * channels + out_h * h)


def batched_resize(h: int, w: int, channels: int, pre: Preprocessing) -> bool:
    """Whether an (h, w) source with `channels` takes the batched path (else PIL's).

    Rows no wider than twice the input also bound the horizontal matrix (w * channels by
    3 * W floats: 3.6 MB at most for 224 px), which a cost bound alone would not for a strip
    a few pixels high.
    """
    wide = w > 2 * pre.input_size[2]
    return not wide and batched_macs(h, w, channels, pre) <= BATCHED_MAX_MACS


@dataclass(frozen=True)
class Prepared:
    """A decoded image on its way to a batch: uint8 (h, w) grey or (h, w, 3) RGB pixels,
    either the source (`resized` false: the batch resamples it) or already at input size."""

    pixels: np.ndarray
    resized: bool


def prepare(img: Any, pre: Preprocessing) -> Prepared:
    """A decoded PIL image (mode L or RGB) -> what `BatchPreprocessor` takes.

    Small sources are kept as they are for the batched resampler; large ones are resized and
    cropped by PIL here (in a decoding process when there is one).
    """
    w, h = img.size
    channels = 1 if img.mode == "L" else 3
    if batched_resize(h, w, channels, pre):
        return Prepared(np.asarray(img), resized=False)
    return Prepared(preprocess(img, pre), resized=True)


class _Matrices:
    """One source size's resampling matrices, on the device: the horizontal one maps a row of w
    pixels (times channels, interleaved) to the model's 3 channels, interleaved (grey is
    repeated)."""

    def __init__(self, h: int, w: int, channels: int, pre: Preprocessing, device: Any):
        import torch

        out_h, out_w = pre.input_size[1:]
        left, top, right, bottom = crop_box((w, h), pre)
        rows = resample_matrix(h, out_h, top, bottom, pre.interpolation)
        cols = resample_matrix(w, out_w, left, right, pre.interpolation)  # (W, w)
        # horizontal[j' * channels + c_in, j * 3 + c] = cols[j, j'], c_in = c (RGB) or 0 (grey)
        horizontal = np.zeros((w, channels, out_w, 3))
        for c in range(3):
            horizontal[:, c if channels == 3 else 0, :, c] = cols.T

        def put(a: np.ndarray) -> Any:
            return torch.from_numpy(np.array(a, dtype=np.float32)).to(device)

        self.vertical = put(rows)
        self.horizontal = put(horizontal.reshape(w * channels, out_w * 3))


class BatchPreprocessor:
    """Prepared images -> the normalised float batch (B, 3, H, W), channels_last, on `device`.

    Same-size sources are resampled together by two matrix products; images `prepare` already
    resized are normalised as uint8 batches. With `reuse` the batch lands in the first rows of a
    buffer kept for the next batch of that size or smaller (the caller must be done with the
    previous one).
    """

    def __init__(self, pre: Preprocessing, device: Any = "cpu"):
        self.pre = pre
        self.device = device
        self.normalize = Normalizer(pre, device)
        # Normalizer's per-channel constants along an interleaved row (W * 3), for every size.
        self._row_scale = self.normalize.scale.repeat(pre.input_size[2])
        self._row_shift = self.normalize.neg_shift.repeat(pre.input_size[2])
        self._matrices: OrderedDict[tuple[int, int, int], _Matrices] = OrderedDict()
        self._buffer: Any = None

    def matrices(self, h: int, w: int, channels: int) -> _Matrices:
        key = (h, w, channels)
        if key in self._matrices:
            self._matrices.move_to_end(key)
        else:
            self._matrices[key] = _Matrices(h, w, channels, self.pre, self.device)
            if len(self._matrices) > _MATRIX_CACHE:
                self._matrices.popitem(last=False)
        return self._matrices[key]

    def __call__(self, items: Sequence[Prepared], *, reuse: bool = False, pad_to: int = 0) -> Any:
        """The batch of `items`, with zero rows after them up to `pad_to` rows."""
        import torch

        out_h, out_w = self.pre.input_size[1:]
        shape = (max(len(items), pad_to), out_h, out_w * 3)
        held = self._buffer
        if reuse and held is not None and held.shape[1:] == shape[1:] and len(held) >= shape[0]:
            out = held[: shape[0]]  # the first rows of a batch kept from before: contiguous
        else:
            out = torch.empty(shape, dtype=torch.float32, device=self.device)
            self._buffer = out if reuse else None
        out[len(items) :] = 0.0
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, item in enumerate(items):
            p = item.pixels
            key = ("resized",) if item.resized else p.shape
            groups.setdefault(key, []).append(i)
        for key, idx in groups.items():
            whole = len(idx) == len(out)
            target = out if whole else None
            if key == ("resized",):
                u8 = torch.from_numpy(stack_uint8([items[i].pixels for i in idx], self.pre))
                if whole:
                    self.normalize(u8, out=out.view(len(out), out_h, out_w, 3))
                else:
                    got = self.normalize(u8).permute(0, 2, 3, 1)
                    out[idx] = got.reshape(len(idx), *shape[1:])
                continue
            got = self._resample([items[i].pixels for i in idx], target)
            if not whole:
                out[idx] = got
        return out.view(len(out), out_h, out_w, 3).permute(0, 3, 1, 2)

    def _resample(self, sources: list[np.ndarray], out: Any) -> Any:
        """Same-size uint8 sources -> (k, H, W * 3) normalised, interleaved (into `out`)."""
        import torch

        first = sources[0]
        h, w = first.shape[:2]
        channels = 1 if first.ndim == 2 else 3
        m = self.matrices(h, w, channels)
        x = torch.from_numpy(np.stack(sources)).to(self.device, non_blocking=True)
        x = x.view(len(sources) * h, w * channels).float()
        # As PIL: horizontal pass, round and clamp to 0..255, vertical pass, round and clamp;
        # then normalise. Rounding matters: pretrained backbones are sensitive to it (half a
        # grey level of noise moved tf_efficientnet_lite0's Fashion-MNIST embeddings by 20 %).
        # Vertical first would resample one channel instead of three in the second product,
        # but clamping in that order moved edge pixels by up to 23 grey levels from PIL's.
        rows = torch.mm(x, m.horizontal).round_().clamp_(0.0, 255.0)
        got = torch.matmul(m.vertical, rows.view(len(sources), h, -1), out=out)
        got.round_().clamp_(0.0, 255.0)
        return torch.addcmul(self._row_shift, got, self._row_scale, out=got)
