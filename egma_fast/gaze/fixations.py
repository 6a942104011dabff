"""Raw gaze samples (time, x, y) -> fixations (SPEC 5 step 1).

Main path: :func:`detect_fixations_adaptive`, an adaptive velocity-threshold detector in the
style of Nystroem & Holmqvist (2010), in numpy:

1. velocity: Savitzky-Golay first derivative of x and y (``scipy.signal.savgol_filter``, window
   ``smooth_window_s``, default 20 ms, polynomial order 2; at the ends the polynomial fitted to
   the first / last window), speed = |(vx, vy)| in pixels/s (or deg/s when
   ``pixels_per_degree`` is given);
2. peak threshold PT, data-driven: start from ``initial_threshold`` and iterate
   PT <- mean(v[v < PT]) + 6 sd(v[v < PT]) until it moves by less than ``tol``. The paper starts
   by hand at 100-300 deg/s, i.e. above fixation noise and below saccade peaks; the default
   start is its robust, unit-free analogue median(v) + 6 * 1.4826 * MAD(v) (fixation samples
   dominate the median). Starting from max(v) instead can stall at a high fixed point when
   saccades are a large share of the samples;
3. saccade onset threshold = mean + 3 sd of the same below-PT samples;
4. saccades: every run of samples above PT, widened backwards and forwards while the speed
   stays above the onset threshold (a simplification of the paper's locally adaptive offset
   threshold: the onset threshold serves for both ends). Micro-saccades below PT do not split
   a fixation unless they exceed PT;
5. fixations: the remaining runs of valid samples (NaN samples, e.g. blinks, break runs)
   lasting at least ``min_duration`` (default 40 ms); position = mean of the run's samples.

Both need the ``gaze`` extra (``pip install 'egma-fast[gaze]'``: scipy, pymovements). Optional
cross-check path: :func:`detect_fixations_pymovements` runs pymovements' I-VT or I-DT; it raises
ImportError with that hint when pymovements is missing.

Fixations come back in the canonical [F, 5] layout (start, end, x, y, duration), start/end being
the times of the first/last sample of the run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from egma_fast.gaze.records import make_fixations

__all__ = [
    "FixationDetection",
    "adaptive_velocity_thresholds",
    "detect_fixations_adaptive",
    "detect_fixations_pymovements",
    "gaze_speed",
]


def _check_samples(t: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = np.asarray(t, np.float64).reshape(-1)
    x = np.asarray(x, np.float64).reshape(-1)
    y = np.asarray(y, np.float64).reshape(-1)
    if not (t.shape == x.shape == y.shape):
        raise ValueError(f"t, x, y must have the same length, got {t.shape[0]}, {x.shape[0]}, {y.shape[0]}")
    if t.shape[0] < 3:
        raise ValueError(f"need at least 3 gaze samples, got {t.shape[0]}")
    if not np.all(np.isfinite(t)) or np.any(np.diff(t) <= 0):
        raise ValueError("t must be finite and strictly increasing (seconds)")
    return t, x, y


def gaze_speed(
    t: np.ndarray, x: np.ndarray, y: np.ndarray, *, smooth_window_s: float = 0.02, polyorder: int = 2
) -> np.ndarray:
    """Savitzky-Golay smoothed gaze speed [N] in position units per second.

    Samples are assumed (near) uniformly spaced; the spacing is the median of diff(t). Where
    the gap to a neighbour exceeds twice that spacing, the speed is NaN (a dropout, not a saccade).
    """
    # the synthetic data and the readers import this package without needing scipy
    from scipy.signal import savgol_filter  # noqa: PLC0415 (scipy is the gaze extra's, like pymovements)

    t, x, y = _check_samples(t, x, y)
    dt = float(np.median(np.diff(t)))
    window = max(polyorder + 2, int(round(smooth_window_s / dt)))
    window += 1 - window % 2  # odd
    n = t.shape[0]
    if window > n:
        window = n if n % 2 else n - 1
    order = min(polyorder, window - 1)
    # mode="interp": the edge samples take the derivative of the polynomial fitted to the first /
    # last window, not of a zero-padded one
    vx = savgol_filter(x, window, order, deriv=1, delta=dt, mode="interp")
    vy = savgol_filter(y, window, order, deriv=1, delta=dt, mode="interp")
    speed = np.hypot(vx, vy)
    m = window // 2
    gaps = np.flatnonzero(np.diff(t) > 2 * dt)
    for g in gaps:  # invalidate the filter footprint around each dropout
        speed[max(0, g - m + 1): g + m + 1] = np.nan
    return speed


def adaptive_velocity_thresholds(
    speed: np.ndarray,
    *,
    initial_threshold: float | None = None,
    n_sd: float = 6.0,
    onset_sd: float = 3.0,
    tol: float | None = None,
    max_iter: int = 200,
) -> tuple[float, float]:
    """Nystroem-Holmqvist data-driven (peak threshold, saccade onset threshold).

    Args:
        speed: [N] speeds (NaN ignored).
        initial_threshold: starting PT (default: median + 6 * 1.4826 * MAD of the speeds).
        n_sd / onset_sd: multiples of the sd below PT for PT and for the onset threshold.
        tol: stop when PT changes by less than this (default 0.1% of PT).
    """
    v = np.asarray(speed, np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2:
        raise ValueError("speed needs at least 2 finite values to estimate thresholds")
    if initial_threshold is None:
        med = float(np.median(v))
        pt = med + n_sd * 1.4826 * float(np.median(np.abs(v - med)))
        pt = pt if pt > 0 else float(v.max()) + 1.0
    else:
        pt = float(initial_threshold)
    if not pt > 0:
        raise ValueError(f"initial_threshold must be > 0, got {initial_threshold}")
    below = v
    for _ in range(max_iter):
        below = v[v < pt]
        if below.size < 2:
            break
        new = float(below.mean() + n_sd * below.std())
        done = abs(new - pt) <= (tol if tol is not None else 1e-3 * pt)
        pt = new
        if done:
            break
    below = v[v < pt]
    if below.size < 2:
        below = v
    onset = float(below.mean() + onset_sd * below.std())
    return pt, min(onset, pt)


@dataclass
class FixationDetection:
    """Result of :func:`detect_fixations_adaptive`.

    Attributes:
        fixations: [F, 5] float64 (start s, end s, x, y, duration s).
        peak_threshold, onset_threshold: the thresholds found (speed units).
        speed: [N] smoothed speed; is_saccade: [N] bool sample labels.
    """

    fixations: np.ndarray
    peak_threshold: float
    onset_threshold: float
    speed: np.ndarray
    is_saccade: np.ndarray


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Inclusive (first, last) index of every run of True in a 1-d bool array."""
    if not mask.any():
        return []
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1) - 1
    return list(zip(starts.tolist(), ends.tolist()))


