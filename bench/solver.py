"""Benchmark of solver/ (issue 2): cvxtune's convex heads against pyscnn, Adam and scikit-learn.

    python bench/solver.py [--quick] [--only pyscnn,adam,sklearn,scaling] [--device cpu|cuda]

Datasets: (a) EfficientNet-Lite0 embeddings of Fashion-MNIST (10k train / 2k test, built once
with workers.extract and cached in bench/.cache/), (b) scikit-learn digits (75/25 split).
Parts:
  pyscnn   binary tasks, squared loss, group-L2 (Frobenius) penalty, no intercept, the same
           gate matrix on both sides: time, final objective (evaluated here by one function,
           `objective_squared`), cvxtune's time to first reach pyscnn's objective, its gap.
           `--repeat K` fits each side K times and reports the fastest of each.
  adam     nonconvex two-layer ReLU head, as wide as the neurons the convex (cross-entropy,
           nuclear) fit kept, trained with Adam over 5 learning rates x 3 seeds on the same
           objective CE + lam/2 (||W1||^2 + ||W2||^2): time to reach the convex objective.
  sklearn  LogisticRegression and MLPClassifier against the convex head: accuracy, fit time.
  scaling  time per iteration and peak memory against n and p.
pyscnn runs in its own virtualenv (see bench/README.md), as a subprocess of this script:
``PYSCNN_PYTHON`` (default /tmp/pyscnn-venv/bin/python) names its interpreter.
Results: a table on stdout and JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

# One thread for every library, set before numpy and torch load: on this shared 2-core machine
# two OpenMP threads made tiny torch kernels 10-1000x slower (barrier waits on a descheduled
# thread), which measures the machine, not the solvers. BENCH_THREADS overrides it.
THREADS = int(os.environ.get("BENCH_THREADS", "1"))
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, str(THREADS))

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"
RESULTS = ROOT / "bench" / "results"
# Where the Fashion-MNIST files are: the same setting as workers.sample_data.
FMNIST_RAW = Path(os.environ.get("CVXTUNE_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
BACKBONE = "tf_efficientnet_lite0"
PYSCNN_PYTHON = os.environ.get("PYSCNN_PYTHON", "/tmp/pyscnn-venv/bin/python")


# -- data ------------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fmnist_split(n_train: int, n_test: int, seed: int = 0):
    Xtr = _read_idx(FMNIST_RAW / "train-images-idx3-ubyte.gz")
    ytr = _read_idx(FMNIST_RAW / "train-labels-idx1-ubyte.gz")
    Xte = _read_idx(FMNIST_RAW / "t10k-images-idx3-ubyte.gz")
    yte = _read_idx(FMNIST_RAW / "t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(seed)
    i = rng.permutation(len(ytr))[:n_train]
    j = rng.permutation(len(yte))[:n_test]
    return Xtr[i], ytr[i].astype(np.int64), Xte[j], yte[j].astype(np.int64)


def _write_image_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from PIL import Image

    for k, (img, lab) in enumerate(zip(images, labels, strict=False)):
        d = root / f"c{int(lab)}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(d / f"{k:05d}.png")


def _embed_with_workers(folder: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings through the service's own extractor (workers.extract)."""
    sys.path.insert(0, str(ROOT))
    from workers.extract import extract

    res = extract(str(folder), BACKBONE, cache_dir=str(CACHE / "extract"), num_threads=THREADS)
    classes = np.array([int(c[1:]) for c in res.classes])
    order = np.argsort([Path(p).name for p in res.paths], kind="stable")
    X, y = np.asarray(res.X)[order], classes[np.asarray(res.y)][order]
    if len(y) != n:
        raise RuntimeError(f"extract returned {len(y)} of {n} images")
    return X.astype(np.float32), y


def fashion_embeddings(n_train: int = 10_000, n_test: int = 2_000) -> dict:
    """(Xtr, ytr, Xte, yte, source): EfficientNet-Lite0 pooled embeddings, cached as npz."""
    path = CACHE / f"fmnist-lite0-{n_train}-{n_test}.npz"
    if path.exists():
        z = np.load(path, allow_pickle=False)
        return {k: z[k] for k in z.files} | {"source": str(z["source"])}
    CACHE.mkdir(parents=True, exist_ok=True)
    Itr, ytr, Ite, yte = _fmnist_split(n_train, n_test)
    parts = []
    for name, imgs, labs in (("train", Itr, ytr), ("test", Ite, yte)):
        folder = CACHE / f"fmnist-png-{n_train}-{n_test}" / name
        if not folder.exists():
            _write_image_folder(folder, imgs, labs)
        X, y = _embed_with_workers(folder, len(labs))
        if not np.array_equal(y, labs):
            raise RuntimeError("label order from workers.extract does not match")
        parts.append(X)
    source = "workers.extract"
    out = {"Xtr": parts[0], "ytr": ytr, "Xte": parts[1], "yte": yte}
    np.savez(path, **out, source=np.array(source))
    return out | {"source": source}


