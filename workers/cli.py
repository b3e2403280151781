"""`cvxtune embed`: frozen-backbone embeddings of a dataset to an .npz file."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cvxtune.errors import CvxtuneError
from workers.backbones import CATALOGUE, OUTPUTS, WEIGHTS_ENV

CACHE_ENV = "CVXTUNE_CACHE_DIR"


def _default_cache_dir() -> Path:
    """$CVXTUNE_CACHE_DIR, else the service's cache (settings), so both share embeddings."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    from cvxtune.settings import get_settings

    return get_settings().cache_dir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cvxtune embed",
        description="Extract frozen-backbone embeddings of an image dataset to an .npz file "
        "holding X (embeddings), y (labels), classes and paths.",
    )
    p.add_argument("--backbone", required=True, choices=sorted(CATALOGUE))
    p.add_argument(
        "--data",
        required=True,
        help="zip/tar(.gz)/directory of an ImageFolder or of a CSV manifest (path,label), "
        "or a CSV manifest file",
    )
    p.add_argument("--images", help="archive or directory holding a manifest's images")
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--output", choices=OUTPUTS, default="pooled", help="default: pooled")
    p.add_argument(
        "--allow-random-weights",
        action="store_true",
        help="use seeded random weights when no pretrained weights are available (demos, tests)",
    )
    p.add_argument(
        "--allow-download", action="store_true", help="download weights from the model hub"
    )
    p.add_argument(
        "--weights-dir", help=f"local weights file or directory (default: ${WEIGHTS_ENV})"
    )
    p.add_argument(
        "--cache-dir", help=f"embedding cache (default: ${CACHE_ENV}, else the service's cache)"
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--on-bad-image", choices=("skip", "fail"), default="skip")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--batch-size", type=int)
    p.add_argument(
        "--num-workers",
        type=int,
        help="decoding processes (default: one per 2 cores; none for a CPU forward on 2 or fewer)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


class _Bar:
    """A tqdm bar fed by extract's progress callback (fraction, images/s, eta)."""

    def __init__(self, enabled: bool):
        self.bar = None
        self.enabled = enabled

    def __call__(self, fraction: float, rate: float, eta: float) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=1000, unit="‰", file=sys.stderr, bar_format=_FORMAT)
        self.bar.n = round(fraction * 1000)
        status = f"{rate:.1f} img/s, ETA {_eta(eta)}" if rate > 0 else "from the cache"
        self.bar.set_postfix_str(status, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


_FORMAT = "embedding {percentage:3.0f}%|{bar}| {elapsed} {postfix}"


def _eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds + 0.5), 60)
    return f"{m}:{s:02d}"


def embed_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from workers.datasets import open_dataset
    from workers.extract import extract, save_npz

    bar = _Bar(not args.quiet)
    try:
        ds = open_dataset(args.data, images=args.images, on_bad_image=args.on_bad_image)
        with ds:
            result = extract(
                ds,
                args.backbone,
                output=args.output,
                cache_dir=None if args.no_cache else (args.cache_dir or _default_cache_dir()),
                weights_dir=args.weights_dir,
                allow_random=args.allow_random_weights,
                allow_download=args.allow_download,
                device=args.device,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                on_bad_image=args.on_bad_image,
                progress=bar,
            )
        bar.close()
        save_npz(args.out, result)
    except CvxtuneError as exc:
        bar.close()
        print(f"cvxtune embed: error: {exc.message}", file=sys.stderr)
        return 1
    skipped = result.report.get("skipped", [])
    for item in skipped[:20]:
        print(f"skipped {item['path']}: {item['reason']}", file=sys.stderr)
    source = "cache" if result.cache_hit else f"{result.images_per_s:.1f} img/s"
    print(
        f"wrote {args.out}: X {tuple(result.X.shape)} float32, {len(result.classes)} classes, "
        f"{len(skipped)} skipped ({source})",
        file=sys.stderr,
    )
    return 0