def _fixations_from_mask(t, x, y, fix_mask: np.ndarray, min_duration: float) -> np.ndarray:
    rows = []
    for a, b in _runs(fix_mask):
        if t[b] - t[a] < min_duration:
            continue
        rows.append((t[a], t[b], float(np.nanmean(x[a:b + 1])), float(np.nanmean(y[a:b + 1]))))
    arr = np.array(rows, np.float64).reshape(-1, 4)
    return make_fixations(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3])


def detect_fixations_adaptive(
    t: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    *,
    min_duration: float = 0.04,
    smooth_window_s: float = 0.02,
    pixels_per_degree: float | None = None,
    initial_threshold: float | None = None,
    n_sd: float = 6.0,
    onset_sd: float = 3.0,
    tol: float | None = None,
) -> FixationDetection:
    """Adaptive velocity-threshold fixation detection (see module docstring).

    Args:
        t: [N] sample times, seconds, strictly increasing; x, y: [N] positions in image pixels
            (NaN for lost samples).
        min_duration: shortest fixation kept, seconds.
        pixels_per_degree: if given, thresholds are computed in deg/s (the paper's units).
        initial_threshold: starting peak threshold, in the speed units used.

    Returns:
        FixationDetection with fixations in image pixels and seconds.
    """
    t, x, y = _check_samples(t, x, y)
    if min_duration < 0:
        raise ValueError(f"min_duration must be >= 0, got {min_duration}")
    speed = gaze_speed(t, x, y, smooth_window_s=smooth_window_s)
    if pixels_per_degree is not None:
        if not pixels_per_degree > 0:
            raise ValueError(f"pixels_per_degree must be > 0, got {pixels_per_degree}")
        speed = speed / pixels_per_degree
    pt, onset = adaptive_velocity_thresholds(
        speed, initial_threshold=initial_threshold, n_sd=n_sd, onset_sd=onset_sd, tol=tol
    )
    n = speed.shape[0]
    valid = np.isfinite(speed) & np.isfinite(x) & np.isfinite(y)
    above_onset = np.where(np.isfinite(speed), speed >= onset, False)
    is_sacc = np.zeros(n, bool)
    for a, b in _runs(np.where(np.isfinite(speed), speed > pt, False)):
        while a > 0 and above_onset[a - 1]:
            a -= 1
        while b < n - 1 and above_onset[b + 1]:
            b += 1
        is_sacc[a:b + 1] = True
    fixations = _fixations_from_mask(t, x, y, valid & ~is_sacc, min_duration)
    return FixationDetection(fixations, pt, onset, speed, is_sacc)