def digits_data() -> dict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    return {
        "Xtr": Xtr.astype(np.float32),
        "ytr": ytr,
        "Xte": Xte.astype(np.float32),
        "yte": yte,
        "source": "sklearn.datasets.load_digits",
    }


def standardize(D: dict) -> dict:
    """Center and scale features on the training split (stored step, applied to test too)."""
    mu = D["Xtr"].mean(axis=0)
    sd = D["Xtr"].std(axis=0)
    sd[sd == 0] = 1.0
    return D | {
        "Xtr": ((D["Xtr"] - mu) / sd).astype(np.float32),
        "Xte": ((D["Xte"] - mu) / sd).astype(np.float32),
    }


def unitize(D: dict) -> dict:
    """Scale columns to unit norm on the training split (applied to test too). pyscnn does the
    same by default (unitize_data=True) without mapping its gates back to input space, so
    doing it here first makes its rescaling the identity and both sides solve one program."""
    nrm = np.linalg.norm(D["Xtr"].astype(np.float64), axis=0)
    nrm[nrm == 0] = 1.0
    return D | {
        "Xtr": (D["Xtr"] / nrm).astype(np.float32),
        "Xte": (D["Xte"] / nrm).astype(np.float32),
    }


# -- one independent objective ----------------------------------------------------------------


def objective_squared(X, y, G, W, lam: float, strict: bool) -> float:
    """1/(2n) ||sum_i D_i X w_i - y||^2 + lam sum_i ||w_i||_2, in float64.

    X (n, d), y (n,), G (d, p) gates, W (p, d) weights; D_i = 1[X g_i > 0] (strict, pyscnn's
    convention) or >= 0 (cvxtune's); ties X g_i == 0 are counted separately (`pattern_ties`).
    """
    X = np.asarray(X, np.float64)
    XG = X @ np.asarray(G, np.float64)
    D = XG > 0 if strict else XG >= 0
    pred = ((X @ np.asarray(W, np.float64).T) * D).sum(axis=1)
    return float(0.5 * np.mean((pred - y) ** 2) + lam * np.linalg.norm(W, axis=1).sum())


def pattern_ties(X, G) -> int:
    return int(np.count_nonzero(np.asarray(X, np.float64) @ np.asarray(G, np.float64) == 0))


def objective_cross_entropy(Z, y, G, W, b, lam: float) -> float:
    """1/n sum_j CE(softmax(sum_i D_i Z W_i + b)_j, y_j) + lam sum_i ||W_i||_* (float64).

    Z (n, d+1) with the constant column, G (d+1, p), W (p, d+1, c), b (c,), D_i = 1[Z g_i >= 0].
    """
    import torch

    Z = torch.as_tensor(np.asarray(Z), dtype=torch.float64)
    D = (Z @ torch.as_tensor(np.asarray(G), dtype=torch.float64)) >= 0
    W = torch.as_tensor(np.asarray(W), dtype=torch.float64)
    F = torch.zeros(Z.shape[0], W.shape[2], dtype=torch.float64)
    for s in range(0, W.shape[0], 64):
        F += torch.einsum("nd,pdc,np->nc", Z, W[s : s + 64], D[:, s : s + 64].double())
    F += torch.as_tensor(np.asarray(b), dtype=torch.float64)
    ce = torch.nn.functional.cross_entropy(F, torch.as_tensor(y))
    return float(ce + lam * torch.linalg.matrix_norm(W, ord="nuc").sum())


# -- utilities --------------------------------------------------------------------------------


def load_now() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def set_threads() -> None:
    import torch

    torch.set_num_threads(THREADS)


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


# -- part 1: pyscnn ---------------------------------------------------------------------------


def _pyscnn_worker(inp: str, out: str) -> None:
    """Runs inside pyscnn's virtualenv: R-FISTA with its defaults on the given gates."""
    import torch

    torch.set_num_threads(THREADS)
    from scnn.metrics import Metrics
    from scnn.models import ConvexGatedReLU
    from scnn.optimize import optimize_model
    from scnn.regularizers import NeuronGL1
    from scnn.solvers import RFISTA

    z = np.load(inp)
    X, y, G, lam = z["X"], z["y"], z["G"], float(z["lam"])
    times = []
    for _ in range(int(z["repeat"])):  # the same fit, afresh
        model = ConvexGatedReLU(G, c=1)
        metrics = Metrics()
        t0 = time.perf_counter()
        model, metrics = optimize_model(
            model, RFISTA(model), metrics, X, y, regularizer=NeuronGL1(lam), return_convex=True
        )
        times.append(time.perf_counter() - t0)
    seconds = min(times)
    W = np.asarray(model.parameters[0])[0]  # (c, p', d) -> (p', d)
    np.savez(
        out,
        W=W,
        G=np.asarray(model.G),
        seconds=seconds,
        all_seconds=np.asarray(times),
        own_objective=np.asarray(metrics.objective, dtype=np.float64),
        own_time=np.asarray(metrics.time, dtype=np.float64),
    )


