"""reference.py against hand-computed cases, a naive loop implementation, and SPEC properties."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import naive
from egma_fast import EGMAConfig, reference

S2 = 1 / math.sqrt(2)
PAPER = EGMAConfig.preset("paper")
OFFICIAL = EGMAConfig.preset("official")
OFFICIAL_EGM = EGMAConfig.preset("official", lambda_egm=1.0)
# egm_use_gaze the other way round from each preset's default (SPEC 3.2).
PAPER_EGM_NO_GAZE = EGMAConfig.preset("paper", egm_use_gaze=False)
OFFICIAL_EGM_GAZE = EGMAConfig.preset("official", lambda_egm=1.0, egm_use_gaze=True)
EGM_CONFIGS = [PAPER, PAPER_EGM_NO_GAZE, OFFICIAL_EGM, OFFICIAL_EGM_GAZE]
EGM_CONFIG_IDS = ["paper", "paper-egm-no-gaze", "official", "official-egm-gaze"]


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# A fully hand-computed example (d = 2, n = 2, M = 2):
#   P0 = [e1, e2], P1 = [-e2, e1]; text 0 = [e1, (e1 + e2)/sqrt2], text 1 = [e2] plus one padded slot.
P_HAND = t64([[[1, 0], [0, 1]], [[0, -1], [1, 0]]])
S_HAND = t64([[[1, 0], [S2, S2]], [[0, 1], [0.3, 0.4]]])  # the padded slot holds junk on purpose
MASK_HAND = torch.tensor([[True, True], [True, False]])
# zI[k, l] = mean_i max_j X:  X_00 = [[1, .707], [0, .707]] -> (1 + .707)/2
#   X_01 = [[0], [1]] -> .5;  X_10 = [[0, -.707], [1, .707]] -> .5;  X_11 = [[-1], [0]] -> -.5
ZI_PAPER = [[(1 + S2) / 2, 0.5], [0.5, -0.5]]
#   official: text 1 has a zero-scoring padded slot, so X_11's rows become max(., 0) -> 0
ZI_OFFICIAL = [[(1 + S2) / 2, 0.5], [0.5, 0.0]]
# zT[k, l] = mean_j max_i X:  X_00 -> (1 + .707)/2; X_01 -> 1; X_10 -> (1 + .707)/2; X_11 -> 0
ZT_HAND = [[(1 + S2) / 2, 1.0], [(1 + S2) / 2, 0.0]]


@pytest.mark.parametrize("pad_as_zero,zi", [(False, ZI_PAPER), (True, ZI_OFFICIAL)])
def test_late_interaction_hand(pad_as_zero, zi):
    zI, zT = reference.late_interaction(P_HAND, S_HAND, MASK_HAND, pad_as_zero=pad_as_zero)
    torch.testing.assert_close(zI, t64(zi))
    torch.testing.assert_close(zT, t64(ZT_HAND))


def test_fine_grained_contrastive_hand_both_presets():
    zI, zT = t64(ZI_PAPER), t64(ZT_HAND)

    def ce(row, target):
        return math.log(sum(math.exp(v) for v in row)) - row[target]

    image_term = (ce(ZI_PAPER[0], 0) + ce(ZI_PAPER[1], 1)) / 2
    # paper: text rows over images -> columns of zT
    text_paper = (ce([ZT_HAND[0][0], ZT_HAND[1][0]], 0) + ce([ZT_HAND[0][1], ZT_HAND[1][1]], 1)) / 2
    # official: zT's own rows (a softmax over texts for each image)
    text_official = (ce(ZT_HAND[0], 0) + ce(ZT_HAND[1], 1)) / 2
    assert reference.fine_grained_contrastive(zI, zT, True).item() == pytest.approx((image_term + text_paper) / 2, rel=1e-12)
    assert reference.fine_grained_contrastive(zI, zT, False).item() == pytest.approx((image_term + text_official) / 2, rel=1e-12)
    assert text_paper != pytest.approx(text_official)  # the case distinguishes the presets


def test_mlce_hand():
    scores = t64([[2.0, -1.0, 0.5], [1.0, 3.0, -2.0], [0.3, 0.1, -0.4]])
    labels = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])
    got = reference.mlce(scores, labels)
    want = [
        math.log(1 + math.exp(-1.0) + math.exp(0.5)) + math.log(1 + math.exp(-2.0)),
        math.log(1 + math.exp(1.0) + math.exp(3.0) + math.exp(-2.0)),  # no positive: first term only
        math.log(1 + math.exp(-0.3) + math.exp(-0.1) + math.exp(0.4)),  # no negative: second term only
    ]
    torch.testing.assert_close(got, t64(want))


def test_mlce_stable_for_large_scores():
    got = reference.mlce(t64([[1000.0, -1000.0]]), torch.tensor([[False, True]]))
    assert got.item() == pytest.approx(1000.0 + 1000.0)


def test_pool_gaze_area_max_hand():
    h = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    h[0, 0, 0, 0] = 1.0  # top-left block mean .25
    h[0, 0, 3, 2:] = 0.5  # bottom-right block mean .25
    h[0, 0, 1, 3] = 0.2  # top-right block mean .05
    gs = reference.pool_gaze(h, 4, "area_max")
    torch.testing.assert_close(gs[0, 0], t64([1.0, 0.2, 0.0, 1.0]))  # divided by the max .25
    torch.testing.assert_close(gs[0, 1], torch.zeros(4, dtype=torch.float64))  # all-zero stays zero


def test_pool_gaze_bilinear_antialias_matches_pil():
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    heat = rng.random((37, 53)).astype(np.float32)
    want = np.asarray(Image.fromarray(heat, mode="F").resize((7, 7), Image.BILINEAR))
    got = reference.pool_gaze(torch.from_numpy(heat)[None, None], 49, "bilinear_antialias")[0, 0].reshape(7, 7)
    np.testing.assert_allclose(got.numpy(), want, atol=2e-5)


def test_pool_gaze_rejects_non_square_n():
    with pytest.raises(ValueError, match="perfect square"):
        reference.pool_gaze(torch.zeros(1, 1, 4, 4), 6, "area_max")


# ---------------------------------------------------------------------------------------------
# Against the naive loops: tiny random cases (B = 2, n <= 3, m <= 2), every term, both presets
# ---------------------------------------------------------------------------------------------
def _tiny(seed: int, n: int, lengths: list[int], d: int = 3):
    g = torch.Generator().manual_seed(seed)
    M = max(lengths)
    P = F.normalize(torch.randn(2, n, d, generator=g, dtype=torch.float64), dim=-1)
    S = F.normalize(torch.randn(2, M, d, generator=g, dtype=torch.float64), dim=-1)
    mask = torch.arange(M)[None, :] < torch.tensor(lengths)[:, None]
    GS = torch.rand(2, M, n, generator=g, dtype=torch.float64) * mask[:, :, None]
    GS = torch.where(GS > 0.4, GS, torch.zeros_like(GS))
    return P, S, mask, GS


def _lists(P, S, mask):
    lengths = mask.sum(1).tolist()
    Pl = P.tolist()
    Sl = [S[l, : lengths[l]].tolist() for l in range(S.shape[0])]
    return Pl, Sl, lengths


TINY_SHAPES = [(1, [1, 1]), (2, [2, 1]), (3, [1, 2]), (3, [2, 2]), (2, [2, 2])]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n,lengths", TINY_SHAPES)
@pytest.mark.parametrize("pad_as_zero", [False, True])
def test_late_interaction_matches_naive(seed, n, lengths, pad_as_zero):
    P, S, mask, _ = _tiny(seed, n, lengths)
    Pl, Sl, ls = _lists(P, S, mask)
    zI, zT = naive.late_interaction(Pl, Sl, ls, S.shape[1], pad_as_zero)
    gI, gT = reference.late_interaction(P, S, mask, pad_as_zero=pad_as_zero)
    torch.testing.assert_close(gI, t64(zI))
    torch.testing.assert_close(gT, t64(zT))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n,lengths", TINY_SHAPES)
@pytest.mark.parametrize("config", EGM_CONFIGS, ids=EGM_CONFIG_IDS)
@pytest.mark.parametrize("gaze", ["none", "first", "both"])
def test_cross_map_matches_naive(seed, n, lengths, config, gaze):
    P, S, mask, GS = _tiny(seed, n, lengths)
    use_gaze = torch.tensor({"none": [False, False], "first": [True, False], "both": [True, True]}[gaze])
    alpha = 3.7
    batch_has_gaze = bool(use_gaze.any())
    theta = reference.egm_sample_thetas(use_gaze, batch_has_gaze, config)
    params = reference.cross_map_params(config, n)
    got = reference.cross_map(P, S, mask, GS, use_gaze, theta, t64(alpha), params)
    Pl, Sl, ls = _lists(P, S, mask)
    for k in range(2):
        m = ls[k]
        GSk = GS[k, :m].tolist() if use_gaze[k] else None
        A = [[alpha * naive.dot(Pl[k][i], Sl[k][j]) for j in range(m)] for i in range(n)]
        if use_gaze[k]:
            GL = [[v > config.gaze_threshold for v in row] for row in GSk]
            s2p, p2s = naive.mlce_pair(A, GL)
        else:
            s2p, p2s = 0.0, 0.0
        # EGM sees the gaze only with egm_use_gaze (MLCE above uses it either way).
        img, txt = naive.egm_pair(
            Pl[k], Sl[k], alpha, GSk if config.egm_use_gaze else None, config.egm_omega, config.egm_topk_sentences, config.topk_patches(n),
            float(theta[k]), config.egm_floor, config.egm_single_sentence,
        )
        assert got.mlce_s2p[k].item() == pytest.approx(s2p, rel=1e-10, abs=1e-12)
        assert got.mlce_p2s[k].item() == pytest.approx(p2s, rel=1e-10, abs=1e-12)
        assert got.egm_image[k].item() == pytest.approx(img, rel=1e-10, abs=1e-12)
        assert got.egm_text[k].item() == pytest.approx(txt, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("module", ["reference", "loss_terms"])
def test_official_regimes_thetas_and_weights(module):
    """SPEC 3.1 regimes, in the oracle and in the production glue. official's default has EGM see
    no gaze (egm_use_gaze off, SPEC 3.2): every sample takes the no-gaze-batch regime, even in a
    batch with gaze; with the option on, the gaze-guided regimes."""
    from egma_fast import loss_terms

    mod = {"reference": reference, "loss_terms": loss_terms}[module]
    none = torch.tensor([False, False])
    mixed = torch.tensor([True, False])
    for cfg in (OFFICIAL, OFFICIAL_EGM_GAZE):
        assert mod.egm_sample_thetas(none, False, cfg).tolist() == pytest.approx([2 / 7, 2 / 7])
        assert mod.egm_sample_weights(none, False, cfg).tolist() == [pytest.approx([0.7, 0.3])] * 2
    assert mod.egm_sample_thetas(mixed, True, OFFICIAL_EGM_GAZE).tolist() == pytest.approx([3 / 7, 1 / 7])
    w = mod.egm_sample_weights(mixed, True, OFFICIAL_EGM_GAZE)
    assert w[0].tolist() == pytest.approx([0.7, 0.3]) and w[1].tolist() == pytest.approx([0.5, 0.5])
    assert mod.egm_sample_thetas(mixed, True, OFFICIAL).tolist() == pytest.approx([2 / 7, 2 / 7])
    assert mod.egm_sample_weights(mixed, True, OFFICIAL).tolist() == [pytest.approx([0.7, 0.3])] * 2


def test_official_zero_range_row_gradient():
    """A patch row over one sentence has zero min-max range: value 0, gradient m (dA - dmin) = 0,
    and, with m = 2 equal scores, the gradient m * (dA - dmin) flows to the first minimiser."""
    x = t64([[0.4, 0.4]]).requires_grad_()
    valid = torch.ones(1, 2, dtype=torch.bool)
    out = reference._minmax_rows(x, valid, torch.tensor([2]))
    assert out.tolist() == [[0.0, 0.0]]
    (out * t64([[1.0, 3.0]])).sum().backward()
    # d/dx of 2 * (x_j - x_0): entry 0 gets 2*(1 + 3) - 2*1 ... written out: sum_j w_j*2*(dx_j - dx_0)
    assert x.grad.tolist() == [[2 * 1.0 - 2 * (1.0 + 3.0), 2 * 3.0]]


# ---------------------------------------------------------------------------------------------
# SPEC properties
# ---------------------------------------------------------------------------------------------
def _batch(seed=0, B=4, n=4, M=3, d=6, gaze=True):
    g = torch.Generator().manual_seed(seed)
    P = F.normalize(torch.randn(B, n, d, generator=g, dtype=torch.float64), dim=-1)
    S = F.normalize(torch.randn(B, M, d, generator=g, dtype=torch.float64), dim=-1)
    lengths = torch.tensor([M, 2, 1, M][:B])
    mask = torch.arange(M)[None, :] < lengths[:, None]
    GS = torch.rand(B, M, n, generator=g, dtype=torch.float64) * mask[:, :, None]
    has_gaze = torch.tensor([True, False, True, True][:B]) if gaze else None
    return P, S, mask, (GS if gaze else None), has_gaze


@pytest.mark.parametrize("config", [PAPER, OFFICIAL_EGM], ids=["paper", "official"])
def test_gradcheck_total(config):
    P, S, mask, GS, has_gaze = _batch(B=3, n=4, M=3, d=4)
    cfg = config.replace(lambda_clip=0.5, logit_scale_clamp="clamp")
    zi = F.normalize(torch.randn(3, 5, dtype=torch.float64), dim=-1)
    zt = F.normalize(torch.randn(3, 5, dtype=torch.float64), dim=-1)

    def total(P, S, t, zi, zt):
        return reference.egma_loss(P, S, mask, t, cfg, GS, has_gaze, zi, zt).total

    t = t64([1.3])
    inputs = tuple(x.clone().requires_grad_() for x in (P, S, t, zi, zt))
    assert torch.autograd.gradcheck(total, inputs, eps=1e-6, atol=1e-5)


def test_permuting_batch_permutes_scores_and_keeps_loss():
    P, S, mask, GS, has_gaze = _batch(B=4)
    perm = torch.tensor([2, 0, 3, 1])
    for cfg in (PAPER, OFFICIAL_EGM):
        t = t64([2.0])
        a = reference.egma_loss(P, S, mask, t, cfg, GS, has_gaze)
        b = reference.egma_loss(P[perm], S[perm], mask[perm], t, cfg, GS[perm], has_gaze[perm])
        torch.testing.assert_close(b.scores_image, a.scores_image[perm][:, perm])
        torch.testing.assert_close(b.scores_text, a.scores_text[perm][:, perm])
        torch.testing.assert_close(b.total, a.total)


def test_paper_masked_padding_changes_nothing():
    P, S, mask, GS, has_gaze = _batch(B=4, M=3)
    t = t64([2.0])
    base = reference.egma_loss(P, S, mask, t, PAPER, GS, has_gaze)
    junk = torch.randn(4, 2, S.shape[2], dtype=torch.float64)
    S2 = torch.cat([S, F.normalize(junk, dim=-1)], dim=1)
    mask2 = torch.cat([mask, torch.zeros(4, 2, dtype=torch.bool)], dim=1)
    GS2 = torch.cat([GS, torch.rand(4, 2, GS.shape[2], dtype=torch.float64)], dim=1)
    padded = reference.egma_loss(P, S2, mask2, t, PAPER, GS2, has_gaze)
    for name in ("total", "loss_c", "loss_mlce", "loss_egm", "scores_image", "scores_text"):
        torch.testing.assert_close(getattr(padded, name), getattr(base, name), msg=name)


def _authors_packed_scores(P: torch.Tensor, S: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' arithmetic, written independently of reference.py: each report's real sentences
    packed in order into zero vectors of width m_max = max_l m_l, then a plain max over all m_max
    slots (torch.max: the first maximiser wins) and the text side divided by the true m_l."""
    m = mask.sum(1)
    m_max = int(m.max())
    packed = torch.zeros(S.shape[0], m_max, S.shape[2], dtype=S.dtype)
    for l in range(S.shape[0]):
        packed[l, : int(m[l])] = S[l][mask[l]]
    X = torch.einsum("bnd,tmd->btnm", P, packed)
    zI = X.max(dim=3).values.mean(dim=2)
    real = torch.arange(m_max)[None, :] < m[:, None]
    col = torch.where(real[None], X.max(dim=2).values, torch.zeros(()))
    return zI, col.sum(2) / m[None, :].to(X.dtype)