def _pymovements():
    try:
        import pymovements as pm  # noqa: PLC0415 (optional: the gaze extra)
    except ImportError as e:
        raise ImportError(
            "detect_fixations_pymovements needs pymovements: pip install 'egma-fast[gaze]' "
            "(or use detect_fixations_adaptive, which needs only scipy)"
        ) from e
    return pm


def detect_fixations_pymovements(
    t: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    *,
    method: str = "ivt",
    velocity_threshold: float | None = None,
    dispersion_threshold: float = 30.0,
    min_duration: float = 0.04,
    smooth_window_s: float = 0.02,
) -> np.ndarray:
    """Fixations by pymovements' I-VT or I-DT, as a cross-check of the adaptive detector.

    Args:
        t: [N] seconds; x, y: [N] image pixels.
        method: "ivt" (velocity threshold) or "idt" (dispersion threshold).
        velocity_threshold: I-VT threshold in pixels/s; default: the adaptive onset threshold
            of :func:`adaptive_velocity_thresholds` on the same data.
        dispersion_threshold: I-DT threshold in pixels (x range + y range of a window).
        min_duration: shortest fixation, seconds.

    Returns:
        [F, 5] canonical fixations (position = mean of the event's samples).
    """
    if method not in ("ivt", "idt"):
        raise ValueError(f"method must be 'ivt' or 'idt', got {method!r}")
    pm = _pymovements()
    t, x, y = _check_samples(t, x, y)
    ms = np.round(t * 1000.0).astype(np.int64)  # pymovements wants integer timesteps
    if np.any(np.diff(ms) <= 0):
        raise ValueError("t must be at least 1 ms apart for pymovements (integer millisecond timesteps)")
    min_ms = int(round(min_duration * 1000.0))
    if method == "ivt":
        speed = gaze_speed(t, x, y, smooth_window_s=smooth_window_s)
        if velocity_threshold is None:
            velocity_threshold = adaptive_velocity_thresholds(speed)[1]
        # I-VT thresholds the norm of the velocity vector; give it (speed, 0) so both paths use
        # the same smoothed speed.
        vel = np.stack([np.nan_to_num(speed, nan=np.inf), np.zeros_like(speed)], axis=1)
        events = pm.events.ivt(vel, timesteps=ms, minimum_duration=min_ms, velocity_threshold=float(velocity_threshold))
    else:
        pos = np.stack([x, y], axis=1)
        events = pm.events.idt(pos, timesteps=ms, minimum_duration=min_ms, dispersion_threshold=float(dispersion_threshold))
    frame = events.frame
    rows = []
    for onset, offset in zip(frame["onset"].to_list(), frame["offset"].to_list()):
        sel = (ms >= onset) & (ms <= offset)
        if not sel.any():
            continue
        rows.append((t[sel][0], t[sel][-1], float(np.nanmean(x[sel])), float(np.nanmean(y[sel]))))
    arr = np.array(rows, np.float64).reshape(-1, 4)
    return make_fixations(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3])
