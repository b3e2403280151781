"""Benchmark of the convex heads: MLP, CNN and attention on EfficientNet-Lite0 features.

    python bench/heads.py [--heads mlp,cnn,attention] [--train 10000] [--test 2000]
                          [--adam-seconds 60] [--lrs 1e-4,3e-4,1e-3,3e-3,1e-2] [--seeds 0,1,2]
                          [--lam-ratio 0.01|auto] [--device cpu|cuda] [--convex-only]

Data: Fashion-MNIST (Debian's dataset-fashion-mnist), the last feature map (1280 x 7 x 7) of
tf_efficientnet_lite0 from bench/heads_data.py (cached). The MLP head gets its spatial mean (the
pooled embedding, standardised), the CNN head the map, the attention head its 49 positions as
tokens.

For every head: the convex fit (time, objective, duality gap, test accuracy, width kept); then
networks of the same shape and width trained with minibatch Adam on the same objective (every
learning rate x seed, each run capped at min(--adam-seconds, 2 x the convex fit's time)):
  relu    the nonconvex counterpart (ReLU MLP, Conv-ReLU-pool-Linear, multi-head linear
          attention), randomly initialised;
  gated   the same network with the convex head's gates held fixed (MLP and CNN heads; linear
          attention has no gates).
Each network sees the inputs the convex head sees after its stored, fixed preprocessing (the
MLP's [x, 1]; the CNN's PCA projection; the attention head's whitened projection with a
constant 1), so all sides minimise the same objective: CE + lam/2 (sum of squared first- and
second-layer weights, first-layer biases included, output bias free). As a check, that
objective evaluated at the network recovered from the convex solution is reported beside the
solver's own (``objective_check``). The objective is evaluated on the whole training set after
every epoch, off the clock. Results: a table on stdout and JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, str(THREADS))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import solver as cvx  # noqa: E402

sys.path.insert(1, str(ROOT / "bench"))
from heads_data import _bench_solver, feature_maps  # noqa: E402

RESULTS = ROOT / "bench" / "results"


# -- the networks trained with Adam, on fixed preprocessed inputs -----------------------------


class MLPNet(nn.Module):
    """z (n, d+1) -> sum_k act_k(z . u_k) v_k + b; act = relu, or a fixed gate's step."""

    def __init__(self, d: int, width: int, c: int, gates: torch.Tensor | None):
        super().__init__()
        self.U = nn.Parameter(torch.randn(d, width) / d**0.5)
        self.V = nn.Parameter(torch.randn(width, c) / width**0.5)
        self.b = nn.Parameter(torch.zeros(c))
        self.register_buffer("G", gates)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z @ self.U
        h = torch.relu(h) if self.G is None else h * (z @ self.G >= 0).to(h.dtype)
        return h @ self.V + self.b

    def penalty(self) -> torch.Tensor:
        return self.U.square().sum() + self.V.square().sum()


class CNNNet(nn.Module):
    """z (n, h+1, H, W) (a constant-1 channel appended) -> 1x1 conv -> act -> mean -> linear."""

    def __init__(self, h: int, width: int, c: int, gates: torch.Tensor | None):
        super().__init__()
        self.U = nn.Parameter(torch.randn(h, width) / h**0.5)
        self.V = nn.Parameter(torch.randn(width, c) / width**0.5)
        self.b = nn.Parameter(torch.zeros(c))
        self.register_buffer("G", gates)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("nchw,ck->nkhw", z, self.U)
        if self.G is None:
            h = torch.relu(h)
        else:
            h = h * (torch.einsum("nchw,ck->nkhw", z, self.G) >= 0).to(h.dtype)
        return h.mean(dim=(2, 3)) @ self.V + self.b

    def penalty(self) -> torch.Tensor:
        return self.U.square().sum() + self.V.square().sum()


