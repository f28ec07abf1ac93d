"""How long PiAPI takes: queue and run times per kind of task, learned from PiAPI's own timestamps.

A task's life at PiAPI has two phases with different uncertainty: the queue (`meta.created_at` to
`started_at`, which depends on PiAPI's load) and the run (`started_at` to `ended_at`, which depends
on the model, the pixel count and the batch size, and varies little). `TimingStats` keeps both per
`TaskKind` (model, task type, pixel-count bucket, batch size), from PiAPI's `meta` timestamps only,
never from when we happened to poll, and fits each phase with a log-normal distribution (robustly:
outliers trimmed, and the spread pooled with the prior's, which weighs one sample, so a few
samples that agree by chance do not make it overconfident).

- Cold start: built-in priors per model (PiAPI's docs show a dev-advanced task at ~1.2 s queued +
  ~31.5 s running; schnell and dev take ~4 s and ~20 s), scaled by pixel count and batch size,
  deliberately wide, and scaled by the *pace* seen on any kind so far (observed / prior total
  time, median of recent tasks): a backend twice as slow as the priors, or the simulator twenty
  times as fast, shifts every kind not yet learned. A kind learns from `MIN_SAMPLES` finished
  tasks on. A model without a prior
  has no estimate: the poller then falls back to its capped geometric schedule.
- Persistence: the samples are the ledger's own finished tasks (their stored request and PiAPI
  record), so nothing extra is written; `TaskLedger.recent_timings` reads back a bounded number
  of them at start-up, and every task finished afterwards is added online.
- Tasks still running: `estimate_with` refits a learned kind with them as well, each a lower
  bound (it lasts at least as long as it has run so far; a right-censored sample), so that the
  quickest tasks of a batch, the first to finish, do not make the kind look quicker than it is.
  A bound far beyond every finished task is left out unless most of the running tasks are out
  there (one stuck task, as against a slow hour).
- Bounds: at most `MAX_SAMPLES` recent samples per kind and `MAX_KINDS` kinds (least recently
  used dropped), so memory stays small however long the server runs.

`Estimate.completion_quantile` answers the poller's one question: given what is known right now
(still pending `q` seconds after creation, or processing `a` seconds after `started_at`), by when
is the task done with probability p?
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flux_mcp.catalog import DEFAULT_BATCH_SIZE, Model
from flux_mcp.record import TaskRecord

MIN_SAMPLES = 3
MAX_SAMPLES = 64
MAX_KINDS = 256
MIN_SIGMA = 0.05  # log-space spread floor (5 %): a handful of samples can look more regular than PiAPI is
_MEGAPIXEL = 1024 * 1024
_NORMAL = statistics.NormalDist()
_SQRT_HALF = math.sqrt(0.5)
_SQRT_2PI = math.sqrt(2 * math.pi)
_TOLERANCE = 1e-3  # seconds: how precisely a planned poll time is solved for
_NEWTON_STEPS = 12  # then bisection only: it always ends
_QUEUE_POINTS = 24  # quadrature points over the queue time when the run has not started
_EM_ROUNDS = 2000  # a bound, not a target: most fits converge in tens


@dataclass(frozen=True)
class TaskKind:
    model: str
    task_type: str
    pixel_bucket: int  # round(log2(pixels / 1 MP)): 1 MP is 0, 2 MP is 1, 0.25 MP is -2
    batch: int

    @classmethod
    def of(cls, model: str, task_type: str, task_input: Mapping[str, Any] | None) -> TaskKind:
        task_input = task_input or {}
        width, height = task_input.get("width"), task_input.get("height")
        pixels = width * height if isinstance(width, int) and isinstance(height, int) else _MEGAPIXEL
        pixels = max(pixels, 1)
        batch = task_input.get("batch_size")
        return cls(
            model=model,
            task_type=task_type,
            pixel_bucket=round(math.log2(pixels / _MEGAPIXEL)),
            batch=batch if isinstance(batch, int) and batch > 0 else DEFAULT_BATCH_SIZE,
        )

    @property
    def work(self) -> float:
        """Relative amount of work against a 1 MP single image (run time scales about linearly)."""
        return 2.0**self.pixel_bucket * self.batch


@dataclass(frozen=True)
class LogNormal:
    mu: float
    sigma: float

    @classmethod
    def from_mean(cls, mean: float, spread: float) -> LogNormal:
        sigma = _log_sigma(spread)
        return cls(math.log(mean) - sigma * sigma / 2, sigma)

    def cdf(self, x: float) -> float:
        return 0.0 if x <= 0 else _NORMAL.cdf((math.log(x) - self.mu) / self.sigma)

    def quantile(self, p: float) -> float:
        return math.exp(self.mu + self.sigma * _NORMAL.inv_cdf(min(max(p, 1e-9), 1 - 1e-9)))

    @property
    def median(self) -> float:
        return math.exp(self.mu)

    def above(self, x: float, p: float) -> float:
        """The p-quantile of this distribution conditioned on being > x."""
        low = self.cdf(x)
        return max(x, self.quantile(low + p * (1 - low)))


@dataclass(frozen=True)
class Prior:
    queue_seconds: float
    run_seconds: float  # for 1 MP, one image


# Wide on purpose (spread 1.0 for the queue, 0.25 for the run): they only have to beat a fixed
# interval until a few tasks of the kind have finished.
PRIORS: dict[str, Prior] = {
    Model.SCHNELL.value: Prior(queue_seconds=0.8, run_seconds=3.5),
    Model.DEV.value: Prior(queue_seconds=1.2, run_seconds=19.0),
    Model.DEV_ADVANCED.value: Prior(queue_seconds=1.2, run_seconds=31.5),
}
PRIOR_QUEUE_SPREAD = 1.0
MAX_PACE = 20.0  # the priors are scaled by the observed pace, within 1/20 .. 20 times
PRIOR_RUN_SPREAD = 0.25
PRIOR_WEIGHT = 1.0  # how many samples' worth the prior's spread weighs once a kind has its own


@dataclass(frozen=True)
class Estimate:
    """Queue and run distributions for one kind, and how many finished tasks they rest on."""

    queue: LogNormal
    run: LogNormal
    samples: int

    @property
    def learned(self) -> bool:
        return self.samples >= MIN_SAMPLES

    def expected_total(self) -> float:
        return self.queue.median + self.run.median

    def completion_quantile(
        self, p: float, *, queued_for: float | None = None, running_for: float | None = None, elapsed: float = 0.0
    ) -> float:
        """Seconds after creation (or, with `running_for`, after the start) by which the task is done
        with probability p, given what is known: it is still queued `queued_for` seconds after
        creation, or has been running `running_for` seconds, and is not done `elapsed` seconds
        after creation."""
        if running_for is not None:
            return self.run.above(running_for, p)
        queued_for = max(0.0, queued_for or 0.0)
        # T = Q + R with Q > queued_for: average R's cdf over quantiles of the conditional queue time.
        low = self.queue.cdf(queued_for)
        queue_points = [
            max(queued_for, self.queue.quantile(low + (j + 0.5) / _QUEUE_POINTS * (1 - low)))
            for j in range(_QUEUE_POINTS)
        ]
        floor = max(queued_for, elapsed)
        done = _mixture(floor, queue_points, self.run)[0]
        if done >= 1 - 1e-9:
            return floor
        target = done + p * (1 - done)
        # Every component's cdf reaches the target there, so the mixture's does; and a task
        # already past the far tail is due now: never a time before `floor`.
        hi = max(floor, queue_points[-1] + self.run.quantile(max(0.9999, target)))
        return _solve(lambda t: _mixture(t, queue_points, self.run), target, floor, hi)


def _mixture(t: float, points: list[float], run: LogNormal) -> tuple[float, float]:
    """The cdf and density at `t` of Q + R, Q spread evenly over `points`: the mean over the points
    of R's cdf and density at `t - q`. Inlined: the poller evaluates it a few hundred times a task."""
    mu, sigma = run.mu, run.sigma
    cdf = density = 0.0
    for q in points:
        x = t - q
        if x > 0:
            z = (math.log(x) - mu) / sigma
            cdf += 0.5 * math.erfc(-z * _SQRT_HALF)
            density += math.exp(-0.5 * z * z) / (x * sigma * _SQRT_2PI)
    return cdf / len(points), density / len(points)


