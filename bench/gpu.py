"""GPU rows for the solver and extraction benchmarks, in one short run.

    python bench/gpu.py [--out results/gpu.json] [--quick]

Solver: time per FISTA iteration and time to a relative gap on synthetic gated programs, on
the GPU and on this machine's CPU in the same run. Extraction: the bare backbone forward
(random weights; fp32 / fp16 / bf16, channels_last) at a few batch sizes, and the whole
pipeline (decode -> preprocess -> forward) through workers.extract on a zip of generated
images. Meant for a borrowed GPU machine; it runs on a CPU too (the GPU rows are skipped).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def solver_rows(devices: list[str], quick: bool, shrink: int) -> list[dict]:
    from solver import ConvergenceWarning, ConvexMLPClassifier, ConvexMLPRegressor

    rows = []
    gen = np.random.default_rng(0)
    cases = [
        ("gated squared binary n=20k d=128 p=512", 20_000, 128, 512, None),
        ("gated CE 10 classes n=10k d=1280 p=256", 10_000, 1280, 256, 10),
    ]
    for name, n, d, p, classes in cases:
        n, p = n // shrink, p // shrink
        X = gen.standard_normal((n, d)).astype(np.float32)
        if classes is None:
            y = np.maximum(X @ gen.standard_normal((d, 16)), 0) @ gen.standard_normal(16) / 10
        else:
            y = np.argmax(X @ gen.standard_normal((d, classes)), axis=1)
        for device in devices:
            for dtype in (torch.float32, torch.float64):
                Xt = torch.as_tensor(X, dtype=dtype, device=device)
                iters = 20 if quick or device == "cpu" else 100
                est_cls = ConvexMLPRegressor if classes is None else ConvexMLPClassifier
                est = est_cls(
                    gates=p, lam=1e-3, random_state=0, tol=1e-12, max_iter=iters, working_set=False
                )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    _sync(device)
                    t = time.perf_counter()
                    est.fit(Xt, y)
                    _sync(device)
                    fixed = time.perf_counter() - t
                row = {
                    "case": name,
                    "shrink": shrink,
                    "device": device,
                    "dtype": str(dtype).split(".")[-1],
                    "fit_s_per_iter": fixed / max(1, est.n_iter_),
                    "iters": est.n_iter_,
                }
                if device.startswith("cuda"):  # time to a certificate: GPU only, CPU is slow
                    # The estimator's defaults (tol, working sets, second-order phase).
                    est2 = est_cls(
                        gates=p, lam=1e-3, random_state=0, max_iter=200 if quick else 2000
                    )
                    t = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", ConvergenceWarning)
                        est2.fit(Xt, y)
                    _sync(device)
                    row["time_to_default_tol_s"] = time.perf_counter() - t
                    row["tol"] = est2.tol
                    row["gap_reached"] = est2.duality_gap_
                    row["iters_to_gap"] = est2.n_iter_
                rows.append(row)
                print(json.dumps(rows[-1]), flush=True)
    return rows


def forward_rows(device: str, names: list[str], quick: bool) -> list[dict]:
    from workers.backbones import load_backbone

    rows = []
    for name in names:
        bb = load_backbone(name, allow_random=True, device=device)
        size = bb.spec.input_size
        for bs in [64] if quick else [32, 128, 256]:
            x = torch.randn(bs, 3, size[-2], size[-1], device=device)
            x = x.contiguous(memory_format=torch.channels_last)
            for dt in (torch.float32, torch.float16, torch.bfloat16):
                enabled = dt != torch.float32
                with torch.inference_mode(), torch.autocast("cuda", dtype=dt, enabled=enabled):
                    for _ in range(3):
                        bb.model.forward_features(x)
                    _sync(device)
                    reps = 5 if quick else 20
                    t = time.perf_counter()
                    for _ in range(reps):
                        bb.model.forward_features(x)
                    _sync(device)
                    rate = reps * bs / (time.perf_counter() - t)
                rows.append(
                    {
                        "backbone": name,
                        "batch": bs,
                        "dtype": str(dt).split(".")[-1],
                        "images_per_s": rate,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def make_zip(path: Path, n: int, size: int = 96) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as z:
        for i in range(n):
            img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            z.writestr(f"data/class{i % 4}/img{i:05d}.png", buf.getvalue())


def pipeline_rows(device: str, names: list[str], n: int) -> list[dict]:
    """The whole pipeline with the default decoding processes and with one per CPU."""
    from workers.extract import default_num_workers, extract, usable_cpus

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        zpath = Path(tmp) / "images.zip"
        make_zip(zpath, n)
        for name in names:
            for workers in dict.fromkeys([default_num_workers(device), usable_cpus()]):
                # warm-up (cuDNN's algorithm choice, page cache)
                extract(zpath, name, device=device, allow_random=True, num_workers=workers)
                t = time.perf_counter()
                res = extract(zpath, name, device=device, allow_random=True, num_workers=workers)
                dt = time.perf_counter() - t
                rows.append(
                    {
                        "backbone": name,
                        "images": len(res.y),
                        "pipeline_images_per_s": n / dt,
                        "num_workers": workers,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu.json"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="solver,forward,pipeline")
    ap.add_argument("--shrink", type=int, default=1, help="divide the solver's n and p (smoke)")
    ap.add_argument("--pipeline-n", type=int, default=None, help="images (default 4096)")
    args = ap.parse_args()
    parts = args.parts.split(",")
    cuda = torch.cuda.is_available()
    info = {
        "torch": torch.__version__,
        "cuda": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(info), flush=True)
    result: dict = {"machine": info}
    names = [
        "tf_efficientnet_lite0",
        "mobilenetv3_small_100",
        "mobilenetv3_large_100",
        "vit_tiny_patch16_224",
        "vit_small_patch16_224",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Extraction first (the solver's certificate rows take minutes), and the JSON rewritten
    # after each part, so a run stopped by its time limit keeps what it finished.
    if cuda and "forward" in parts:
        result["forward"] = forward_rows("cuda", names, args.quick)
        out.write_text(json.dumps(result, indent=2))
    if cuda and "pipeline" in parts:
        n = args.pipeline_n or (512 if args.quick else 4096)
        result["pipeline"] = pipeline_rows("cuda", names, n)
        out.write_text(json.dumps(result, indent=2))
    if "solver" in parts:
        result["solver"] = solver_rows(
            ["cuda", "cpu"] if cuda else ["cpu"], args.quick, args.shrink
        )
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
