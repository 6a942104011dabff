"""The distributed loss: two gloo ranks with half a batch each give the global batch's loss and
gradients (open_clip's local-loss pattern with gradient-carrying gathers), and official's is the
authors' arithmetic on the global batch (zero-vector packing to the global m_max, SPEC 2.1)."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from egma_fast import EGMALoss
from egma_fast.ops import available_backends

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_ranks(target, arg) -> list:
    """Run target(rank, port, arg, queue) in WORLD spawned processes; their queued results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, port, arg, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in range(WORLD))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def _inputs(preset: str):
    g = torch.Generator().manual_seed(7)
    B, n, M, d = 6, 9, 3, 8
    P = F.normalize(torch.randn(B, n, d, generator=g, dtype=torch.float64), dim=-1)
    S = F.normalize(torch.randn(B, M, d, generator=g, dtype=torch.float64), dim=-1)
    mask = torch.arange(M)[None, :] < torch.tensor([3, 1, 2, 2, 2, 1])[:, None]  # rank 1 needs 2 slots
    GS = torch.rand(B, M, n, generator=g, dtype=torch.float64)
    has_gaze = torch.tensor([True, False, False, False, True, True])  # uneven per rank on purpose
    zi = F.normalize(torch.randn(B, 5, generator=g, dtype=torch.float64), dim=-1)
    zt = F.normalize(torch.randn(B, 5, generator=g, dtype=torch.float64), dim=-1)
    return P, S, mask, GS, has_gaze, zi, zt


def _loss(preset: str, distributed: bool):
    return EGMALoss(preset, backend="torch", distributed=distributed, lambda_egm=1.0, lambda_clip=0.5).double()


