"""Score drift on a running line: are the OK parts still scored like the normal images that set the
thresholds?

A :class:`DriftMonitor` takes every verdict of one model version and, every ``window`` images (tumbling
windows), compares the window with the **reference**: the scores of the held-out normal images that set
the thresholds (the model file's fingerprint), cut at the same threshold.

- the OK scores against the reference's OK scores: SciPy's two-sample Kolmogorov–Smirnov test, and the
  shift of the median and of the 95th percentile in units of the threshold's **margin** (the threshold
  minus the reference median: how far a typical normal part is from being called NG);
- the NG rate against the highest rate the reference allows (the one-sided 95 % upper bound of its share
  above the threshold: a threshold set from few images is uncertain itself): a one-sided binomial test.

A window is *bad* when the OK scores moved (KS p-value below ``alpha`` and the median or the 95th
percentile shifted by at least ``min_shift`` margins) or too many parts were NG (binomial p-value below
``alpha``).  The alarm rises after ``alarm_after`` consecutive bad windows and falls after a good one.
With fewer than ``MIN_REFERENCE`` reference scores, or before a window is full, the state is
*insufficient data*, said as such.  A new model version starts a new monitor.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

MIN_REFERENCE = 5  # reference OK scores below which nothing is compared
INSUFFICIENT, OK, DRIFTING, ALARM = "insufficient data", "ok", "drifting", "alarm"


@dataclass(frozen=True)
class DriftSettings:
    """window: images per window; alpha: the tests' significance level; min_shift: the smallest shift of
    the OK scores' median or 95th percentile, in margins, that counts; alarm_after: consecutive bad
    windows before the alarm."""

    window: int = 200
    alpha: float = 1e-3
    min_shift: float = 0.25
    alarm_after: int = 3

    def __post_init__(self) -> None:
        if self.window < 10 or self.alarm_after < 1 or not 0 < self.alpha < 1 or self.min_shift < 0:
            raise ValueError("drift: window >= 10, alarm_after >= 1, 0 < alpha < 1 and min_shift >= 0")


@dataclass(frozen=True)
class WindowReport:
    """One finished window: its OK scores against the reference, and its NG rate against the implied one."""

    images: int
    ok_images: int
    ks_statistic: float | None  # None: no OK image in the window
    ks_p_value: float | None
    median_shift: float | None  # in margins
    p95_shift: float | None
    ng_rate: float
    implied_ng_rate: float
    ng_p_value: float
    bad: bool
    why: str  # what made it bad ("" when it is not)


@dataclass(frozen=True)
class DriftState:
    """What a monitor says now: ``state`` (insufficient data, ok, drifting, alarm), the images seen, the
    windows finished and bad in a row, and the last window's report."""

    state: str
    detail: str
    images: int
    windows: int
    bad_in_a_row: int
    last: WindowReport | None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class DriftMonitor:
    """Score drift of one model version (see the module's docstring).  Not thread-safe: one caller."""

    def __init__(self, reference: Sequence[float], threshold: float, settings: DriftSettings | None = None) -> None:
        """``reference``: the held-out normal scores behind ``threshold`` (the image threshold)."""
        self.settings = settings or DriftSettings()
        self.threshold = float(threshold)
        scores = np.asarray(reference, dtype=np.float64)
        self.reference_ok = np.sort(scores[scores <= self.threshold])
        # the highest NG rate of normal parts the reference allows (one-sided 95 % Clopper-Pearson bound): a
        # threshold set from few images is itself uncertain, and its noise must not read as drift
        above = int(np.sum(scores > self.threshold))
        self.implied_ng_rate = float(stats.beta.ppf(0.95, above + 1, len(scores) - above)) if len(scores) > above \
            else 1.0
        median = float(np.median(self.reference_ok)) if len(self.reference_ok) else self.threshold
        spread = float(np.ptp(scores)) if len(scores) else 0.0
        # the margin: how far a typical normal part is from the threshold (never 0: a tiny reference)
        self.margin = max(self.threshold - median, 0.1 * spread, 1e-6)
        self.scores: list[float] = []
        self.images = self.windows = self.bad_windows = self.bad_in_a_row = 0
        self.last: WindowReport | None = None

    @property
    def comparable(self) -> bool:
        return len(self.reference_ok) >= MIN_REFERENCE

    def observe(self, score: float) -> WindowReport | None:
        """Add one verdict's score; the window's report when this one finished a window."""
        if not math.isfinite(score):
            return None
        self.images += 1
        if not self.comparable:
            return None
        self.scores.append(float(score))
        if len(self.scores) < self.settings.window:
            return None
        report = self._judge(np.asarray(self.scores))
        self.scores.clear()
        self.windows += 1
        self.bad_windows += report.bad
        self.bad_in_a_row = self.bad_in_a_row + 1 if report.bad else 0
        self.last = report
        return report

    def _judge(self, window: np.ndarray) -> WindowReport:
        settings = self.settings
        ok = window[window <= self.threshold]
        ng = int(len(window) - len(ok))
        ng_p = float(stats.binomtest(ng, len(window), self.implied_ng_rate, alternative="greater").pvalue)
        why = []
        ks = ks_p = median_shift = p95_shift = None
        if len(ok):
            test = stats.ks_2samp(ok, self.reference_ok)
            ks, ks_p = float(test.statistic), float(test.pvalue)
            median_shift = float((np.median(ok) - np.median(self.reference_ok)) / self.margin)
            p95_shift = float((np.percentile(ok, 95) - np.percentile(self.reference_ok, 95)) / self.margin)
            moved = max(abs(median_shift), abs(p95_shift))
            if ks_p < settings.alpha and moved >= settings.min_shift:
                why.append(f"OK scores moved (KS p {ks_p:.1e}; median {median_shift:+.2f}, 95th percentile "
                           f"{p95_shift:+.2f} margins)")
        if ng_p < settings.alpha:
            why.append(f"NG rate {ng / len(window):.1%} against {self.implied_ng_rate:.1%} implied (p {ng_p:.1e})")
        return WindowReport(len(window), len(ok), ks, ks_p, median_shift, p95_shift, ng / len(window),
                            self.implied_ng_rate, ng_p, bool(why), "; ".join(why))

    def state(self) -> DriftState:
        if not self.comparable:
            return DriftState(INSUFFICIENT, f"{len(self.reference_ok)} reference normal scores below the threshold "
                                            f"(at least {MIN_REFERENCE} needed: fit or calibrate with more held-out "
                                            "normal images)", self.images, self.windows, self.bad_in_a_row, None)
        if self.last is None:
            return DriftState(INSUFFICIENT, f"{len(self.scores)} of the first window's {self.settings.window} images",
                              self.images, self.windows, 0, None)
        state = ALARM if self.bad_in_a_row >= self.settings.alarm_after else DRIFTING if self.bad_in_a_row else OK
        detail = self.last.why or "the last window is like the reference"
        return DriftState(state, detail, self.images, self.windows, self.bad_in_a_row, self.last)