def _solve(f: Callable[[float], tuple[float, float]], target: float, lo: float, hi: float) -> float:
    """The t in [lo, hi] where f's increasing cdf reaches `target`, as the upper end of a bracket
    at most 1 ms wide (what plain bisection gives): Newton steps from the density while they stay
    inside the bracket, a bisection otherwise, and two probes 0.5 ms either side once Newton has
    landed. A few evaluations where bisection takes fifteen."""
    t = (lo + hi) / 2
    newton_steps = 0
    while hi - lo > _TOLERANCE and lo < (lo + hi) / 2 < hi:  # (the second: far out, floats run out)
        value, slope = f(t)
        if value < target:
            lo = t
        else:
            hi = t
        step = t + (target - value) / slope if slope > 0 else math.nan
        newton_steps += 1
        if not (lo < step < hi) or newton_steps > _NEWTON_STEPS:
            t = (lo + hi) / 2
        elif abs(step - t) < _TOLERANCE / 2:
            for probe in (min(hi, step + _TOLERANCE / 2), max(lo, step - _TOLERANCE / 2)):
                if lo < probe < hi:
                    if f(probe)[0] < target:
                        lo = probe
                    else:
                        hi = probe
            t = (lo + hi) / 2
        else:
            t = step
    return hi


def _fit(samples: Iterable[float], prior_spread: float, censored: Iterable[float] = ()) -> LogNormal:
    """The predictive log-normal of the next sample, from recent ones: the mean of their logs
    (outliers beyond 4 robust deviations of the median dropped), and a spread that pools their
    squared deviations with `PRIOR_WEIGHT` pseudo-samples at the prior's spread (a Bayesian
    update of the variance), times sqrt(1 + 1/n) for the uncertain mean. A handful of samples that
    happen to agree closely thus does not make the schedule overconfident (too narrow a fit lets a
    third of a batch finish before its first poll), while 64 of them speak for themselves.
    `censored` are lower bounds (tasks still running; see `_with_censored`)."""
    logs = sorted(math.log(max(s, 1e-3)) for s in samples)
    centre = statistics.median(logs)
    mad = statistics.median(abs(x - centre) for x in logs) * 1.4826
    kept = [x for x in logs if abs(x - centre) <= 4 * max(mad, MIN_SIGMA)] or logs
    n = len(kept)
    mean = statistics.fmean(kept)
    squares = sum((x - mean) ** 2 for x in kept)
    prior_squares = PRIOR_WEIGHT * _log_sigma(prior_spread) ** 2
    variance = (prior_squares + squares) / (PRIOR_WEIGHT + n - 1)
    bounds = _plausible([math.log(max(c, 1e-3)) for c in censored], above=centre + 4 * max(mad, MIN_SIGMA))
    if bounds:
        mean, variance = _with_censored(kept, bounds, mean, variance, prior_squares)
    return LogNormal(mean, max(MIN_SIGMA, math.sqrt(variance * (1 + 1 / n))))