def run_pyscnn(X, y, G, lam, repeat: int = 1) -> dict | None:
    if not Path(PYSCNN_PYTHON).exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = f"{tmp}/in.npz", f"{tmp}/out.npz"
        np.savez(inp, X=X, y=y, G=G, lam=lam, repeat=repeat)
        env = os.environ | {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
        r = subprocess.run(
            [PYSCNN_PYTHON, __file__, "--pyscnn-worker", inp, out],
            capture_output=True,
            text=True,
            env=env,
        )
        if r.returncode != 0:
            raise RuntimeError(f"pyscnn worker failed:\n{r.stderr[-3000:]}")
        z = np.load(out)
        return {k: z[k] for k in z.files}


def fit_cvxtune_squared(X, y, G, lam, device: str, working_set: bool, max_iter: int) -> dict:
    import torch

    from solver import ConvexMLPRegressor

    trace: list[tuple[float, float, float]] = []
    Xt = torch.as_tensor(X).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()

    def progress(frac, info):
        if "objective" in info and "iteration" in info:
            trace.append((time.perf_counter() - t0, float(info["objective"]), float(info["gap"])))

    est = ConvexMLPRegressor(
        gates=G,
        lam=lam,
        penalty="frobenius",
        loss="squared",
        fit_intercept=False,
        working_set=working_set,
        max_iter=max_iter,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-convergence is recorded in the row (gap, n_iter)
        est.fit(Xt, y, progress=progress)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "est": est, "trace": trace}


def lam_max_squared(X, y, G) -> float:
    """max_i ||(D_i X)^T y|| / n for the program without intercept (W = 0 iff lam >= this)."""
    X = np.asarray(X, np.float64)
    D = (X @ G) > 0
    return float(np.linalg.norm(X.T @ (D * y[:, None]), axis=0).max() / len(y))


def binary_tasks(name: str, D: dict, quick: bool, max_tasks: int = 2) -> list[tuple[str, dict]]:
    def task(label, fn, keep=None):
        tr = np.ones(len(D["ytr"]), bool) if keep is None else keep(D["ytr"])
        te = np.ones(len(D["yte"]), bool) if keep is None else keep(D["yte"])
        return (
            label,
            {
                "Xtr": D["Xtr"][tr],
                "ytr": np.where(fn(D["ytr"][tr]), 1.0, -1.0),
                "Xte": D["Xte"][te],
                "yte": np.where(fn(D["yte"][te]), 1.0, -1.0),
            },
        )

    if name == "fashion":
        tasks = [
            task("T-shirt(0) vs shirt(6)", lambda y: y == 0, lambda y: (y == 0) | (y == 6)),
            task("tops(0,2,4,6) vs rest", lambda y: np.isin(y, [0, 2, 4, 6])),
        ]
    else:
        tasks = [
            task("even vs odd", lambda y: y % 2 == 0),
            task("3 vs 8", lambda y: y == 3, lambda y: (y == 3) | (y == 8)),
        ]
    return tasks[:1] if quick else tasks[:max_tasks]


def bench_pyscnn(datasets: dict, args) -> list[dict]:
    rows = []
    p = 64 if args.quick else args.binary_gates
    ratios = [1e-2] if args.quick else args.ratios
    for dname, D in datasets.items():
        for tname, T in binary_tasks(dname, D, args.quick, args.max_tasks):
            T = unitize(T)  # per task, on its own rows: a subset of unit columns is not unit
            X, y = T["Xtr"], T["ytr"]
            G = np.random.default_rng(778).standard_normal((X.shape[1], p))
            lmax = lam_max_squared(X, y, G)
            for ratio in ratios:
                lam = ratio * lmax
                ps = run_pyscnn(X, y, G, lam, args.repeat)
                obj_ps = None
                base = {
                    "dataset": dname,
                    "task": tname,
                    "n": len(y),
                    "d": X.shape[1],
                    "p": p,
                    "lam": lam,
                    "lam_over_lam_max": ratio,
                    "pattern_ties": pattern_ties(X, G),
                }
                if ps is not None:
                    Wp, Gp = ps["W"], ps["G"]
                    obj_ps = objective_squared(X, y, Gp, Wp, lam, strict=True)
                    pred = ((T["Xte"] @ Wp.T) * ((T["Xte"] @ Gp) > 0)).sum(axis=1)
                    base |= {
                        "pyscnn_seconds": float(ps["seconds"]),
                        "pyscnn_all_seconds": [float(t) for t in ps["all_seconds"]],
                        "pyscnn_objective": obj_ps,
                        "pyscnn_iters_logged": len(ps["own_objective"]),
                        "pyscnn_own_final_objective": float(ps["own_objective"][-1]),
                        "pyscnn_test_acc": float(np.mean(np.sign(pred) == T["yte"])),
                        "pyscnn_neurons": int(np.count_nonzero(np.linalg.norm(Wp, axis=1))),
                    }
                for ws in args.working_sets:
                    runs = [
                        fit_cvxtune_squared(X, y, G, lam, "cpu", ws, args.max_iter)
                        for _ in range(args.repeat)
                    ]
                    ours = min(runs, key=lambda r: r["seconds"])
                    est = ours["est"]
                    Gc, Wc = _np(est.gates_), _np(est.weights_)[:, :, 0]
                    row = base | {
                        "cvx_working_set": ws,
                        "cvx_max_iter": args.max_iter,
                        "load": load_now(),
                        "cvx_seconds": ours["seconds"],
                        "cvx_all_seconds": [r["seconds"] for r in runs],
                        "cvx_n_iter": est.n_iter_,
                        "cvx_gap": est.duality_gap_,
                        "cvx_own_objective": est.objective_,
                        "cvx_objective": objective_squared(X, y, Gc, Wc, lam, strict=False),
                        "cvx_objective_strict": objective_squared(X, y, Gc, Wc, lam, strict=True),
                        "cvx_test_acc": float(np.mean(np.sign(est.predict(T["Xte"])) == T["yte"])),
                        "cvx_neurons": est.n_neurons_,
                    }
                    if obj_ps is not None:
                        row |= {
                            "speedup": row["pyscnn_seconds"] / ours["seconds"],
                            "cvx_seconds_to_pyscnn_objective": next(
                                (t for t, o, _ in ours["trace"] if o <= obj_ps), None
                            ),
                            "objective_rel_diff": (row["cvx_objective"] - obj_ps) / abs(obj_ps),
                        }
                    rows.append(row)
                    print(_fmt_row(row), flush=True)
    return rows


def _fmt_row(r: dict) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, list) and all(isinstance(x, float) for x in v):
            return "[" + " ".join(f"{x:.3g}" for x in v) + "]"
        return str(v)

    return "  " + ", ".join(f"{k}={fmt(v)}" for k, v in r.items())


