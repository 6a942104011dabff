"""The public egma_fast.losses API: results, logit scale, backends, every validation error, the
gradient contract (gaze is data), and no host sync on the training path."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from egma_fast import EGMAConfig, EGMALoss, egf_loss, egm_loss, egma_loss, loss_terms, reference
from egma_fast.ops import available_backends, select_backend

# Every backend that runs on CPU tensors here (Triton under TRITON_INTERPRET=1).
CPU_BACKENDS = [b for b in ("torch", "cpp", "triton") if b in available_backends()]


def _runnable(backend: str) -> None:
    if backend == "triton":
        try:
            select_backend("triton", torch.device("cpu"))
        except ValueError:
            pytest.skip("the Triton backend needs a GPU or TRITON_INTERPRET=1")


def features(B=4, n=9, M=3, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    P = F.normalize(torch.randn(B, n, d, generator=g), dim=-1).to(dtype)
    S = F.normalize(torch.randn(B, M, d, generator=g), dim=-1).to(dtype)
    mask = torch.arange(M)[None, :] < torch.tensor([M, 1, 2, M][:B])[:, None]
    heat = torch.rand(B, M, 12, 12, generator=g).to(dtype)
    has_gaze = torch.tensor([True, False, True, False][:B])
    return P, S, mask, heat, has_gaze


@pytest.mark.parametrize("preset", ["paper", "official"])
def test_module_matches_reference(preset):
    P, S, mask, heat, has_gaze = features(dtype=torch.float64)
    loss_fn = EGMALoss(preset, backend="torch", lambda_egm=1.0, lambda_clip=0.3).double()
    zi = F.normalize(torch.randn(4, 5, dtype=torch.float64), dim=-1)
    zt = F.normalize(torch.randn(4, 5, dtype=torch.float64), dim=-1)
    out = loss_fn(P, S, mask, gaze_heatmaps=heat.double(), has_gaze=has_gaze, image_embeddings=zi, text_embeddings=zt)
    GS = reference.pool_gaze(heat.double(), 9, loss_fn.config.gaze_pool)
    ref = reference.egma_loss(P, S, mask, loss_fn.logit_scale.detach().clone(), loss_fn.config, GS, has_gaze, zi, zt)
    for name in ("total", "loss_c", "loss_mlce", "loss_egm", "loss_clip"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), msg=name)
    torch.testing.assert_close(out.scores_image, ref.scores_image)
    assert set(out.parts()) == {"loss", "loss_c", "loss_mlce", "loss_egm", "loss_clip", "logit_scale"}


def test_owns_logit_scale_with_shape_one():
    loss_fn = EGMALoss()
    assert isinstance(loss_fn.logit_scale, torch.nn.Parameter)
    assert loss_fn.logit_scale.shape == (1,)
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    shared = torch.nn.Parameter(torch.tensor([1.0]))
    assert EGMALoss(logit_scale=shared).logit_scale is shared
    P, S, mask, _, _ = features()
    out = EGMALoss(logit_scale=shared)(P, S, mask)
    out.total.backward()
    assert shared.grad is not None and shared.grad.abs().item() > 0
    assert out.logit_scale.item() == pytest.approx(math.e)


def test_lengths_equal_mask():
    P, S, mask, _, _ = features()
    a = EGMALoss()(P, S, mask)
    b = EGMALoss()(P, S, sentence_lengths=mask.sum(1))
    torch.testing.assert_close(a.total, b.total)


def test_gaze_scores_equal_pooled_heatmaps():
    P, S, mask, heat, has_gaze = features()
    loss_fn = EGMALoss("official", lambda_egm=1.0)
    a = loss_fn(P, S, mask, gaze_heatmaps=heat, has_gaze=has_gaze)
    gs = loss_terms.pool_gaze(heat, 9, "bilinear_antialias")
    b = loss_fn(P, S, mask, gaze_scores=gs, has_gaze=has_gaze)
    torch.testing.assert_close(a.total, b.total)


def test_functional_parts_add_up():
    P, S, mask, heat, has_gaze = features(dtype=torch.float64)
    t = torch.tensor([2.0], dtype=torch.float64)
    kw = dict(sentence_mask=mask, gaze_heatmaps=heat.double(), has_gaze=has_gaze, backend="torch")
    full = egma_loss(P, S, t, config="paper", **kw)
    torch.testing.assert_close(egf_loss(P, S, t, config="paper", **kw), full.loss_c + full.loss_mlce)
    torch.testing.assert_close(egm_loss(P, S, t, config="paper", **kw), full.loss_egm)
    torch.testing.assert_close(full.total, full.loss_c + full.loss_mlce + full.loss_egm)


def test_config_presets_and_overrides():
    off = EGMAConfig.preset("official", lambda_egm=1.0)
    assert off.pad_as_zero and not off.t2i_over_images and off.mlce_weights == (0.8, 0.2)
    assert off.lambda_egm == 1.0 and EGMAConfig.preset("official").lambda_egm == 0.0
    assert EGMAConfig().preset_name == "paper" and EGMAConfig().topk_patches(49) == 7
    assert EGMAConfig().topk_patches(196) == 28
    with pytest.raises(ValueError, match="preset must be one of"):
        EGMAConfig.preset("nope")
    with pytest.raises(ValueError, match="unknown EGMAConfig option"):
        EGMAConfig.preset("paper", lamda_egm=1.0)
    with pytest.raises(ValueError, match="egm_omega"):
        EGMAConfig(egm_omega="soft")
    with pytest.raises(ValueError, match="lambda_egm must be >= 0"):
        EGMAConfig(lambda_egm=-1.0)


def test_backend_selection():
    assert "torch" in available_backends()
    assert select_backend("torch", torch.device("cpu")).name == "torch"
    assert select_backend("auto", torch.device("cpu")).name in available_backends()
    with pytest.raises(ValueError, match="backend must be"):
        select_backend("fastest", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be one of"):
        EGMALoss(backend="fastest")


# ---------------------------------------------------------------------------------------------
# Validation: each bad input raises a ValueError naming the argument and what was expected
# ---------------------------------------------------------------------------------------------
def _call(**overrides):
    P, S, mask, heat, has_gaze = features()
    kwargs = dict(patch_features=P, sentence_features=S, sentence_mask=mask)
    kwargs.update(overrides)
    return EGMALoss(**({"lambda_clip": overrides.pop("_lambda_clip")} if "_lambda_clip" in overrides else {}))(**{k: v for k, v in kwargs.items() if k != "_lambda_clip"})


P0, S0, MASK0, HEAT0, HG0 = features()

BAD_INPUTS = [
    ("rank", dict(patch_features=P0[0]), r"patch_features must have shape \[B, n, d\]"),
    ("int features", dict(patch_features=torch.ones(4, 9, 8, dtype=torch.int64)), "patch_features must be a floating tensor"),
    ("bool features", dict(sentence_features=torch.ones(4, 3, 8, dtype=torch.bool)), "sentence_features must be a floating tensor"),
    ("not a tensor", dict(patch_features=[[1.0]]), "patch_features must be a torch.Tensor"),
    ("batch mismatch", dict(sentence_features=S0[:3], sentence_mask=MASK0[:3]), "sentence_features has size 3 in dim 0 but patch_features has size 4"),
    ("width mismatch", dict(sentence_features=torch.randn(4, 3, 7)), "sentence_features has size 7 in dim 2 but patch_features has size 8"),
    ("dtype mismatch", dict(sentence_features=S0.double()), "sentence_features has dtype torch.float64 but patch_features has dtype torch.float32"),
    ("device mismatch", dict(sentence_features=S0.to("meta")), "sentence_features is on meta but patch_features is on cpu"),
    ("mask shape", dict(sentence_mask=MASK0[:, :2]), r"sentence_mask must have shape \[B, M\] = \[4, 3\]"),
    ("float mask", dict(sentence_mask=MASK0.float()), "sentence_mask must be bool"),
    ("mask values", dict(sentence_mask=MASK0.long() * 2), "sentence_mask must hold only 0 and 1"),
    ("empty text", dict(sentence_mask=torch.tensor([[True] * 3, [False] * 3, [True] * 3, [True] * 3])), "some row of sentence_mask has none"),
    ("mask and lengths", dict(sentence_lengths=torch.tensor([1, 1, 1, 1])), "not both"),
    ("lengths range", dict(sentence_mask=None, sentence_lengths=torch.tensor([1, 4, 1, 1])), r"sentence_lengths must lie in \[1, M\]"),
    ("lengths dtype", dict(sentence_mask=None, sentence_lengths=torch.tensor([1.0, 1, 1, 1])), "sentence_lengths must be an integer tensor"),
    ("nan", dict(patch_features=P0.clone().index_fill_(0, torch.tensor([1]), float("nan"))), "patch_features contains a non-finite"),
    ("inf", dict(sentence_features=S0.clone().index_fill_(0, torch.tensor([0]), float("inf"))), "sentence_features contains a non-finite"),
    ("nan heatmap", dict(gaze_heatmaps=HEAT0.clone().index_fill_(1, torch.tensor([2]), float("nan")), has_gaze=HG0), "gaze_heatmaps contains a non-finite"),
    ("lengths zero", dict(sentence_mask=None, sentence_lengths=torch.tensor([1, 0, 1, 1])), r"sentence_lengths must lie in \[1, M\]"),
    ("heatmap shape", dict(gaze_heatmaps=HEAT0[:, :2], has_gaze=HG0), r"gaze_heatmaps must have shape \[B, M, h, w\]"),
    ("heatmap range", dict(gaze_heatmaps=HEAT0 * 3, has_gaze=HG0), r"gaze_heatmaps values must lie in \[0, 1\]"),
    ("scores shape", dict(gaze_scores=torch.rand(4, 3, 7), has_gaze=HG0), r"gaze_scores must have shape \[B, M, n\] = \[4, 3, 9\]"),
    ("both gaze", dict(gaze_scores=torch.rand(4, 3, 9), gaze_heatmaps=HEAT0), "not both"),
    ("has_gaze dtype", dict(gaze_heatmaps=HEAT0, has_gaze=HG0.long()), "has_gaze must be a bool tensor"),
    ("has_gaze shape", dict(gaze_heatmaps=HEAT0, has_gaze=HG0[:2]), r"has_gaze must have shape \[B\] = \[4\]"),
    ("has_gaze without maps", dict(has_gaze=HG0), "neither gaze_heatmaps nor gaze_scores was given"),
    ("one embedding", dict(image_embeddings=torch.randn(4, 5)), "pass both image_embeddings and text_embeddings"),
    ("embedding batch", dict(image_embeddings=torch.randn(3, 5), text_embeddings=torch.randn(3, 5)), "image_embeddings has size 3 in dim 0"),
    ("clip needs embeddings", dict(_lambda_clip=1.0), "required when lambda_clip > 0"),
]


# Checks of values run on the device (no host sync): on CPU tensors they raise a RuntimeError with
# the same kind of message at once (on a GPU, a device-side assert at the next sync).
VALUE_CHECKS = {"mask values", "empty text", "lengths range", "lengths zero", "nan", "inf", "nan heatmap",
                "heatmap range", "has_gaze without maps"}


@pytest.mark.parametrize("label,overrides,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(label, overrides, message):
    with pytest.raises(RuntimeError if label in VALUE_CHECKS else ValueError, match=message):
        _call(**overrides)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("preset", ["paper", "official"])
def test_non_finite_logit_scale_raises(preset, value):
    """A NaN or Inf log logit scale is an error naming it (official's in-place clamp would
    otherwise turn +Inf into the maximum silently, and NaN gives a NaN loss)."""
    P, S, mask, _, _ = features()
    loss_fn = EGMALoss(preset)
    with torch.no_grad():
        loss_fn.logit_scale.fill_(value)
    with pytest.raises(RuntimeError, match="logit_scale contains a non-finite"):
        loss_fn(P, S, mask)
    with pytest.raises(RuntimeError, match="logit_scale contains a non-finite"):
        egma_loss(P, S, torch.tensor([value]), sentence_mask=mask, config=preset)


def test_check_finite_can_be_disabled():
    P, S, mask, _, _ = features()
    P = P.clone()
    P[0, 0, 0] = float("nan")
    out = EGMALoss(check_finite=False)(P, S, mask)
    assert torch.isnan(out.total)


def test_bad_logit_scale():
    P, S, mask, _, _ = features()
    with pytest.raises(ValueError, match="logit_scale must be"):
        egma_loss(P, S, torch.ones(2), sentence_mask=mask)
    with pytest.raises(ValueError, match="logit_scale must be"):
        EGMALoss(logit_scale=torch.nn.Parameter(torch.ones(3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_check_no_false_alarm_on_overflowing_sum(dtype):
    """Huge but finite features would overflow a sum; the min / max check must not raise."""
    from egma_fast.validation import check_finite

    check_finite("x", torch.full((4, 4), torch.finfo(dtype).max, dtype=dtype))
    for bad in (float("-inf"), float("nan")):
        with pytest.raises(RuntimeError, match="x contains a non-finite"):
            check_finite("x", torch.tensor([1.0, bad, 2.0], dtype=dtype))


class _HostSyncCounter:
    """Counts tensor -> Python conversions (each one a device -> host sync on a GPU)."""

    NAMES = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__")

    def __enter__(self) -> list[str]:
        self.calls: list[str] = []
        self.saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, self._wrap(name, fn))
        return self.calls

    def _wrap(self, name, fn):
        def counted(tensor, *args, **kwargs):
            self.calls.append(name)
            return fn(tensor, *args, **kwargs)
        return counted

    def __exit__(self, *exc) -> None:
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize("check_finite", [False, True], ids=["unchecked", "checked"])
@pytest.mark.parametrize("inputs", ["features", "mask_gaze", "lengths_scores"])
@pytest.mark.parametrize("preset", ["paper", "official"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_loss_compute_has_no_host_sync(backend, preset, inputs, check_finite):
    """Forward and backward convert no tensor to a Python value, with masks, lengths, gaze maps or
    scores and has_gaze, and with the value checks on or off: nothing in the loss stalls the GPU
    (the checks assert on the device; the no-gaze regime of SPEC 3.1 is chosen on the device)."""
    _runnable(backend)
    P, S, mask, heat, has_gaze = features(B=4, n=9, M=3, d=8, seed=1)
    P.requires_grad_()
    S.requires_grad_()
    t = torch.zeros(1, requires_grad=True)
    kwargs = {
        "features": {},
        "mask_gaze": dict(sentence_mask=mask.long(), gaze_heatmaps=heat, has_gaze=has_gaze),
        "lengths_scores": dict(sentence_lengths=mask.sum(1), gaze_scores=heat[..., :3, :3].reshape(4, 3, 9),
                               has_gaze=torch.zeros(4, dtype=torch.bool)),
    }[inputs]
    config = EGMAConfig.preset(preset, check_finite=check_finite, lambda_egm=1.0)
    with _HostSyncCounter() as calls:
        out = egma_loss(P, S, t, config=config, backend=backend, **kwargs)
        out.total.backward()
    assert calls == []
    assert P.grad is not None and torch.isfinite(P.grad).all()


@pytest.mark.parametrize("preset", ["paper", "official"])
def test_validation_compiles_without_graph_break(preset):
    """torch.compile(fullgraph=True) traces the whole loss with masks and gaze and every check on
    (device asserts, no data-dependent Python branch), and matches eager; the checks still fire."""
    torch._dynamo.reset()
    P, S, mask, heat, has_gaze = features(B=4, n=9, M=3, d=8, seed=2)
    config = EGMAConfig.preset(preset, lambda_egm=1.0)

    def loss(P, S, t, mask, heat):
        return egma_loss(P, S, t, sentence_mask=mask, gaze_heatmaps=heat, has_gaze=has_gaze, config=config,
                         backend="torch").total

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    t = torch.tensor([1.5])
    torch.testing.assert_close(compiled(P, S, t, mask, heat), loss(P, S, t, mask, heat))
    with pytest.raises(RuntimeError, match="gaze_heatmaps values must lie in"):
        compiled(P, S, t, mask, heat * 3)


@pytest.mark.parametrize("preset", ["paper", "official"])
@pytest.mark.parametrize("batch_has_gaze", [False, True])
@pytest.mark.parametrize("egm_use_gaze", [False, True])
def test_sample_regimes_same_for_bool_and_tensor_flag(preset, batch_has_gaze, egm_use_gaze):
    config = EGMAConfig.preset(preset, egm_use_gaze=egm_use_gaze)
    use_gaze = torch.tensor([True, False, True, False]) & batch_has_gaze
    flag = torch.tensor(batch_has_gaze)
    thetas, weights = loss_terms.egm_sample_thetas, loss_terms.egm_sample_weights
    assert torch.equal(thetas(use_gaze, batch_has_gaze, config), thetas(use_gaze, flag, config))
    assert torch.equal(weights(use_gaze, batch_has_gaze, config), weights(use_gaze, flag, config))
    theta, w = thetas(use_gaze, flag, config), weights(use_gaze, flag, config)
    if batch_has_gaze and egm_use_gaze:  # mixed batch: samples without gaze take the mixed regime
        assert theta[0] == config.egm_theta_gaze and theta[1] == config.egm_theta_mixed_no_gaze
        assert w[1].tolist() == pytest.approx(list(config.egm_weights_mixed_no_gaze))
    else:  # no gaze, or EGM blind to it: the no-gaze-batch regime for everyone
        assert (theta == config.egm_theta_no_gaze_batch).all()
        assert w.tolist() == [pytest.approx(list(config.egm_weights))] * 4


# ---------------------------------------------------------------------------------------------
# EGM's gaze (SPEC 3.1 - 3.2) and the gradient contract
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("egm_use_gaze", [False, True])
@pytest.mark.parametrize("preset", ["paper", "official"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_egm_use_gaze_matches_reference(backend, preset, egm_use_gaze):
    """Both settings of egm_use_gaze, on every backend, against the reference's loss (its own
    glue): value and every gradient. Without it EGM ignores gaze while MLCE keeps it."""
    _runnable(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    P, S, mask, heat, has_gaze = features(dtype=dtype, seed=3)
    config = EGMAConfig.preset(preset, lambda_egm=1.0, egm_use_gaze=egm_use_gaze)
    loss_fn = EGMALoss(config, backend=backend).to(dtype)
    Pa, Sa = P.clone().requires_grad_(), S.clone().requires_grad_()
    out = loss_fn(Pa, Sa, mask, gaze_heatmaps=heat, has_gaze=has_gaze)
    out.total.backward()
    t = loss_fn.logit_scale.detach().clone().double().requires_grad_()
    Pb, Sb = P.double().requires_grad_(), S.double().requires_grad_()
    GS = reference.pool_gaze(heat.double(), 9, config.gaze_pool)
    ref = reference.egma_loss(Pb, Sb, mask, t, config, GS, has_gaze)
    ref.total.backward()
    for name in ("total", "loss_c", "loss_mlce", "loss_egm"):
        torch.testing.assert_close(getattr(out, name).double(), getattr(ref, name), **tol, msg=name)
    for name, a, b in (("dP", Pa.grad, Pb.grad), ("dS", Sa.grad, Sb.grad), ("dt", loss_fn.logit_scale.grad, t.grad)):
        torch.testing.assert_close(a.double(), b, **tol, msg=name)
    # The option matters: EGM with and without gaze differ on this batch, MLCE does not.
    other = reference.egma_loss(P.double(), S.double(), mask, t.detach(), config.replace(egm_use_gaze=not egm_use_gaze),
                                GS, has_gaze)
    assert abs(other.loss_egm.item() - ref.loss_egm.item()) > 1e-4
    torch.testing.assert_close(other.loss_mlce, ref.loss_mlce.detach())


def test_official_egm_default_ignores_gaze():
    """official (the released forward(): gaze-free EGM) by default: L_EGM is the same with or
    without gaze maps; only MLCE sees them."""
    P, S, mask, heat, has_gaze = features(dtype=torch.float64, seed=4)
    t = torch.tensor([2.0], dtype=torch.float64)
    kw = dict(sentence_mask=mask, config=EGMAConfig.preset("official", lambda_egm=1.0), backend="torch")
    with_gaze = egma_loss(P, S, t, gaze_heatmaps=heat.double(), has_gaze=has_gaze, **kw)
    without = egma_loss(P, S, t, **kw)
    torch.testing.assert_close(with_gaze.loss_egm, without.loss_egm, rtol=0, atol=0)
    assert with_gaze.loss_mlce > 0 and without.loss_mlce == 0


@pytest.mark.parametrize("gaze_kind", ["heatmaps", "scores"])
@pytest.mark.parametrize("preset", ["paper", "official", "official-egm-gaze"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_gradient_reaches_gaze(backend, preset, gaze_kind):
    """Gaze maps are data: no backend differentiates gaze_heatmaps / gaze_scores, in any preset
    (the threshold omega's weights depend on GS, so a leak is easy)."""
    _runnable(backend)
    P, S, mask, heat, has_gaze = features(seed=5)
    config = {"paper": EGMAConfig.preset("paper"),
              "official": EGMAConfig.preset("official", lambda_egm=1.0),
              "official-egm-gaze": EGMAConfig.preset("official", lambda_egm=1.0, egm_use_gaze=True)}[preset]
    gaze = (heat if gaze_kind == "heatmaps" else loss_terms.pool_gaze(heat, 9, config.gaze_pool)).requires_grad_()
    key = "gaze_heatmaps" if gaze_kind == "heatmaps" else "gaze_scores"
    P.requires_grad_()
    out = EGMALoss(config, backend=backend)(P, S, mask, has_gaze=has_gaze, **{key: gaze})
    out.total.backward()
    assert gaze.grad is None
    assert P.grad is not None and P.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cross_map_op_gives_gs_and_theta_no_gradient(backend):
    """The op contract: gradients flow to P, S and alpha, never to GS or theta."""
    _runnable(backend)
    from egma_fast import ops

    P, S, mask, heat, has_gaze = features(seed=6)
    config = EGMAConfig.preset("official", lambda_egm=1.0, egm_use_gaze=True)
    GS = loss_terms.pool_gaze(heat, 9, config.gaze_pool).requires_grad_()
    theta = loss_terms.egm_sample_thetas(has_gaze, True, config).requires_grad_()
    alpha = torch.tensor(5.0, requires_grad=True)
    P.requires_grad_()
    terms = ops.cross_map(P, S, mask, GS, has_gaze, theta, alpha, loss_terms.cross_map_params(config, 9),
                          backend=backend)
    grads = torch.autograd.grad(sum(t.sum() for t in terms), (P, alpha, GS, theta), allow_unused=True)
    assert grads[0] is not None and grads[1] is not None
    assert grads[2] is None and grads[3] is None
