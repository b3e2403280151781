"""Independent reference: the same convex programs written in CVXPY, solved by Clarabel."""

from __future__ import annotations

import cvxpy as cp
import numpy as np


def _design(X: np.ndarray, gates: np.ndarray, fit_intercept: bool):
    Z = np.hstack([X, np.ones((len(X), 1))]) if fit_intercept else X
    masks = (Z @ gates >= 0).astype(float)
    return Z, masks


def _loss(F, Y: np.ndarray, loss: str):
    n = Y.shape[0]
    if loss == "squared":
        return cp.sum_squares(F - Y) / (2 * n)
    return cp.sum(cp.log_sum_exp(F, axis=1) - cp.sum(cp.multiply(Y, F), axis=1)) / n


def solve_gated(X, Y, gates, lam, loss, penalty, fit_intercept):
    Z, masks = _design(X, gates, fit_intercept)
    n, c = Y.shape
    Ws = [cp.Variable((Z.shape[1], c)) for _ in range(masks.shape[1])]
    b = cp.Variable(c) if fit_intercept else np.zeros(c)
    F = sum(cp.multiply(masks[:, [i]], Z @ W) for i, W in enumerate(Ws)) + np.ones(
        (n, 1)
    ) @ cp.reshape(b, (1, c), order="C")
    norm = (lambda W: cp.normNuc(W)) if penalty == "nuclear" else (lambda W: cp.norm(W, "fro"))
    obj = _loss(F, Y, loss) + lam * sum(norm(W) for W in Ws)
    prob = cp.Problem(cp.Minimize(obj))
    prob.solve(solver=cp.CLARABEL)
    return prob.value, F.value


def solve_relu(X, Y, gates, lam, loss, fit_intercept):
    Z, masks = _design(X, gates, fit_intercept)
    n, c = Y.shape
    p = masks.shape[1]
    V = [cp.Variable((Z.shape[1], c)) for _ in range(p)]
    W = [cp.Variable((Z.shape[1], c)) for _ in range(p)]
    b = cp.Variable(c) if fit_intercept else np.zeros(c)
    F = sum(cp.multiply(masks[:, [i]], Z @ (V[i] - W[i])) for i in range(p))
    F = F + np.ones((n, 1)) @ cp.reshape(b, (1, c), order="C")
    cons = []
    for i in range(p):
        sign = 2 * masks[:, [i]] - 1
        cons += [cp.multiply(sign, Z @ V[i]) >= 0, cp.multiply(sign, Z @ W[i]) >= 0]
    reg = sum(cp.sum(cp.norm(V[i], axis=0)) + cp.sum(cp.norm(W[i], axis=0)) for i in range(p))
    prob = cp.Problem(cp.Minimize(_loss(F, Y, loss) + lam * reg), cons)
    prob.solve(solver=cp.CLARABEL)
    return prob.value, F.value