# -- parts 2 and 3: the multi-class convex head, Adam, scikit-learn -----------------------------


def lam_max_cross_entropy(Z, y, G) -> float:
    """max_i ||(D_i Z)^T theta_0||_2 (spectral), theta_0 = (Y - class frequencies) / n: the
    gradient at W = 0 with the optimal output bias (W = 0 iff lam >= this)."""
    Y = np.eye(int(y.max()) + 1)[y]
    theta = (Y - Y.mean(axis=0)) / len(y)
    D = (Z @ G) >= 0
    return max(float(np.linalg.norm(Z.T @ (D[:, [i]] * theta), 2)) for i in range(G.shape[1]))


def fit_convex_classifier(D: dict, gates: int, lam, device: str, args) -> dict:
    import torch

    from solver import ConvexMLPClassifier

    Xt = torch.as_tensor(D["Xtr"]).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    est = ConvexMLPClassifier(
        gates=gates,
        lam=lam,
        penalty="nuclear",
        loss="cross_entropy",
        fit_intercept=True,
        random_state=0,
        max_iter=args.mc_max_iter or args.max_iter,
        working_set=bool(args.mc_working_set),
        pricing_rounds=args.pricing_rounds,
        pricing_gates=args.pricing_gates,
    )
    trace: list[tuple[float, float]] = []

    def progress(frac, info):
        if "objective" in info and "iteration" in info:
            trace.append((time.perf_counter() - t0, float(info["objective"])))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-convergence is recorded in the row
        est.fit(Xt, D["ytr"], progress=progress)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    Z = np.hstack([D["Xtr"], np.ones((len(D["ytr"]), 1), np.float32)])
    obj = objective_cross_entropy(
        Z, D["ytr"], _np(est.gates_), _np(est.weights_), _np(est.intercept_), est.lam_
    )
    pred = np.asarray(est.predict(torch.as_tensor(D["Xte"]).to(device)))
    acc = float(np.mean(pred == D["yte"]))
    return {
        "est": est,
        "seconds": seconds,
        "objective": obj,
        "test_acc": acc,
        "pred": pred,
        "trace": trace,
    }


