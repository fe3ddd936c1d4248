"""A wall-time budget for a run (`train.time_budget_min`): the step count is fitted from the
run's own measured step and validation times, so that training, every validation, the
calibration and the test end inside the budget on whatever machine runs it.

Why: a recipe written as "N epochs" takes 45 minutes on one 2-core CPU and 75 on another
(native bf16 or not, AMX or not). A budget keeps the promise ("an hour of wall time") and
lets the machine's speed decide how far the schedule gets; the cosine is fitted to the steps
chosen, so the model is annealed at the end either way (FFCV's fixed-budget recipes do the same
by hand). The steps before a run's first validation are never timed: the loader's, the
allocator's and oneDNN's first kernels' warm-up made them up to 20 % slower than the rest
(a ResNet-18-D at 112 px on the 2-core Xeon: 1.2 s a step over its first epoch, ~1.02 s after).
The choice is made at the next validation with enough timed steps, normally the second epoch's
end, and saved in every checkpoint, so a resumed run follows the same schedule. A learning-rate
warm-up that still runs then leaves the learning rates unchanged; one that has ended changes
the cosine's course there, by how much the trainer logs.

Machines slow down mid-run (a 2-core Xeon ran the same steps 10-20 % slower from the run's
seventh epoch on, with nothing else running, and overshot an hour's budget by 3.6 minutes), so
every later validation re-fits the length, and only ever shortens it: a run that speeds up keeps
its length, one that slows down still ends inside the budget. A re-fit happens only when the
plan's projected end passes REFIT_AT of the budget (so timing noise does not whittle the run
down), and then fits to SAFETY again. It counts the time really spent (a stall included) and
expects the remaining steps and validations to take the median of the latest three: a slow-down
that lasts shows after two stretches, a single stall is paid for once instead of being
extrapolated over the rest of the run. A run resumed from a checkpoint saved after the fit keeps
the length it saved and does not re-fit (its own process started later, so its clock is not the
run's).
"""

from __future__ import annotations

import math
import statistics
import time

SAFETY = 0.97  # share of the budget planned for; the rest absorbs noise in the step times
REFIT_AT = 0.99  # a later validation shortens the plan only once its projected end passes this share
MIN_TIMED = 10  # steps timed before the length is fitted (a validation before that waits for the next)
_IMPORTED = time.time()


class StepPlan:
    """The run's total step count, read by the schedule, the loop and the progress bar."""

    def __init__(self, total: int, fitted: bool = False, clock=time.perf_counter):
        self.total, self.fitted, self._clock = total, fitted, clock
        self._mark: tuple[int, float] | None = None  # (step, time) where timing started
        self._last: tuple[int, float] | None = None  # (step, time) at the end of the latest validation
        self._windows: list[tuple[int, float]] = []  # (steps, seconds) between consecutive validations
        self._val_seconds: list[float] = []  # every validation's duration
        self._paused = 0.0
        # True once this process fitted the length: only then do later validations re-fit it
        self.refits = False

    def validated(self, step: int, seconds: float) -> None:
        """Called at the end of every validation (`seconds` long). Timing starts at the end of
        the first one after the (re)start; later validations are left out of it."""
        now = self._clock()
        self._val_seconds.append(seconds)
        if self._mark is None:
            self._mark = (step, now)
        else:
            self._paused += seconds
            self._windows.append((step - self._last[0], now - seconds - self._last[1]))
        self._last = (step, now)

    def step_seconds(self, step: int, now: float) -> float | None:
        """Mean step time since timing started (validations left out)."""
        if self._mark is None or step - self._mark[0] < MIN_TIMED:
            return None
        return (now - self._mark[1] - self._paused) / (step - self._mark[0])

    def recent_step_seconds(self, step: int, now: float) -> float | None:
        """What a re-fit expects the remaining steps to take: the median step time of the latest
        three stretches between validations (the one ending `now` included), neighbouring
        stretches joined until each has >= MIN_TIMED steps (frequent validations)."""
        if self._last is None:
            return None
        rates, steps, secs = [], 0, 0.0
        for n, s in [(step - self._last[0], now - self._last[1]), *reversed(self._windows)]:
            steps, secs = steps + n, secs + s
            if steps >= MIN_TIMED:
                rates.append(secs / steps)
                steps, secs = 0, 0.0
                if len(rates) == 3:
                    break
        return statistics.median(rates) if rates else None

    def recent_validation_seconds(self, current: float) -> float:
        """The median duration of the latest three validations (`current` the one just run): one
        slow validation is not charged to every one still to come."""
        return statistics.median([*self._val_seconds[-2:], current])


def validations_before(n: int, steps_per_epoch: int, val_every_steps: int | None) -> int:
    """Distinct validation steps in [1, n): epoch ends and every val_every_steps."""
    count = (n - 1) // steps_per_epoch
    if val_every_steps:
        count += (n - 1) // val_every_steps - (n - 1) // math.lcm(steps_per_epoch, val_every_steps)
    return count


def estimated_end(n: int, *, elapsed_s: float, step: int, step_s: float, val_s: float, end_s: float,
                  steps_per_epoch: int, val_every_steps: int | None) -> float:
    """Seconds from the process start to the end of a run of n steps, now at `step`:
    elapsed + (n - step)·step_s + (validations after `step`)·val_s + end_s."""
    # distinct validation steps in (step, n]: the grid's, and the last step once
    validations = validations_before(n, steps_per_epoch, val_every_steps) - validations_before(
        step + 1, steps_per_epoch, val_every_steps) + 1
    return elapsed_s + (n - step) * step_s + validations * val_s + end_s


def fit_steps(*, budget_s: float, elapsed_s: float, step: int, step_s: float, val_s: float, end_s: float,
              steps_per_epoch: int, val_every_steps: int | None, max_total: int) -> int:
    """The largest total step count N (step < N <= max_total) whose `estimated_end` stays within
    SAFETY·budget_s. At least step + 1, so a run past its budget still ends at once."""

    def cost(n: int) -> float:
        return estimated_end(n, elapsed_s=elapsed_s, step=step, step_s=step_s, val_s=val_s, end_s=end_s,
                             steps_per_epoch=steps_per_epoch, val_every_steps=val_every_steps)

    lo, hi = step + 1, max(step + 1, max_total)
    if cost(hi) <= SAFETY * budget_s:
        return hi
    while lo < hi:  # cost grows with n: the last n that fits
        mid = (lo + hi + 1) // 2
        if cost(mid) <= SAFETY * budget_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


def end_seconds(val_s: float, tta_views: int, calibrate: bool, test: bool, val_passes: int) -> float:
    """What follows the last step: calibration (a validation pass) and the test (about the
    validation's size under the protocol's splits), each times the TTA's views; plus saving."""
    one = val_s / max(1, val_passes) * tta_views
    return one * (int(calibrate) + int(test)) + 15.0


def process_elapsed() -> float:
    """Seconds since this process started (imports included: that is the wall time a user sees)."""
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except (ImportError, OSError):
        return time.time() - _IMPORTED