class AttentionNet(nn.Module):
    """Multi-head linear attention, mean pooled: b + sum_j zbar^T W1_j C W2_j with
    zbar = mean of the tokens and C = z^T z / T (exactly the convex head's model)."""

    def __init__(self, d: int, width: int, c: int):
        super().__init__()
        self.W1 = nn.Parameter(torch.randn(width, d, d) / d)
        self.W2 = nn.Parameter(torch.randn(width, d, c) / d**0.5)
        self.b = nn.Parameter(torch.zeros(c))

    def forward(self, inp: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        zbar, C = inp
        left = torch.einsum("na,mak->nmk", zbar, self.W1)
        return torch.einsum("nmk,nkl,mlc->nc", left, C, self.W2) + self.b

    def penalty(self) -> torch.Tensor:
        return self.W1.square().sum() + self.W2.square().sum()


def _take(inp, idx):
    return tuple(t[idx] for t in inp) if isinstance(inp, tuple) else inp[idx]


def _objective(net: nn.Module, inp, y: torch.Tensor, lam: float, chunk: int = 2000) -> float:
    with torch.no_grad():
        n = len(y)
        ce = sum(
            float(
                nn.functional.cross_entropy(
                    net(_take(inp, slice(s, s + chunk))).double(), y[s : s + chunk], reduction="sum"
                )
            )
            for s in range(0, n, chunk)
        )
        return ce / n + 0.5 * lam * float(net.penalty())


def _accuracy(net: nn.Module, inp, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(inp).argmax(1) == y).double().mean())


def adam_run(make, inp, y, inp_te, y_te, lam, lr, seed, target, max_seconds, max_epochs=500):
    torch.manual_seed(seed)
    net = make()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    train_s, reach, best, epoch = 0.0, None, float("inf"), 0
    last = float("inf")
    for epoch in range(max_epochs):  # noqa: B007 (read after the loop)
        t0 = time.perf_counter()
        for idx in torch.randperm(len(y), generator=gen).split(128):
            loss = nn.functional.cross_entropy(net(_take(inp, idx)), y[idx])
            loss = loss + 0.5 * lam * net.penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        train_s += time.perf_counter() - t0
        last = _objective(net, inp, y, lam)
        best = min(best, last)
        if reach is None and last <= target:
            reach = train_s
        if train_s > max_seconds or not np.isfinite(last):
            break
    return {
        "lr": lr,
        "seed": seed,
        "epochs": epoch + 1,
        "seconds": train_s,
        "final_objective": last,
        "best_objective": best,
        "seconds_to_convex": reach,
        "test_acc": _accuracy(net, inp_te, y_te),
    }


# -- convex fits and the inputs their counterparts see ----------------------------------------