@pytest.mark.parametrize("mask_kind", ["prefix", "scattered"])
@pytest.mark.parametrize("extra_width", [0, 1, 3])
def test_official_padding_is_the_authors_packing(mask_kind: str, extra_width: int):
    """SPEC 2.1: official's image-side max has a zero slot only for texts shorter than the batch's
    longest (m_l < m_max), whatever width M the tensors are padded to; values and gradients equal
    the authors' zero-vector packing."""
    g = torch.Generator().manual_seed(7 + extra_width)
    B, n, M, d = 5, 6, 4, 8
    P = F.normalize(torch.randn(B, n, d, generator=g, dtype=torch.float64), dim=-1)
    S = F.normalize(torch.randn(B, M + extra_width, d, generator=g, dtype=torch.float64), dim=-1)
    lengths = torch.tensor([4, 2, 1, 4, 3])
    mask = torch.arange(M + extra_width)[None, :] < lengths[:, None]
    if mask_kind == "scattered":
        perm = torch.stack([torch.randperm(M + extra_width, generator=g) for _ in range(B)])
        mask = torch.gather(mask, 1, perm)
    Pa, Sa = P.clone().requires_grad_(), S.clone().requires_grad_()
    Pb, Sb = P.clone().requires_grad_(), S.clone().requires_grad_()
    got = reference.late_interaction(Pa, Sa, mask, pad_as_zero=True)
    want = _authors_packed_scores(Pb, Sb, mask)
    w = torch.randn(2, B, B, generator=g, dtype=torch.float64)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    (w[0] * got[0] + w[1] * got[1]).sum().backward()
    (w[0] * want[0] + w[1] * want[1]).sum().backward()
    torch.testing.assert_close(Pa.grad, Pb.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Sa.grad, Sb.grad, rtol=1e-12, atol=1e-12)
    # The texts with m_l = m_max have no zero slot: their negative row maxima survive.
    X = torch.einsum("bnd,tmd->btnm", P, S)
    assert (torch.where(mask[None, :, None, :], X, torch.tensor(-9.0)).amax(3)[:, lengths == 4] < 0).any()


