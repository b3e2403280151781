"""Fashion-MNIST feature maps of EfficientNet-Lite0 for bench/heads.py, cached in bench/.cache/.

    python bench/heads_data.py [--train 10000] [--test 2000]

One extraction serves all three heads: the last feature map (n, 1280, 7, 7) through
workers.extract (output="feature_map"); the MLP head uses its spatial mean (exactly the pooled
embedding: the backbone's head is global average pooling), the CNN head the map itself and the
attention head its 49 positions as tokens. Stored as float16 to halve the cache (3 GB -> 1.5 GB
for 12k images); the benchmark computes in float32/64.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, str(THREADS))

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _bench_solver():
    """bench/solver.py's Fashion-MNIST readers, loaded under another name (``solver`` is the
    package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_solver", ROOT / "bench" / "solver.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CACHE = ROOT / "bench" / ".cache"
BACKBONE = "tf_efficientnet_lite0"


def feature_maps(n_train: int = 10_000, n_test: int = 2_000) -> dict[str, np.ndarray]:
    """{Mtr, ytr, Mte, yte}: float16 feature maps (n, 1280, 7, 7) and int labels."""
    path = CACHE / f"fmnist-lite0-fmap-{n_train}-{n_test}.npz"
    if path.exists():
        z = np.load(path, allow_pickle=False)
        return {k: z[k] for k in z.files}
    from workers.extract import extract

    bs = _bench_solver()
    _fmnist_split, _write_image_folder = bs._fmnist_split, bs._write_image_folder
    CACHE.mkdir(parents=True, exist_ok=True)
    Itr, ytr, Ite, yte = _fmnist_split(n_train, n_test)
    out: dict[str, np.ndarray] = {}
    for tag, imgs, labs in (("tr", Itr, ytr), ("te", Ite, yte)):
        folder = CACHE / f"fmnist-png-{n_train}-{n_test}" / ("train" if tag == "tr" else "test")
        if not folder.exists():
            _write_image_folder(folder, imgs, labs)
        t0 = time.perf_counter()
        res = extract(
            str(folder),
            BACKBONE,
            output="feature_map",
            cache_dir=str(CACHE / "extract"),
            num_threads=THREADS,
        )
        classes = np.array([int(c[1:]) for c in res.classes])
        order = np.argsort([Path(p).name for p in res.paths], kind="stable")
        M, y = np.asarray(res.X)[order], classes[np.asarray(res.y)][order]
        if not np.array_equal(y, labs):
            raise RuntimeError("label order from workers.extract does not match")
        print(f"{tag}: {M.shape} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        out[f"M{tag}"], out[f"y{tag}"] = M.astype(np.float16), y
        # The pooled embedding is the map's spatial mean (checked: equal to 1e-6 for
        # tf_efficientnet_lite0); computed here in float32 it also serves bench/solver.py.
        out[f"X{tag}"] = M.astype(np.float32).mean(axis=(2, 3))
    pooled = CACHE / f"fmnist-lite0-{n_train}-{n_test}.npz"
    if not pooled.exists():
        np.savez(
            pooled,
            Xtr=out.pop("Xtr"),
            ytr=out["ytr"],
            Xte=out.pop("Xte"),
            yte=out["yte"],
            source=np.array("workers.extract feature_map, spatial mean"),
        )
    out.pop("Xtr", None)
    out.pop("Xte", None)
    np.savez(path, **out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=10_000)
    ap.add_argument("--test", type=int, default=2_000)
    a = ap.parse_args()
    d = feature_maps(a.train, a.test)
    print({k: v.shape for k, v in d.items()})