def _probe_lam_max(cls, X, y, **kw) -> float:
    probe = cls(lam=1e6, max_iter=1, random_state=0, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe.fit(X, y)
    return float(probe.lam_max_)


def select_lam(cls, X, y, kw: dict, args) -> dict:
    """lam as a user gets it: the estimator's own lam="auto" (a geometric path from lam_max on
    a split of the training set, warm-started, the least validation loss wins), with short
    solves (--path-max-iter). Its time is reported, not added to the fit's."""
    est = cls(
        lam="auto",
        n_lams=args.path_lams,
        lam_min_ratio=args.path_min_ratio,
        max_iter=args.path_max_iter,
        random_state=0,
        **kw,
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X, y)
    return {
        "lam": float(est.lam_),
        "lam_max": float(est.lam_max_),
        "lam_over_lam_max": float(est.lam_ / est.lam_max_),
        "seconds": time.perf_counter() - t0,
        "path": est.path_,
    }


def convex_fit(kind: str, D: dict, args) -> dict:
    if kind == "mlp":
        X = D["Mtr"].astype(np.float32).mean(axis=(2, 3))
        Xte = D["Mte"].astype(np.float32).mean(axis=(2, 3))
        mu, sd = X.mean(axis=0), X.std(axis=0) + 1e-6
        Xtr, Xte = (X - mu) / sd, (Xte - mu) / sd
        cls, kw = cvx.ConvexMLPClassifier, {"gates": args.gates}
    elif kind == "cnn":
        Xtr, Xte = D["Mtr"].astype(np.float32), D["Mte"].astype(np.float32)
        cls, kw = cvx.ConvexCNNClassifier, {"gates": args.gates, "n_components": args.components}
        if args.cnn_cache_gb is not None:
            kw["cache_bytes"] = int(args.cnn_cache_gb * (1 << 30))
    else:
        Xtr = D["Mtr"].astype(np.float32).reshape(len(D["ytr"]), 1280, -1).transpose(0, 2, 1)
        Xte = D["Mte"].astype(np.float32).reshape(len(D["yte"]), 1280, -1).transpose(0, 2, 1)
        cls, kw = cvx.ConvexAttentionClassifier, {"n_components": args.attn_components}
    # On a GPU the solver runs where its input lives; predictions come back as numpy.
    Xfit = torch.as_tensor(Xtr, device=args.device)
    selection = None
    if args.lam_ratio == "auto":  # the path's estimator knows lam_max too: no probe
        selection = select_lam(cls, Xfit, D["ytr"], kw, args)
        lam, lam_max = selection["lam"], selection["lam_max"]
    else:
        lam_max = _probe_lam_max(cls, Xfit, D["ytr"], **kw)
        lam = float(args.lam_ratio) * lam_max
    est = cls(lam=lam, max_iter=args.max_iter, random_state=0, **kw)
    trace: list[tuple[float, float]] = []
    t0 = time.perf_counter()

    def progress(frac, info):
        if "objective" in info:
            trace.append((time.perf_counter() - t0, float(info["objective"])))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-convergence is recorded in the row
        est.fit(Xfit, D["ytr"], progress=progress)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    pred = np.asarray(est.predict(Xte))
    acc = float(np.mean(pred == D["yte"]))
    width = int(getattr(est, "n_neurons_", getattr(est, "n_heads_", 0)))
    return {
        "est": est,
        "Xtr": Xtr,
        "Xte": Xte,
        "row": {
            "head": kind,
            "device": args.device,
            "params": {k: v for k, v in est.get_params().items() if k != "gates"}
            | {"gates": kw.get("gates")},
            "lam": lam,
            "lam_max": lam_max,
            "cvx_seconds": seconds,
            "cvx_objective": est.objective_,
            "cvx_gap": est.duality_gap_,
            "cvx_n_iter": est.n_iter_,
            "cvx_converged": bool(est.converged_),
            "cvx_width": width,
            "cvx_test_acc": acc,
            "cvx_test_pred": pred.tolist(),  # for paired tests between the heads
            # The first report comes after the setup and FISTA's first certificate check.
            "cvx_first_report_s": trace[0][0] if trace else None,
            "lam_selection": selection,
        },
        "trace": trace,
    }


def _timed(prep, fit: dict):
    """prep(training inputs), its seconds recorded in the row: the preprocessing the
    counterparts get off their clock (the convex fit's time includes it)."""
    t0 = time.perf_counter()
    out = prep(fit["Xtr"])
    fit["row"]["counterpart_inputs_s"] = time.perf_counter() - t0
    return out


def counterpart_inputs(kind: str, fit: dict):
    """The fixed inputs (train, test) of the Adam-trained networks, and their factories."""
    est = fit["est"]
    width = max(1, fit["row"]["cvx_width"])
    c = len(est.classes_)
    if kind == "mlp":

        def prep(X):
            X = torch.as_tensor(X, dtype=torch.float32)
            return torch.cat([X, torch.ones(len(X), 1)], dim=1)

        inp, inp_te = _timed(prep, fit), prep(fit["Xte"])
        owner = est._neurons[0]
        G = est.gates_.to(torch.float32)[:, owner]
        d = inp.shape[1]
        makers = {
            "relu": lambda: MLPNet(d, width, c, None),
            "gated": lambda: MLPNet(d, width, c, G),
        }
        net = MLPNet(d, width, c, G)
        _, U, V = est._neurons
        recovered = (U, V)
    elif kind == "cnn":
        module = est.to_torch()
        project = module.project if hasattr(module, "project") else module[0]

        def prep(X):
            out = []
            with torch.no_grad():
                for s in range(0, len(X), 1000):
                    z = project(torch.as_tensor(X[s : s + 1000]).to(project.weight.dtype))
                    out.append(torch.cat([z, torch.ones_like(z[:, :1])], dim=1).float())
            return torch.cat(out)

        inp, inp_te = _timed(prep, fit), prep(fit["Xte"])
        owner = est._neurons[0]
        P = est.gates_.shape[0]
        if est.gates_.shape[2:] != (1, 1):
            raise SystemExit("bench/heads.py compares 1x1 CNN heads only")
        G = torch.cat([est.gates_.reshape(P, -1), est.gate_bias_.unsqueeze(1)], dim=1)
        G = G.float()[owner].T
        h = inp.shape[1]
        makers = {
            "relu": lambda: CNNNet(h, width, c, None),
            "gated": lambda: CNNNet(h, width, c, G.reshape(h, -1)),
        }
        net = CNNNet(h, width, c, G.reshape(h, -1))
        _, U, V = est._neurons
        recovered = (U.reshape(h, -1), V)
    else:
        module = est.to_torch()

        def prep(X):
            zb, Cs = [], []
            with torch.no_grad():
                for s in range(0, len(X), 1000):
                    x = torch.as_tensor(X[s : s + 1000])
                    z = module.projection(x.to(next(module.projection.parameters()).dtype))
                    if module.append_one:
                        z = torch.cat([z, z.new_ones(*z.shape[:2], 1)], dim=2)
                    zb.append(z.mean(dim=1).float())
                    Cs.append((z.transpose(1, 2) @ z / z.shape[1]).float())
            return torch.cat(zb), torch.cat(Cs)

        inp, inp_te = _timed(prep, fit), prep(fit["Xte"])
        d = inp[0].shape[1]
        makers = {"relu": lambda: AttentionNet(d, width, c)}
        net = AttentionNet(d, width, c)
        W1 = module.query @ module.key.transpose(1, 2)
        W2 = module.value @ module.out
        recovered = (W1, W2)
    # The objective check: the counterpart's objective at the recovered convex solution.
    with torch.no_grad():
        params = [p for p in net.parameters()]
        for p, r in zip(params[:2], recovered, strict=True):
            p.copy_(r.to(p.dtype).reshape(p.shape))
        params[2].copy_(est.intercept_.to(torch.float32))
    y = torch.as_tensor(np.searchsorted(est.classes_, fit["ytr"]))
    return inp, inp_te, makers, _objective(net, inp, y, fit["row"]["lam"])


def bench_head(kind: str, D: dict, args) -> dict:
    fit = convex_fit(kind, D, args)
    row = fit["row"]
    shown = {k: v for k, v in row.items() if k != "cvx_test_pred"}
    print(f"[{kind}] convex: {json.dumps(shown, default=str)}", file=sys.stderr, flush=True)
    if args.convex_only:
        return row
    fit["ytr"] = D["ytr"]
    inp, inp_te, makers, check = counterpart_inputs(kind, fit)
    row["objective_check"] = check
    y = torch.as_tensor(np.searchsorted(fit["est"].classes_, D["ytr"]))
    y_te = torch.as_tensor(np.searchsorted(fit["est"].classes_, D["yte"]))
    budget = min(args.adam_seconds, max(5.0, 2 * row["cvx_seconds"]))
    row["adam_budget_s"] = budget
    for family, make in makers.items():
        runs = []
        for lr in args.lrs:
            for seed in args.seeds:
                r = adam_run(
                    make, inp, y, inp_te, y_te, row["lam"], lr, seed, row["cvx_objective"], budget
                )
                runs.append(r)
                print(f"[{kind}/{family}] {r}", file=sys.stderr, flush=True)
        best = min(runs, key=lambda r: r["best_objective"])
        reached = [r["seconds_to_convex"] for r in runs if r["seconds_to_convex"] is not None]
        row[family] = {
            "runs": runs,
            "best_objective": best["best_objective"],
            "best_lr": best["lr"],
            "best_test_acc": best["test_acc"],
            "max_test_acc": max(r["test_acc"] for r in runs),
            "n_reached_convex": len(reached),
            "fastest_to_convex_s": min(reached, default=None),
        }
        row[family]["cvx_seconds_to_its_best"] = next(
            (t for t, o in fit["trace"] if o <= best["best_objective"]), None
        )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default="mlp,cnn,attention")
    ap.add_argument("--train", type=int, default=10_000)
    ap.add_argument("--test", type=int, default=2_000)
    ap.add_argument("--subset", type=int, default=None, help="use the first N training samples")
    ap.add_argument("--gates", type=int, default=64)
    ap.add_argument("--components", type=int, default=64, help="CNN head: PCA channels")
    ap.add_argument("--attn-components", type=int, default=16, help="attention: PCA dims")
    ap.add_argument(
        "--cnn-cache-gb",
        type=float,
        default=None,
        help="CNN head: cache_bytes in GiB (its masked patches stay in memory up to this)",
    )
    ap.add_argument(
        "--lam-ratio",
        default="1e-2",
        help='lam / lam_max, or "auto": each head\'s lam chosen by its lam="auto" path',
    )
    ap.add_argument("--path-lams", type=int, default=10, help="with --lam-ratio auto: path size")
    ap.add_argument("--path-min-ratio", type=float, default=1e-3, help="its smallest lam/lam_max")
    ap.add_argument("--path-max-iter", type=int, default=100, help="iterations per path point")
    ap.add_argument("--max-iter", type=int, default=2000)
    ap.add_argument("--adam-seconds", type=float, default=60.0)
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3,1e-2")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--device", default="cpu", help="where the convex fits run (cpu, cuda)")
    ap.add_argument("--convex-only", action="store_true", help="skip the Adam-trained networks")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.lrs = [float(v) for v in args.lrs.split(",")]
    args.seeds = [int(v) for v in args.seeds.split(",")]
    torch.set_num_threads(THREADS)
    D = feature_maps(args.train, args.test)
    if args.subset:
        D = D | {"Mtr": D["Mtr"][: args.subset], "ytr": D["ytr"][: args.subset]}
    rows: list[dict] = []
    out = Path(args.out or RESULTS / f"heads-{time.strftime('%Y%m%dT%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every head, so a long run keeps what it measured
        meta = {"args": vars(args), "machine": platform.platform(), "load": os.getloadavg()}
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))

    for kind in args.heads.split(","):
        rows.append(bench_head(kind, D, args))
        save()
    mlp = next((r for r in rows if r["head"] == "mlp"), None)
    if mlp is not None and len(rows) > 1:
        paired = _bench_solver().paired
        for r in rows:
            if r is not mlp:
                # McNemar's exact test against the convex MLP head on the same test images
                r["vs_convex_mlp"] = paired(
                    np.asarray(r["cvx_test_pred"]), np.asarray(mlp["cvx_test_pred"]), D["yte"]
                )
        save()
    for r in rows:
        line = [
            r["head"],
            f"cvx {r['cvx_seconds']:.0f}s obj {r['cvx_objective']:.5f} (check "
            f"{r.get('objective_check', float('nan')):.5f}) gap {r['cvx_gap']:.1e} "
            f"acc {r['cvx_test_acc']:.4f} width {r['cvx_width']} ({r['device']}) first report "
            f"{r['cvx_first_report_s'] or float('nan'):.1f}s, counterparts' inputs "
            f"{r.get('counterpart_inputs_s', float('nan')):.1f}s",
        ]
        if "vs_convex_mlp" in r:
            v = r["vs_convex_mlp"]
            line.append(
                f"vs convex mlp: {v['only_convex']} / {v['only_other']} (p {v['p_value']:.2g})"
            )
        if r.get("lam_selection"):
            sel = r["lam_selection"]
            line.append(f"lam auto: {sel['lam_over_lam_max']:.2g} lam_max in {sel['seconds']:.0f}s")
        else:
            line.append(f"lam {r['lam'] / r['lam_max']:.2g} lam_max")
        for fam in ("relu", "gated"):
            if fam in r:
                f = r[fam]
                line.append(
                    f"{fam}: best obj {f['best_objective']:.5f} acc {f['best_test_acc']:.4f} "
                    f"(max {f['max_test_acc']:.4f}) reached {f['n_reached_convex']}, convex "
                    f"passes its best at {f['cvx_seconds_to_its_best'] or float('nan'):.1f}s"
                )
        print(" | ".join(line))


if __name__ == "__main__":
    main()
