"""Raw gaze -> fixations: the adaptive velocity-threshold detector finds planted fixations; the
pymovements path cross-checks it."""
from __future__ import annotations

import numpy as np
import pytest

from egma_fast.gaze.fixations import (
    adaptive_velocity_thresholds,
    detect_fixations_adaptive,
    detect_fixations_pymovements,
    gaze_speed,
)
from egma_fast.gaze.records import make_fixations
from egma_fast.gaze.simulate import simulate_raw_gaze


def _planted(seed: int, n: int = 15) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, t = [], 0.05
    for _ in range(n):
        d = rng.uniform(0.12, 0.5)
        rows.append((t, t + d, rng.uniform(40, 1000), rng.uniform(40, 1000)))
        t += d + rng.uniform(0.03, 0.07)  # the saccade
    a = np.array(rows)
    return make_fixations(a[:, 0], a[:, 1], a[:, 2], a[:, 3])


def _match(planted: np.ndarray, found: np.ndarray, t_tol: float, px_tol: float) -> None:
    """Every planted fixation has exactly one detected fixation with close start/end/position."""
    assert found.shape[0] == planted.shape[0], (planted[:, :4], found[:, :4])
    for p, f in zip(planted, found):
        assert abs(f[0] - p[0]) < t_tol and abs(f[1] - p[1]) < t_tol, (p, f)
        assert np.hypot(f[2] - p[2], f[3] - p[3]) < px_tol, (p, f)


@pytest.mark.parametrize("seed,rate", [(0, 500.0), (1, 250.0), (2, 1000.0)])
def test_adaptive_detector_finds_planted_fixations(seed, rate):
    planted = _planted(seed)
    t, x, y = simulate_raw_gaze(planted, rate_hz=rate, noise_px=0.6, seed=seed)
    det = detect_fixations_adaptive(t, x, y)
    _match(planted, det.fixations, t_tol=0.03, px_tol=3.0)
    assert 0 < det.onset_threshold < det.peak_threshold
    # saccade samples are the gaps between planted fixations (up to the smoothing footprint)
    in_fix = np.zeros_like(t, bool)
    for p in planted:
        in_fix |= (t >= p[0] + 0.02) & (t <= p[1] - 0.02)
    assert not det.is_saccade[in_fix].any()


def test_dropouts_split_fixations_and_are_not_fixations():
    planted = _planted(3, n=6)
    t, x, y = simulate_raw_gaze(planted, rate_hz=500.0, seed=3)
    # a blink in the middle of fixation 2: samples lost (NaN), removed from the stream
    mid = 0.5 * (planted[2, 0] + planted[2, 1])
    blink = (t > mid - 0.01) & (t < mid + 0.01)
    x[blink] = np.nan
    y[blink] = np.nan
    det = detect_fixations_adaptive(t, x, y, min_duration=0.04)
    starts = det.fixations[:, 0]
    # the blink splits fixation 2 into two parts; none of them contains the blink
    assert det.fixations.shape[0] == planted.shape[0] + 1
    assert not np.any((det.fixations[:, 0] <= mid) & (det.fixations[:, 1] >= mid))
    assert np.all(np.diff(starts) > 0)


def test_thresholds_iterate_down_to_fixation_noise():
    rng = np.random.default_rng(0)
    v = np.concatenate([np.abs(rng.normal(10, 3, 5000)), rng.uniform(200, 600, 300)])
    pt, onset = adaptive_velocity_thresholds(v)
    assert 10 + 3 * 2 < pt < 60  # converged to mean + 6 sd of the fixation noise, far below saccades
    assert onset < pt
    with pytest.raises(ValueError, match="speed"):
        adaptive_velocity_thresholds(np.array([np.nan, 1.0]))


def test_speed_and_input_validation():
    t = np.arange(200) / 500.0
    v = gaze_speed(t, 100 + 300 * t, np.full_like(t, 5.0))
    np.testing.assert_allclose(v, 300.0, rtol=1e-6)  # exact for a linear path, edges included
    # order 2: exact for a quadratic path too, the edges by the polynomial fitted to the end windows
    v = gaze_speed(t, 100 + 300 * t + 400 * t**2, np.full_like(t, 5.0))
    np.testing.assert_allclose(v, 300 + 800 * t, rtol=1e-6)
    with pytest.raises(ValueError, match="increasing"):
        detect_fixations_adaptive(t[::-1], t, t)
    with pytest.raises(ValueError, match="same length"):
        detect_fixations_adaptive(t, t[:-1], t)


def test_pymovements_cross_check():
    pytest.importorskip("pymovements")
    planted = _planted(4)
    t, x, y = simulate_raw_gaze(planted, rate_hz=500.0, noise_px=0.4, seed=4)
    adaptive = detect_fixations_adaptive(t, x, y).fixations
    idt = detect_fixations_pymovements(t, x, y, method="idt", dispersion_threshold=25.0, min_duration=0.06)
    _match(planted, idt, t_tol=0.04, px_tol=3.0)
    ivt = detect_fixations_pymovements(t, x, y, method="ivt", min_duration=0.06)
    # plain I-VT (same smoothed speed, adaptive onset threshold) may split a fixation at a noise
    # spike, but every planted fixation is covered, at the position the adaptive detector found
    for p, a in zip(planted, adaptive):
        hit = ivt[(ivt[:, 0] < p[1]) & (ivt[:, 1] > p[0])]
        assert hit.shape[0] >= 1
        assert np.all(np.hypot(hit[:, 2] - a[2], hit[:, 3] - a[3]) < 4.0)
    with pytest.raises(ValueError, match="method"):
        detect_fixations_pymovements(t, x, y, method="bogus")


def test_pymovements_missing_gives_install_hint(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "pymovements" or name.startswith("pymovements."):
            raise ImportError("No module named 'pymovements'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    t = np.arange(100) / 500.0
    with pytest.raises(ImportError, match=r"egma-fast\[gaze\]"):
        detect_fixations_pymovements(t, t, t)