def adam_run(
    D: dict,
    width: int,
    lam: float,
    lr: float,
    seed: int,
    target: float,
    max_epochs: int,
    max_seconds: float,
    batch: int = 128,
) -> dict:
    """Two-layer ReLU head, minibatch Adam on CE + lam/2 (||W1||^2 + ||b1||^2 + ||W2||^2).

    The hidden bias is penalized (it is the last row of the convex program's W_i), the output
    bias is not. The objective is evaluated on the whole training set after every epoch; the
    clock (training time only) is stopped meanwhile.
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)
    X = torch.as_tensor(D["Xtr"], dtype=torch.float32)
    y = torch.as_tensor(D["ytr"])
    c = int(D["ytr"].max()) + 1
    hid, out = nn.Linear(X.shape[1], width), nn.Linear(width, c)
    params = list(hid.parameters()) + list(out.parameters())
    opt = torch.optim.Adam(params, lr=lr)

    def reg():
        return (
            0.5
            * lam
            * (hid.weight.square().sum() + hid.bias.square().sum() + out.weight.square().sum())
        )

    def full_objective() -> float:
        with torch.no_grad():
            F = out(torch.relu(hid(X))).double()
            return float(nn.functional.cross_entropy(F, y) + reg().double())

    gen = torch.Generator().manual_seed(seed)
    train_s, reach, best, hist = 0.0, None, float("inf"), []
    epoch = 0
    for epoch in range(max_epochs):  # noqa: B007 (read after the loop)
        t0 = time.perf_counter()
        for idx in torch.randperm(len(y), generator=gen).split(batch):
            loss = nn.functional.cross_entropy(out(torch.relu(hid(X[idx]))), y[idx]) + reg()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        train_s += time.perf_counter() - t0
        obj = full_objective()
        hist.append((train_s, obj))
        best = min(best, obj)
        if reach is None and obj <= target:
            reach = train_s
        if train_s > max_seconds or not np.isfinite(obj):
            break
    with torch.no_grad():
        pred = out(torch.relu(hid(torch.as_tensor(D["Xte"])))).argmax(1).numpy()
    return {
        "lr": lr,
        "seed": seed,
        "epochs": epoch + 1,
        "seconds": train_s,
        "final_objective": hist[-1][1],
        "best_objective": best,
        "seconds_to_convex": reach,
        "test_acc": float(np.mean(pred == D["yte"])),
        "pred": pred,
    }


def paired(ours: np.ndarray, theirs: np.ndarray, y: np.ndarray) -> dict:
    """McNemar's exact test on one test set: images only the convex head gets right (b), only
    the other model gets right (c), and the two-sided binomial p-value of b against c. Two
    accuracies 0.005 apart on 2000 images are often within chance; this says whether."""
    from scipy.stats import binomtest

    a, t = ours == y, theirs == y
    b, c = int((a & ~t).sum()), int((~a & t).sum())
    p = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    return {"only_convex": b, "only_other": c, "p_value": float(p)}


def bench_multiclass(datasets: dict, args) -> list[dict]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    rows = []
    for dname, D in datasets.items():
        S = standardize(D)
        gates = 64 if args.quick else args.gates
        lam, lmax = args.lam, None
        if lam != "auto" and not args.lam_absolute:
            # the same gates the estimator will sample (random_state=0), to get lam_max first
            from solver import ConvexMLPClassifier

            probe = ConvexMLPClassifier(gates=gates, lam=1.0, random_state=0, max_iter=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                probe.fit(S["Xtr"], S["ytr"])
            Z = np.hstack([S["Xtr"], np.ones((len(S["ytr"]), 1), np.float32)]).astype(np.float64)
            lmax = lam_max_cross_entropy(Z, S["ytr"], _np(probe.gates_).astype(np.float64))
            lam = args.lam * lmax
        cv = fit_convex_classifier(S, gates, lam, "cpu", args)
        est = cv["est"]
        row = {
            "dataset": dname,
            "n": len(S["ytr"]),
            "d": S["Xtr"].shape[1],
            "gates": gates,
            "lam": est.lam_,
            "lam_arg": args.lam,
            "lam_max": lmax,
            "cvx_lam_max": getattr(est, "lam_max_", None),
            "load": load_now(),
            "cvx_working_set": bool(args.mc_working_set),
            "cvx_max_iter": args.mc_max_iter or args.max_iter,
            "cvx_seconds": cv["seconds"],
            "cvx_objective": cv["objective"],
            "cvx_own_objective": est.objective_,
            "cvx_gap": est.duality_gap_,
            "cvx_n_iter": est.n_iter_,
            "cvx_neurons": est.n_neurons_,
            "cvx_pricing_violation": est.pricing_violation_,
            "cvx_pricing_added": est.pricing_added_,
            "cvx_gates_final": int(est.gates_.shape[1]),
            "cvx_test_acc": cv["test_acc"],
        }
        if "adam" in args.only:
            width = max(1, est.n_neurons_)
            lrs = [1e-3, 1e-2] if args.quick else [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
            seeds = [0] if args.quick else [0, 1, 2]
            budget = min(args.adam_seconds, max(5.0, 3 * cv["seconds"]))
            runs = [
                adam_run(S, width, est.lam_, lr, s, cv["objective"], args.adam_epochs, budget)
                for lr in lrs
                for s in seeds
            ]
            best = min(runs, key=lambda r: r["best_objective"])
            row["paired_vs_adam_best"] = paired(cv["pred"], best["pred"], S["yte"])
            for r in runs:
                del r["pred"]
            reached = [r for r in runs if r["seconds_to_convex"] is not None]
            at_budget = [o for t, o in cv["trace"] if t <= budget]
            row |= {
                "cvx_objective_at_adam_budget": min(at_budget) if at_budget else None,
                "cvx_seconds_to_adam_best": next(
                    (t for t, o in cv["trace"] if o <= min(r["best_objective"] for r in runs)), None
                ),
                "adam_width": width,
                "adam_budget_s": budget,
                "adam_runs": runs,
                "adam_best_objective": best["best_objective"],
                "adam_best_lr": best["lr"],
                "adam_best_seed": best["seed"],
                "adam_best_test_acc": best["test_acc"],
                "adam_max_test_acc": max(r["test_acc"] for r in runs),
                "adam_n_reached_convex": len(reached),
                "adam_fastest_to_convex_s": min(
                    (r["seconds_to_convex"] for r in reached), default=None
                ),
            }
        if "sklearn" in args.only:
            for name, model in (
                ("logreg", LogisticRegression(max_iter=2000)),
                ("mlp", MLPClassifier(random_state=0, max_iter=200)),
            ):
                t0 = time.perf_counter()
                model.fit(S["Xtr"], S["ytr"])
                row[f"{name}_seconds"] = time.perf_counter() - t0
                pred = model.predict(S["Xte"])
                row[f"{name}_test_acc"] = float(np.mean(pred == S["yte"]))
                row[f"paired_vs_{name}"] = paired(cv["pred"], pred, S["yte"])
        rows.append(row)
        print(_fmt_row({k: v for k, v in row.items() if k != "adam_runs"}), flush=True)
    return rows


# -- part 4: scaling --------------------------------------------------------------------------


def _scaling_point(n: int, p: int, d: int, c: int, iters: int, device: str) -> dict:
    """One point, in a fresh process: seconds per FISTA iteration and peak memory.

    Synthetic Gaussian X (n, d), labels from a random two-layer ReLU teacher, cross-entropy,
    nuclear penalty, all gates (working_set=False), lam = 1e-3. Time per iteration is
    (fit(max_iter=1 + iters) - fit(max_iter=1)) / iters, so setup (patterns, lam_max,
    certificates, pricing) cancels; in wall time and in this process's CPU time (the latter
    is what a loaded machine disturbs least). CPU memory: peak RSS of this process
    (getrusage), less the RSS before the fits; CUDA: torch.cuda.max_memory_allocated.
    """
    import resource
    import warnings

    import psutil
    import torch

    from solver import ConvexMLPClassifier

    torch.set_num_threads(THREADS)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g)
    teacher = torch.relu(X @ torch.randn(d, 32, generator=g)) @ torch.randn(32, c, generator=g)
    y = teacher.argmax(1).numpy()
    X = X.to(device)
    base_rss = psutil.Process().memory_info().rss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    times, cpu_times = {}, {}
    for k in (1, 1, 1 + iters):  # the first fit warms up (CUDA context, kernels)
        est = ConvexMLPClassifier(
            gates=p,
            lam=1e-3,
            penalty="nuclear",
            loss="cross_entropy",
            random_state=0,
            working_set=False,
            max_iter=k,
            tol=1e-12,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if device == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            est.fit(X, y)
            if device == "cuda":
                torch.cuda.synchronize()
            times[k] = time.perf_counter() - t0
            cpu_times[k] = time.process_time() - c0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {
        "n": n,
        "p": p,
        "d": d,
        "c": c,
        "p_unique": int(est.gates_.shape[1]),
        "n_iter": est.n_iter_,
        "s_per_iter": (times[1 + iters] - times[1]) / iters,
        "cpu_s_per_iter": (cpu_times[1 + iters] - cpu_times[1]) / iters,
        "fit1_s": times[1],
        "peak_rss_mb": peak_rss / 2**20,
        "peak_rss_over_base_mb": (peak_rss - base_rss) / 2**20,
        "device": device,
    }
    if device == "cuda":
        out["peak_cuda_mb"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    return out


def bench_scaling(args) -> list[dict]:
    d, c = 128, 10
    iters = 3 if args.quick else args.scaling_iters
    if args.quick:
        grid = [(2_000, 128), (8_000, 128), (4_000, 64), (4_000, 512)]
    else:
        grid = [(n, 256) for n in args.scaling_n]
        grid += [(args.scaling_p_at, p) for p in args.scaling_p]
    rows = []
    for n, p in grid:
        r = subprocess.run(
            [
                sys.executable,
                __file__,
                "--scaling-point",
                str(n),
                str(p),
                str(d),
                str(c),
                str(iters),
                args.device,
            ],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            row = {"n": n, "p": p, "error": r.stderr[-2000:]}
        else:
            row = json.loads(r.stdout.strip().splitlines()[-1]) | {"load": load_now()}
        rows.append(row)
        print(_fmt_row(row), flush=True)
    return rows


# -- main ------------------------------------------------------------------------------------


def _paired_cell(row: dict, other: str) -> str | None:
    pr = row.get(f"paired_vs_{other}")
    return None if pr is None else f"{pr['only_convex']} / {pr['only_other']} ({pr['p_value']:.2f})"


def print_tables(res: dict) -> None:
    def table(title, rows, cols):
        if not rows:
            return
        print(f"\n## {title}")
        print("| " + " | ".join(h for h, _ in cols) + " |")
        print("|" + "---|" * len(cols))
        for r in rows:
            cells = []
            for _, key in cols:
                v = r.get(key) if isinstance(key, str) else key(r)
                cells.append(f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v)))
            print("| " + " | ".join(cells) + " |")

    table(
        "pyscnn vs cvxtune (binary, squared loss, group L2, same gates)",
        res.get("pyscnn", []),
        [
            ("dataset", "dataset"),
            ("task", "task"),
            ("n", "n"),
            ("p", "p"),
            ("lam/lam_max", "lam_over_lam_max"),
            ("working set", "cvx_working_set"),
            ("pyscnn s", "pyscnn_seconds"),
            ("cvxtune s", "cvx_seconds"),
            ("speedup", "speedup"),
            ("pyscnn obj", "pyscnn_objective"),
            ("cvxtune obj", "cvx_objective"),
            ("rel diff", "objective_rel_diff"),
            ("cvx s to pyscnn obj", "cvx_seconds_to_pyscnn_objective"),
            ("cvx gap", "cvx_gap"),
            ("cvx iters", "cvx_n_iter"),
            ("acc pyscnn", "pyscnn_test_acc"),
            ("acc cvx", "cvx_test_acc"),
        ],
    )
    table(
        "multi-class: convex head vs Adam vs scikit-learn",
        res.get("multiclass", []),
        [
            ("dataset", "dataset"),
            ("n", "n"),
            ("gates (after pricing)", lambda r: f"{r['gates']} ({r.get('cvx_gates_final')})"),
            ("lam", "lam"),
            ("cvx s", "cvx_seconds"),
            ("cvx obj", "cvx_objective"),
            ("cvx gap", "cvx_gap"),
            ("neurons", "cvx_neurons"),
            ("cvx acc", "cvx_test_acc"),
            ("adam best obj", "adam_best_objective"),
            ("adam s/run", "adam_budget_s"),
            ("cvx obj at adam s", "cvx_objective_at_adam_budget"),
            ("cvx s to adam best", "cvx_seconds_to_adam_best"),
            ("adam runs reaching", "adam_n_reached_convex"),
            ("adam s to cvx obj", "adam_fastest_to_convex_s"),
            ("adam acc (best obj)", "adam_best_test_acc"),
            ("adam acc (max)", "adam_max_test_acc"),
            ("logreg s", "logreg_seconds"),
            ("logreg acc", "logreg_test_acc"),
            ("mlp s", "mlp_seconds"),
            ("mlp acc", "mlp_test_acc"),
            ("vs mlp: only cvx / only mlp (p)", lambda r: _paired_cell(r, "mlp")),
            ("vs adam: only cvx / only adam (p)", lambda r: _paired_cell(r, "adam_best")),
        ],
    )
    table(
        "scaling (synthetic, d=128, c=10, CE + nuclear, all gates)",
        res.get("scaling", []),
        [
            ("n", "n"),
            ("p", "p"),
            ("unique p", "p_unique"),
            ("s/iter", "s_per_iter"),
            ("CPU s/iter", "cpu_s_per_iter"),
            ("peak RSS MB", "peak_rss_mb"),
            ("RSS over base MB", "peak_rss_over_base_mb"),
            ("peak CUDA MB", "peak_cuda_mb"),
        ],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--only", default="pyscnn,adam,sklearn,scaling")
    ap.add_argument("--datasets", default="digits,fashion")
    ap.add_argument("--device", default="cpu", help="device for the scaling part")
    ap.add_argument("--binary-gates", type=int, default=128, help="gates of the pyscnn part")
    ap.add_argument("--ratios", default="1e-2", help="pyscnn part: lam / lam_max, comma-separated")
    ap.add_argument(
        "--working-sets",
        default="1,0",
        help="pyscnn part: cvxtune working_set values to run (1 = the default)",
    )
    ap.add_argument("--max-iter", type=int, default=2000, help="cvxtune max_iter (both parts)")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="pyscnn part: fits per side, the fastest reported (a noisy VM's timings vary 2x)",
    )
    ap.add_argument("--scaling-n", default="1000,5000,20000,60000", help="n grid at p=256")
    ap.add_argument("--scaling-p", default="64,256,1024,4096", help="p grid")
    ap.add_argument("--scaling-p-at", type=int, default=10_000, help="n of the p grid")
    ap.add_argument("--scaling-iters", type=int, default=10, help="iterations timed per point")
    ap.add_argument("--max-tasks", type=int, default=2, help="binary tasks per dataset (1 or 2)")
    ap.add_argument("--mc-max-iter", type=int, default=None, help="multi-class max_iter")
    ap.add_argument("--gates", type=int, default=128, help="gates of the multi-class head")
    ap.add_argument(
        "--lam",
        default="1e-2",
        help='multi-class lam: "auto", or a number r meaning lam = r * lam_max',
    )
    ap.add_argument(
        "--lam-absolute",
        action="store_true",
        help="multi-class: --lam is lam itself, not a ratio (to compare gate counts at one lam)",
    )
    ap.add_argument(
        "--mc-working-set",
        type=int,
        default=0,
        help="multi-class cvxtune working_set (see README for why 0)",
    )
    ap.add_argument(
        "--pricing-rounds", type=int, default=0, help="multi-class: column-generation rounds"
    )
    ap.add_argument(
        "--pricing-gates", type=int, default=256, help="multi-class: fresh gates priced per round"
    )
    ap.add_argument("--adam-seconds", type=float, default=30.0, help="cap per Adam run")
    ap.add_argument("--adam-epochs", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.only = args.only.split(",")
    args.lam = args.lam if args.lam == "auto" else float(args.lam)
    args.ratios = [float(r) for r in args.ratios.split(",")]
    if args.quick:
        args.max_iter = min(args.max_iter, 300)
        args.adam_seconds = min(args.adam_seconds, 3.0)
    args.scaling_n = [int(v) for v in args.scaling_n.split(",") if v]
    args.scaling_p = [int(v) for v in args.scaling_p.split(",") if v]
    args.working_sets = [bool(int(w)) for w in args.working_sets.split(",")]
    sys.path.insert(0, str(ROOT))
    set_threads()
    import torch

    names = args.datasets.split(",")
    datasets = {}
    if "digits" in names:
        datasets["digits"] = digits_data()
    if "fashion" in names and set(args.only) - {"scaling"}:
        datasets["fashion"] = fashion_embeddings()
    res: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_at_start": load_now(),
        },
        "data_sources": {k: v["source"] for k, v in datasets.items()},
    }
    if "pyscnn" in args.only:
        res["pyscnn"] = bench_pyscnn(datasets, args)
    if "adam" in args.only or "sklearn" in args.only:
        res["multiclass"] = bench_multiclass(datasets, args)
    if "scaling" in args.only:
        res["scaling"] = bench_scaling(args)
    res["machine"]["load_at_end"] = load_now()
    print_tables(res)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"solver-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(res, indent=1, default=str))
    print(
        f"\nwrote {out} (load at start {res['machine']['load_at_start']}, "
        f"end {res['machine']['load_at_end']})"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pyscnn-worker"]:
        _pyscnn_worker(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["--scaling-point"]:
        sys.path.insert(0, str(ROOT))
        n, p, d, c, iters = map(int, sys.argv[2:7])
        print(json.dumps(_scaling_point(n, p, d, c, iters, sys.argv[7])))
    elif sys.argv[1:2] == ["--prepare"]:
        t = time.perf_counter()
        D = fashion_embeddings()
        print(D["Xtr"].shape, D["Xte"].shape, D["source"], f"{time.perf_counter() - t:.0f}s")
    else:
        main()