def _run_rank(rank: int, port: int, preset: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        P, S, mask, GS, has_gaze, zi, zt = _inputs(preset)
        b = P.shape[0] // WORLD
        sl = slice(rank * b, (rank + 1) * b)
        # Each rank pads its texts only to its own longest (ranks hold different M); the loss
        # must gather them as the single process's batch padded to the global longest.
        m_local = int(mask[sl].sum(1).max())
        leaves = [x[sl].clone().requires_grad_() for x in (P, S[:, :m_local], zi, zt)]
        loss_fn = _loss(preset, True)
        out = loss_fn(leaves[0], leaves[1], mask[sl, :m_local], gaze_scores=GS[sl, :m_local], has_gaze=has_gaze[sl], image_embeddings=leaves[2], text_embeddings=leaves[3])
        out.total.backward()
        # Data parallelism averages parameter gradients over ranks; the logit scale is one.
        grad_t = loss_fn.logit_scale.grad.clone()
        dist.all_reduce(grad_t)
        grad_t /= WORLD
        # numpy copies pickle by value (torch tensors would travel as shared-memory handles that
        # die with this process)
        queue.put((rank, out.total.item(), [x.grad.numpy().copy() for x in leaves], grad_t.numpy().copy()))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("preset", ["paper", "official"])
def test_two_ranks_match_one(preset):
    P, S, mask, GS, has_gaze, zi, zt = _inputs(preset)
    leaves = [x.clone().requires_grad_() for x in (P, S, zi, zt)]
    loss_fn = _loss(preset, False)
    out = loss_fn(leaves[0], leaves[1], mask, gaze_scores=GS, has_gaze=has_gaze, image_embeddings=leaves[2], text_embeddings=leaves[3])
    out.total.backward()

    results = _spawn_ranks(_run_rank, preset)

    mean_loss = sum(r[1] for r in results) / WORLD
    assert mean_loss == pytest.approx(out.total.item(), rel=1e-10)
    b = P.shape[0] // WORLD
    for i, name in enumerate(("P", "S", "image_embeddings", "text_embeddings")):
        # Each rank's feature gradient is of its per-rank loss; the global loss is their mean.
        parts = [torch.from_numpy(r[2][i]) for r in results]
        if name == "S":  # pad rank 1's gradient back to the global slot count (padding gets none)
            parts = [F.pad(g, (0, 0, 0, S.shape[1] - g.shape[1])) for g in parts]
        got = torch.cat(parts) / WORLD
        torch.testing.assert_close(got, leaves[i].grad, msg=name)
    torch.testing.assert_close(torch.from_numpy(results[0][3]), loss_fn.logit_scale.grad)
    assert b == 3


# ---------------------------------------------------------------------------------------------
# official against the authors' arithmetic across ranks: zero-vector packing to the GLOBAL m_max
# ---------------------------------------------------------------------------------------------
# Rank 0 pads its texts to M = 6, beyond every text (as a data loader's max_sentences does), with a
# scattered mask; rank 1 pads only to its own longest, 3. The global batch's longest report has 4
# sentences, so rank 1's 3-sentence text has a zero slot although it is its rank's longest, and
# rank 0's slots beyond 4 do not exist.
_RANK_LENGTHS = ([4, 1, 2], [2, 3, 1])
_RANK_WIDTHS = (6, 3)
_N, _D = 5, 8


def _official_rank_inputs(rank: int):
    """Rank r's local batch: P [3, n, d], S [3, M_r, d] (junk in padded slots), mask, GS [3, M_r, n], has_gaze."""
    g = torch.Generator().manual_seed(100 + rank)
    b, M = len(_RANK_LENGTHS[rank]), _RANK_WIDTHS[rank]
    P = F.normalize(torch.randn(b, _N, _D, generator=g, dtype=torch.float64), dim=-1)
    S = F.normalize(torch.randn(b, M, _D, generator=g, dtype=torch.float64), dim=-1)
    mask = torch.arange(M)[None, :] < torch.tensor(_RANK_LENGTHS[rank])[:, None]
    if rank == 0:
        mask = torch.gather(mask, 1, torch.stack([torch.randperm(M, generator=g) for _ in range(b)]))
    GS = torch.rand(b, M, _N, generator=g, dtype=torch.float64)
    GS = torch.where(GS > 0.5, GS, torch.zeros_like(GS))
    has_gaze = torch.tensor([[True, False, True], [False, True, True]][rank])
    return P, S, mask, GS, has_gaze


def _authors_official_loss(P, S, mask, GS, has_gaze, t):
    """The authors' released arithmetic (official: lambda_egm = 0) written independently of
    egma_fast: every report's real sentences, in order, packed into zero vectors up to the longest
    report of the batch (m_max), plain maxima over all m_max slots (first maximiser), the text side
    over the true m_l; both CE terms over rows (no transpose); MLCE on the matched pairs with
    GL = GS > 0, weights 0.8 / 0.2, averaged over the gaze samples. Lists of per-text tensors in
    the global batch's order."""
    B = P.shape[0]
    texts = [S[l][mask[l]] for l in range(B)]
    gazes = [GS[l][mask[l]] for l in range(B)]
    m = torch.tensor([x.shape[0] for x in texts])
    width = int(m.max())
    packed = torch.stack([F.pad(x, (0, 0, 0, width - x.shape[0])) for x in texts])  # zero vectors
    alpha = t.reshape(()).exp()
    X = torch.einsum("knd,lmd->klnm", P, packed)
    zI = alpha * X.max(dim=3).values.mean(dim=2)
    real = torch.arange(width)[None, :] < m[:, None]
    zT = alpha * torch.where(real[None, :, :], X.max(dim=2).values, 0.0).sum(dim=2) / m[None, :]
    labels = torch.arange(B)
    loss_c = 0.5 * (F.cross_entropy(zI, labels) + F.cross_entropy(zT, labels))

    def mlce(s, y):  # log(1 + sum_{y=0} e^s) + log(1 + sum_{y=1} e^-s)
        zero = s.new_zeros(1)
        return torch.logsumexp(torch.cat([zero, s[~y]]), 0) + torch.logsumexp(torch.cat([zero, -s[y]]), 0)

    per_sample = []
    for k in range(B):
        if has_gaze[k]:
            A = alpha * P[k] @ texts[k].t()  # [n, m_k]
            GL = gazes[k] > 0  # [m_k, n]
            s2p = torch.stack([mlce(A[:, j], GL[j]) for j in range(A.shape[1])]).mean()
            p2s = torch.stack([mlce(A[i], GL[:, i]) for i in range(A.shape[0])]).mean()
            per_sample.append(0.8 * s2p + 0.2 * p2s)
    return loss_c + torch.stack(per_sample).mean()


def _official_rank(rank: int, port: int, backend: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        P, S, mask, GS, has_gaze = _official_rank_inputs(rank)
        P.requires_grad_()
        S.requires_grad_()
        loss_fn = EGMALoss("official", backend=backend, distributed=True).double()
        out = loss_fn(P, S, mask, gaze_scores=GS, has_gaze=has_gaze)
        out.total.backward()
        grad_t = loss_fn.logit_scale.grad.clone()
        dist.all_reduce(grad_t)
        queue.put((rank, out.total.item(), P.grad.numpy().copy(), S.grad.numpy().copy(), (grad_t / WORLD).numpy().copy()))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpp") if b in available_backends()])
def test_official_across_ranks_is_the_authors_packing(backend: str) -> None:
    """SPEC 2.1 in distributed form: with different M per rank (one beyond m_max), the mean of the
    per-rank official losses and every gradient equal the authors' arithmetic on the global batch,
    packed to the global m_max (float64, 1e-9 relative). The zero slots come from the gathered mask."""
    parts = [_official_rank_inputs(r) for r in range(WORLD)]
    P = torch.cat([p[0] for p in parts]).requires_grad_()
    S_parts = [p[1].clone().requires_grad_() for p in parts]
    t = torch.tensor([EGMALoss("official").logit_scale.item()], dtype=torch.float64, requires_grad=True)
    flat = lambda i: [row for p in parts for row in p[i]]  # noqa: E731  (texts of different widths)
    S_rows = [row for s in S_parts for row in s]
    want = _authors_official_loss(P, S_rows, flat(2), flat(3), torch.cat([p[4] for p in parts]), t)
    want.backward()
    # The case tells the packings apart: some patch's best real sentence scores below 0 for text 0
    # (m = m_max: no zero slot, although its rank pads to M = 6 > m_max) and for text 4 (m = 3, the
    # longest of rank 1 but shorter than the global m_max: a zero slot). Zero slots decided from
    # the width M, or from a rank's own texts, would floor the first or miss the second.
    with torch.no_grad():
        best = [torch.einsum("knd,md->knm", P, S_rows[l][flat(2)[l]]).max(dim=2).values for l in (0, 4)]
    assert all(bool((b < 0).any()) for b in best)

    results = _spawn_ranks(_official_rank, backend)

    tol = dict(rtol=1e-9, atol=1e-12)
    assert sum(r[1] for r in results) / WORLD == pytest.approx(want.item(), rel=1e-9)
    # Each rank's gradient is of its per-rank loss; the global loss is their mean.
    torch.testing.assert_close(torch.cat([torch.from_numpy(r[2]) for r in results]) / WORLD, P.grad, **tol)
    for r, S_r in zip(results, S_parts):
        torch.testing.assert_close(torch.from_numpy(r[3]) / WORLD, S_r.grad, **tol)
    torch.testing.assert_close(torch.from_numpy(results[0][4]), t.grad, **tol)


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpp") if b in available_backends()])
def test_official_one_process_is_the_authors_packing(backend: str) -> None:
    """The same equality in one process, with the texts padded to M = 7 > m_max = 4."""
    parts = [_official_rank_inputs(r) for r in range(WORLD)]
    width = 7
    P = torch.cat([p[0] for p in parts]).requires_grad_()
    S = torch.cat([F.pad(p[1], (0, 0, 0, width - p[1].shape[1])) for p in parts]).requires_grad_()
    mask = torch.cat([F.pad(p[2], (0, width - p[2].shape[1])) for p in parts])
    GS = torch.cat([F.pad(p[3], (0, 0, 0, width - p[3].shape[1])) for p in parts])
    has_gaze = torch.cat([p[4] for p in parts])
    loss_fn = EGMALoss("official", backend=backend, distributed=False).double()
    out = loss_fn(P, S, mask, gaze_scores=GS, has_gaze=has_gaze)
    out.total.backward()
    P2, S2 = P.detach().clone().requires_grad_(), S.detach().clone().requires_grad_()
    t = loss_fn.logit_scale.detach().clone().requires_grad_()
    want = _authors_official_loss(P2, list(S2), list(mask), list(GS), has_gaze, t)
    want.backward()
    tol = dict(rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.total, want, **tol)
    for a, b in ((P.grad, P2.grad), (S.grad, S2.grad), (loss_fn.logit_scale.grad, t.grad)):
        torch.testing.assert_close(a, b, **tol)