def _plausible(bounds: list[float], *, above: float) -> Counter[float]:
    """The lower bounds (log seconds) worth fitting, grouped to 1 % (a batch's running tasks have
    much the same age): one task stuck far beyond every finished one (as outliers among those
    are dropped) is left out, but not when most of the running tasks are: that is a slowdown."""
    beyond = sum(1 for bound in bounds if bound > above)
    if 2 * beyond <= len(bounds):
        bounds = [bound for bound in bounds if bound <= above]
    return Counter(round(bound, 2) for bound in bounds)


def _with_censored(
    logs: list[float], bounds: Counter[float], mean: float, variance: float, prior_squares: float
) -> tuple[float, float]:
    """Mean and variance of the log durations when, besides the finished `logs`, some tasks are
    known only to take longer than `bounds` (still running when last seen; bound -> how many):
    expectation-maximisation for a right-censored normal, run to convergence (slow when most of
    a batch is still running just past its first finishers, which is when it matters). Without
    it, a batch's first tasks to finish, the quickest of it, would teach the rest that the kind is
    quicker than it is."""
    censored = sum(bounds.values())
    total = len(logs) + censored
    finished_sum, finished_squares = sum(logs), sum(x * x for x in logs)
    for _ in range(_EM_ROUNDS):
        sigma = math.sqrt(variance)
        first = second = 0.0  # sums of E[x] and E[x^2] over the censored ones
        for bound, count in bounds.items():
            a = (bound - mean) / sigma
            tail = _NORMAL.cdf(-a)  # P(z > a), accurate far out (no 1 - cdf cancellation)
            if tail > 1e-300:
                hazard = _NORMAL.pdf(a) / tail  # E[z | z > a]
                spread = max(0.0, 1 + a * hazard - hazard * hazard)  # Var[z | z > a]
            else:
                hazard, spread = a + 1 / a, 1 / (a * a)  # their limits far out
            expected = mean + sigma * hazard
            first += count * expected
            second += count * (expected * expected + variance * spread)
        new_mean = (finished_sum + first) / total
        squares = finished_squares + second - 2 * new_mean * (finished_sum + first) + total * new_mean**2
        new_variance = (prior_squares + max(0.0, squares)) / (PRIOR_WEIGHT + total - 1)
        done = abs(new_mean - mean) < 1e-6 and abs(new_variance - variance) < 1e-8
        mean, variance = new_mean, new_variance
        if done:
            break
    return mean, variance


def _log_sigma(spread: float) -> float:
    """The log-space sigma of a log-normal whose coefficient of variation is `spread`."""
    return math.sqrt(math.log1p(spread * spread))


