"""A second, deliberately naive reading of SPEC.md: plain Python floats and loops, one matched
pair or one (image, text) pair at a time, sharing no code with egma_fast.reference.

Only for tiny inputs (B = 2, n <= 3, m <= 2 in the tests). Lists in, floats out.
"""
from __future__ import annotations

import math

Vec = list[float]
Mat = list[list[float]]


def dot(a: Vec, b: Vec) -> float:
    return sum(x * y for x, y in zip(a, b))


def logsumexp(xs: list[float]) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


def ce_row(row: list[float], target: int) -> float:
    return logsumexp(row) - row[target]


def ce_rows(rows: Mat) -> float:
    return sum(ce_row(r, i) for i, r in enumerate(rows)) / len(rows)


def transpose(a: Mat) -> Mat:
    return [list(col) for col in zip(*a)]


def late_interaction(P: list[Mat], S: list[Mat], lengths: list[int], M: int, pad_as_zero: bool) -> tuple[Mat, Mat]:
    """zI, zT [B][B] unscaled; texts are S[l][:lengths[l]] with M - lengths[l] padded slots."""
    B = len(P)
    zI = [[0.0] * B for _ in range(B)]
    zT = [[0.0] * B for _ in range(B)]
    for k in range(B):
        for l in range(B):
            m = lengths[l]
            X = [[dot(p, S[l][j]) for j in range(m)] for p in P[k]]
            row_best = []
            for row in X:
                best = max(row)
                if pad_as_zero and m < max(lengths):  # the authors' zero vector after a shorter text's sentences
                    best = max(best, 0.0)
                row_best.append(best)
            zI[k][l] = sum(row_best) / len(P[k])
            zT[k][l] = sum(max(X[i][j] for i in range(len(P[k]))) for j in range(m)) / m
    return zI, zT


def contrastive(zI: Mat, zT: Mat, t2i_over_images: bool) -> float:
    return 0.5 * (ce_rows(zI) + ce_rows(transpose(zT) if t2i_over_images else zT))


def mlce(scores: list[float], labels: list[bool]) -> float:
    neg = [s for s, y in zip(scores, labels) if not y]
    pos = [-s for s, y in zip(scores, labels) if y]
    return logsumexp([0.0] + neg) + logsumexp([0.0] + pos)


def mlce_pair(A: Mat, GL: list[list[bool]]) -> tuple[float, float]:
    """(fL^S2P, fL^P2S) for one matched pair: A = X_kk [n][m] (alpha-scaled), GL [m][n]."""
    n, m = len(A), len(A[0])
    s2p = sum(mlce([A[i][j] for i in range(n)], GL[j]) for j in range(m)) / m
    p2s = sum(mlce(A[i], [GL[j][i] for j in range(m)]) for i in range(n)) / n
    return s2p, p2s


def _topk_row(row: list[float], k: int) -> list[float]:
    order = sorted(range(len(row)), key=lambda c: (-row[c], c))  # ties to the lowest index
    chosen = set(order[:k])
    return [1.0 if c in chosen else 0.0 for c in range(len(row))]


def _minmax_row(row: list[float]) -> list[float]:
    lo, hi = min(row), max(row)
    span = hi - lo if hi > lo else 1.0 / len(row)
    return [(x - lo) / span for x in row]


def _l1(row: list[float]) -> list[float]:
    total = sum(row)
    return [x / total for x in row]


def _clip(G: Mat) -> float:
    return 0.5 * (ce_rows(G) + ce_rows(transpose(G)))


def egm_pair(
    P: Mat,
    S: Mat,
    alpha: float,
    GS: Mat | None,
    omega: str,
    k_sent: int,
    k_patch: int,
    theta: float,
    floor: float,
    single: str,
) -> tuple[float, float]:
    """(mL^I, mL^T) for one matched pair; GS [m][n] or None (no gaze)."""
    n, m = len(P), len(S)
    A = [[alpha * dot(P[i], S[j]) for j in range(m)] for i in range(n)]
    T = transpose(A)
    if omega == "topk":
        W_i2t = []
        for i in range(n):
            w = _topk_row(A[i], min(k_sent, m))
            if GS is not None:
                w = [w[j] + GS[j][i] for j in range(m)]
            W_i2t.append(_l1(w))
        W_t2i = []
        for j in range(m):
            w = _topk_row(T[j], min(k_patch, n))
            if GS is not None:
                w = [w[i] + GS[j][i] for i in range(n)]
            W_t2i.append(_l1(w))
    else:
        def thr(x: float) -> float:
            return 0.0 if x < theta else x

        W_i2t = []
        for i in range(n):
            a = _minmax_row(A[i])
            if GS is not None:
                a = [a[j] + GS[j][i] / 2 for j in range(m)]
            W_i2t.append(_l1([thr(x) + floor for x in a]))
        W_t2i = []
        for j in range(m):
            t = _minmax_row(T[j])
            if GS is not None:
                t = [(t[i] + GS[j][i]) / 2 for i in range(n)]
            W_t2i.append(_l1([thr(x) + floor for x in t]))
    d = len(P[0])
    cross_p = [[sum(W_i2t[i][j] * S[j][c] for j in range(m)) for c in range(d)] for i in range(n)]
    cross_s = [[sum(W_t2i[j][i] * P[i][c] for i in range(n)) for c in range(d)] for j in range(m)]
    if m == 1:
        if single == "drop":
            return 0.0, 0.0
        return 0.0, sum((cross_s[0][c] - S[0][c]) ** 2 for c in range(d))
    G_i = [[alpha * dot(cross_p[a], P[b]) for b in range(n)] for a in range(n)]
    G_t = [[alpha * dot(cross_s[a], S[b]) for b in range(m)] for a in range(m)]
    return _clip(G_i), _clip(G_t)