def test_official_zero_slot_tie_goes_to_the_real_sentence():
    """A real sentence scoring exactly 0 ties with the zero slot: the real one wins (the authors' zero
    vectors come after the real sentences), so it gets the gradient."""
    P = t64([[[1.0, 0.0]]])
    S = t64([[[0.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [0.5, 0.5]]]).requires_grad_()
    mask = torch.tensor([[True, False], [True, True]])
    zI, _ = reference.late_interaction(P.requires_grad_(), S, mask, pad_as_zero=True)
    assert zI[0, 0].item() == 0.0
    zI[0, 0].backward()
    assert S.grad[0, 0, 0].item() == 1.0  # d<P, S_00>/dS_00 = P: the real sentence won the tie


@pytest.mark.parametrize("config", [PAPER, OFFICIAL_EGM], ids=["paper", "official"])
def test_no_gaze_batch(config):
    P, S, mask, GS, _ = _batch(B=4)
    t = t64([2.0])
    none = reference.egma_loss(P, S, mask, t, config, GS, torch.zeros(4, dtype=torch.bool))
    with_gaze = reference.egma_loss(P, S, mask, t, config, GS, torch.ones(4, dtype=torch.bool))
    assert none.loss_mlce.item() == 0.0
    assert with_gaze.loss_mlce.item() > 0.0
    torch.testing.assert_close(none.loss_c, with_gaze.loss_c)


def test_single_sentence_rules():
    P, S, mask, GS, has_gaze = _batch(B=4, M=3)
    one = torch.zeros_like(mask)
    one[:, 0] = True
    for cfg, expect_text_positive in ((PAPER, False), (OFFICIAL_EGM, True)):
        params = reference.cross_map_params(cfg, P.shape[1])
        theta = reference.egm_sample_thetas(has_gaze, True, cfg)
        terms = reference.cross_map(P, S, one, GS, has_gaze, theta, t64(5.0), params)
        assert torch.all(terms.egm_image == 0)
        if expect_text_positive:
            # ||Cross_S - S||^2 computed by hand from the official weights
            assert torch.all(terms.egm_text > 0)
        else:
            assert torch.all(terms.egm_text == 0)


def test_official_single_sentence_mse_by_hand():
    P = t64([[[1.0, 0.0], [0.0, 1.0]]])
    S = t64([[[S2, S2]]])
    mask = torch.tensor([[True]])
    GS = torch.zeros(1, 1, 2, dtype=torch.float64)
    # T = alpha * [s.p0, s.p1] = [.707a, .707a]: zero range over 2 patches -> minmax 0 -> thr 0
    # -> + .01 each -> W = [.5, .5]; Cross_S = (p0 + p1)/2 = [.5, .5]; ||Cross_S - S||^2 = 2 (.5 - .707)^2
    params = reference.cross_map_params(OFFICIAL_EGM, 2)
    terms = reference.cross_map(P, S, mask, GS, torch.tensor([False]), t64([2 / 7]), t64(4.0), params)
    assert terms.egm_text.item() == pytest.approx(2 * (0.5 - S2) ** 2)
    assert terms.egm_image.item() == 0.0


@pytest.mark.parametrize("config", [PAPER, OFFICIAL], ids=["paper", "official"])
def test_single_token_lc_is_clip(config):
    """n = m = 1: the pooled scores are the dot products, so paper's L_c is the plain CLIP loss and
    official's is CE over rows twice (its text term has no transpose)."""
    g = torch.Generator().manual_seed(3)
    zi = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1)
    zt = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1)
    t = t64([math.log(10.0)])
    out = reference.egma_loss(zi[:, None], zt[:, None], torch.ones(5, 1, dtype=torch.bool), t, config)
    logits = 10.0 * zi @ zt.t()
    labels = torch.arange(5)
    # plain CLIP, written independently of reference.clip_loss
    logp_rows = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    logp_cols = logits - torch.logsumexp(logits, dim=0, keepdim=True)
    clip = -0.5 * (logp_rows[labels, labels].mean() + logp_cols[labels, labels].mean())
    if config.t2i_over_images:
        torch.testing.assert_close(out.loss_c, clip)
    else:
        torch.testing.assert_close(out.loss_c, -logp_rows[labels, labels].mean())