@dataclass(frozen=True)
class Sample:
    queue: float
    run: float

    @classmethod
    def of(cls, record: TaskRecord) -> Sample | None:
        """Queue and run time from PiAPI's meta timestamps; None unless all three are present and sane."""
        if record.status != "completed" or not (record.created_at and record.started_at and record.ended_at):
            return None
        queue = (record.started_at - record.created_at).total_seconds()
        run = (record.ended_at - record.started_at).total_seconds()
        if queue < 0 or run <= 0 or queue + run > 24 * 3600:
            return None
        return cls(queue, run)


@dataclass(frozen=True)
class Running:
    """A task of the kind that had not finished when last seen: pending `queued` seconds after its
    creation (`ran` None: the queue lasts at least that long), or started after `queued` seconds
    and running for at least `ran`."""

    queued: float
    ran: float | None = None


class TimingStats:
    """Recent queue/run samples per kind (bounded), and the estimates the poller plans with."""

    def __init__(self, priors: Mapping[str, Prior] = PRIORS) -> None:
        self._priors = priors
        self._samples: OrderedDict[TaskKind, deque[Sample]] = OrderedDict()
        self._cache: dict[TaskKind, Estimate | None] = {}
        # Observed total time / the prior's, over recent tasks of every kind: how much faster or
        # slower this backend runs than the priors say (the simulator: far faster).
        self._pace: deque[float] = deque(maxlen=MAX_SAMPLES)

    def add(self, kind: TaskKind, sample: Sample) -> None:
        samples = self._samples.get(kind)
        if samples is None:
            samples = self._samples[kind] = deque(maxlen=MAX_SAMPLES)
            while len(self._samples) > MAX_KINDS:
                dropped, _ = self._samples.popitem(last=False)
                self._cache.pop(dropped, None)
        self._samples.move_to_end(kind)
        samples.append(sample)
        prior = self._priors.get(kind.model)
        if prior is not None:
            self._pace.append((sample.queue + sample.run) / (prior.queue_seconds + prior.run_seconds * kind.work))
            self._cache.clear()  # every cold kind's estimate follows the pace
        else:
            self._cache.pop(kind, None)

    def learn(self, kind: TaskKind, record: TaskRecord) -> bool:
        sample = Sample.of(record)
        if sample is not None:
            self.add(kind, sample)
        return sample is not None

    def samples(self, kind: TaskKind) -> list[Sample]:
        return list(self._samples.get(kind, ()))

    @property
    def kinds(self) -> int:
        return len(self._samples)

    def estimate(self, kind: TaskKind) -> Estimate | None:
        if kind not in self._cache:
            self._cache[kind] = self._estimate(kind)
        return self._cache[kind]

    def estimate_with(self, kind: TaskKind, running: Iterable[Running]) -> Estimate | None:
        """The learned estimate refitted with tasks of the kind still running: each says its
        duration is at least what it has reached so far. The kind's own estimate when it is
        not learned yet (a refit then would rest on the batch's quickest tasks alone)."""
        estimate = self.estimate(kind)
        running = list(running)
        if estimate is None or not estimate.learned or not running:
            return estimate
        samples = list(self._samples.get(kind, ()))
        return Estimate(
            queue=_fit(
                [s.queue for s in samples] + [r.queued for r in running if r.ran is not None],
                PRIOR_QUEUE_SPREAD,
                censored=[r.queued for r in running if r.ran is None],
            ),
            run=_fit([s.run for s in samples], PRIOR_RUN_SPREAD, censored=[r.ran for r in running if r.ran]),
            samples=len(samples),
        )

    def _estimate(self, kind: TaskKind) -> Estimate | None:
        prior = self._priors.get(kind.model)
        samples = list(self._samples.get(kind, ()))
        if len(samples) >= MIN_SAMPLES:
            queue = _fit((s.queue for s in samples), PRIOR_QUEUE_SPREAD)
            run = _fit((s.run for s in samples), PRIOR_RUN_SPREAD)
            return Estimate(queue=queue, run=run, samples=len(samples))
        if prior is None:
            return None
        pace = min(MAX_PACE, max(1 / MAX_PACE, statistics.median(self._pace))) if self._pace else 1.0
        return Estimate(
            queue=LogNormal.from_mean(prior.queue_seconds * pace, PRIOR_QUEUE_SPREAD),
            run=LogNormal.from_mean(prior.run_seconds * kind.work * pace, PRIOR_RUN_SPREAD),
            samples=len(samples),
        )

    @property
    def pace(self) -> float:
        """Median of observed / prior total time over recent tasks (1.0 with none)."""
        return statistics.median(self._pace) if self._pace else 1.0