def test_ties_gradient_goes_to_first_maximiser():
    P = t64([[[1.0, 0.0]]]).requires_grad_()
    S = t64([[[1.0, 0.0], [1.0, 0.0]]]).requires_grad_()  # two identical sentences: a tie
    zI, _ = reference.late_interaction(P, S, torch.ones(1, 2, dtype=torch.bool))
    zI.sum().backward()
    assert S.grad[0, 0].tolist() == [1.0, 0.0]
    assert S.grad[0, 1].tolist() == [0.0, 0.0]


def test_official_logit_scale_inplace_clamp():
    t = torch.nn.Parameter(t64([5.0]))
    alpha = reference.logit_scale_to_alpha(t, OFFICIAL)
    assert t.item() == pytest.approx(4.6052)  # clamped in place
    alpha.backward()
    assert t.grad.item() == pytest.approx(math.exp(4.6052))  # gradient not masked
    t2 = torch.nn.Parameter(t64([5.0]))
    reference.logit_scale_to_alpha(t2, PAPER).backward()
    assert t2.item() == 5.0 and t2.grad.item() == 0.0  # paper: differentiable clamp


@pytest.mark.parametrize("mode", ["area_max", "bilinear_antialias"])
@pytest.mark.parametrize("h,w,n", [(12, 12, 9), (37, 53, 49), (224, 200, 49), (5, 3, 16), (7, 7, 49), (30, 11, 196)])
def test_pool_gaze_oracle_matches_production(mode, h, w, n):
    """reference.pool_gaze (explicit resize weights) and loss_terms.pool_gaze (torch's interpolate /
    adaptive pooling, what the loss runs): shrinking, enlarging, non-divisible sizes."""
    from egma_fast import loss_terms

    g = torch.Generator().manual_seed(h * w + n)
    heat = torch.rand(2, 3, h, w, generator=g, dtype=torch.float64)
    heat[0, 1] = 0.0  # an all-zero sentence stays zero
    want = loss_terms.pool_gaze(heat, n, mode)
    got = reference.pool_gaze(heat, n, mode)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[0, 1], torch.zeros(n, dtype=torch.float64))
