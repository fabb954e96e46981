"""Random binary patterns on a linear unit: memory decays as a power law with EWC, exponentially with SGD.

The paper's supplementary "random patterns" analysis. A linear unit h(x) = w·x with N weights
(w starts at 0) learns random patterns x_t ∈ {±1}^N → y_t ∈ {±1}, one after another, under a
squared loss ½(y − h)² (a Gaussian likelihood with unit noise). Each method takes the new pattern
in one exact step:

* SGD minimises the new pattern's loss alone: w ← w + η (y_t − w·x_t) x_t with a fixed step
  η = α/N (``--sgd-step`` α = 1 learns the pattern exactly, the smallest change that does).
* EWC adds the penalty of the patterns seen so far. For this model the Fisher of pattern k is
  x_k x_kᵀ, whose diagonal is x_k,i² = 1: after t − 1 patterns the diagonal Fisher is (t − 1)·1,
  so the penalty is λ(t − 1)/2·‖w − w_{t−1}‖² (one merged quadratic anchored at the latest
  weights, online EWC with γ = 1). Its exact minimiser is the same update with the step
  η_t = 1/(N + λ(t − 1)): equal to SGD's 1/N while t ≪ N/λ, falling like 1/(λt) beyond.
  (The paper's separate quadratics, one anchored at each old solution, pull towards the mean of
  all old solutions instead; we use the merged form, where the equivalence to a 1/t step is exact.)

Signal-to-noise ratio of pattern k after t patterns (the same definition for both methods):

    SNR_k(t) = E[y_k · h_t(x_k)] / sqrt(E[h_t(x)²]),

the mean response to the stored pattern (its signal) over the response spread to a fresh random
pattern x (the noise a memory must stand out from; for ±1 patterns E_x[h(x)²] = ‖w‖²), both
averaged over independent draws of the whole pattern sequence. A memory counts as retained while
its SNR exceeds ``--threshold``. Both expectations obey exact recursions (E[x xᵀ] = I):
signal_k ← (1 − η)·signal_k after it is learned with signal ηN, and
E‖w‖² ← E‖w‖²(1 − 2η + η²N) + η²N, so every curve comes with its theory (dashed in the figure).

For t ≪ N both methods follow SNR ≈ sqrt(N/t) (slope −½). Near the capacity t ~ N, SGD's
signal decays like e^{−t/N} while its noise saturates: exponential forgetting. EWC's annealed
step keeps SNR ≈ sqrt(N/t) for ever; with λ = 1 every pattern has the same SNR, so EWC keeps all
of them until the common SNR crosses the threshold and then loses them together.

Draws are simulated in chunks of vectorised [draws, N] weight matrices. Log–log slopes are fitted
on the early range t ≤ ``early_end``·N and the late range t ≥ ``late_start``·N, on the points
whose mean signal is at least 3 standard errors above zero (below that the average over draws is
noise).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ewc.checks import POSITIVE, POSITIVE_INT, SEED, THREADS, Interval
from ewc.config import validate
from ewc.experiments.common import (
    figure_style,
    finish,
    fit_loglog,
    md_table,
    new_figure,
    param,
    setup_runtime,
)

TITLE = "Random binary patterns on a linear unit: SNR of old memories under SGD and EWC"
CLAIM = (
    "For a linear network learning random binary patterns one at a time, the signal-to-noise ratio "
    "of an old pattern's memory first falls as a power law (slope ≈ −½ in log–log) for both plain "
    "SGD and EWC; near the network's capacity SGD's SNR decays exponentially, while EWC (whose "
    "Fisher grows with the number of patterns, annealing its learning rate like 1/t) stays on the "
    "power law and so retains memories for longer."
)
METHODS = ("sgd", "ewc")
CHUNK_FLOATS = 16_000_000  # patterns held at once: draws per chunk × patterns × N (64 MB in float32)


#: the smallest settings that still exercise every part of the experiment (contract tests)
SMALLEST = {"n_inputs": 32, "load": 6.0, "draws": 3000, "grid_points": 30}


@dataclass
class Config:
    """Size of the network, length of the sequence, number of draws and the two methods' steps."""

    n_inputs: int = param(
        100, "inputs N of the linear unit (its capacity is ~N patterns)", check=Interval(int, 4)
    )
    load: float = param(10.0, "patterns learned, as a multiple of N (T = load·N)", check=POSITIVE)
    draws: int = param(10000, "independent pattern sequences averaged over", check=POSITIVE_INT)
    lam: float = param(1.0, "EWC strength λ (1: the exact Gaussian posterior precision)", check=POSITIVE)
    sgd_step: float = param(
        1.0,
        "SGD step in units of 1/N (1 learns each pattern exactly; 0 < α < 2)",
        check=Interval(float, 0, 2, closed="neither"),  # larger steps diverge
    )
    threshold: float = param(0.5, "a memory is retained while its SNR exceeds this", check=POSITIVE)
    early_end: float = param(0.25, "early-regime fit range: 1 ≤ t ≤ early_end·N", check=POSITIVE)
    late_start: float = param(1.0, "late-regime fit range: late_start·N ≤ t ≤ T", check=POSITIVE)
    grid_points: int = param(
        60, "log-spaced numbers of patterns at which curves are recorded", check=POSITIVE_INT
    )
    seed: int = param(0, "seed of the pattern draws", check=SEED)
    threads: int = param(1, "torch threads", check=THREADS)

    def __post_init__(self) -> None:
        validate(self)
        if self.patterns < 2:
            raise ValueError(f"load·n_inputs must give at least 2 patterns, got {self.patterns}")
        if self.early_end * self.n_inputs < 2:
            raise ValueError("early_end·n_inputs must be at least 2 (the early fit needs 2 points)")
        if self.late_start * self.n_inputs >= self.patterns:
            raise ValueError(f"late_start ({self.late_start}) must be below load ({self.load})")

    @property
    def patterns(self) -> int:
        """T, the number of patterns learned."""
        return int(round(self.load * self.n_inputs))


def steps(method: str, config: Config) -> np.ndarray:
    """The step η_t used to learn pattern t = 1..T (float64, [T])."""
    n, t = config.n_inputs, np.arange(config.patterns, dtype=np.float64)
    if method == "sgd":
        return np.full(config.patterns, config.sgd_step / n)
    return 1.0 / (n + config.lam * t)  # t = number of patterns seen before


def grid(config: Config) -> np.ndarray:
    """The log-spaced numbers of patterns seen (1..T) at which curves are recorded."""
    points = np.logspace(0, math.log10(config.patterns), config.grid_points)
    return np.unique(np.concatenate([np.rint(points).astype(int), [config.patterns]]))


def theory(eta: np.ndarray, n: int, ts: np.ndarray) -> dict[str, np.ndarray]:
    """Exact expectations: SNR of pattern 1 at every t in ``ts``, and SNR_k(t) for k ≤ t (rows)."""
    big_t = len(eta)
    decay = np.concatenate([[0.0], np.cumsum(np.log1p(-eta))])  # decay[t] = Σ_{s≤t} log(1 − η_s)
    q = np.zeros(big_t + 1)
    for t in range(big_t):
        q[t + 1] = q[t] * (1 - 2 * eta[t] + eta[t] ** 2 * n) + eta[t] ** 2 * n
    first = [eta[0] * n * math.exp(decay[t] - decay[1]) / math.sqrt(q[t]) for t in ts]
    per_pattern = [eta[:t] * n * np.exp(decay[t] - decay[1 : t + 1]) / math.sqrt(q[t]) for t in ts]
    return {"first": np.asarray(first), "per_pattern": per_pattern}


def simulate(config: Config, gen: torch.Generator) -> dict[str, dict[str, Any]]:
    """Learn the patterns with both methods on the same draws; sums over draws at the grid points.

    Returns per method: ``signal``/``signal_sq`` (pattern 1), ``norm_sq`` (‖w‖²), all [len(grid)],
    and ``per_pattern``: for each grid point t, the sum over draws of y_k·h_t(x_k), k = 1..t.
    """
    n, big_t, ts = config.n_inputs, config.patterns, grid(config)
    at = {int(t): i for i, t in enumerate(ts)}
    eta = {m: torch.tensor(steps(m, config), dtype=torch.float32) for m in METHODS}
    sums = {
        m: {
            "signal": np.zeros(len(ts)),
            "signal_sq": np.zeros(len(ts)),
            "norm_sq": np.zeros(len(ts)),
            "per_pattern": [np.zeros(int(t)) for t in ts],
        }
        for m in METHODS
    }
    chunk = max(1, CHUNK_FLOATS // (big_t * n))
    for start in range(0, config.draws, chunk):
        b = min(chunk, config.draws - start)
        x = torch.randint(0, 2, (b, big_t, n), generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
        y = torch.randint(0, 2, (b, big_t), generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
        for m in METHODS:
            s, w = sums[m], torch.zeros(b, n)
            for t in range(big_t):  # learn pattern t + 1
                error = y[:, t] - (w * x[:, t]).sum(1)
                w += (eta[m][t] * error).unsqueeze(1) * x[:, t]
                if t + 1 in at:
                    i = at[t + 1]
                    recall = y[:, : t + 1] * torch.bmm(x[:, : t + 1], w.unsqueeze(2)).squeeze(2)  # y_k h(x_k)
                    s["signal"][i] += float(recall[:, 0].sum())
                    s["signal_sq"][i] += float(recall[:, 0].square().sum())
                    s["norm_sq"][i] += float(w.square().sum())
                    s["per_pattern"][i] += recall.sum(0).double().numpy()
    return sums


def analyse(config: Config, sums: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """SNR curves, retained fractions, fitted slopes and theory for each method."""
    n, d, ts = config.n_inputs, config.draws, grid(config)
    early = ts <= config.early_end * n
    late = ts >= config.late_start * n
    out: dict[str, Any] = {}
    for m in METHODS:
        s = sums[m]
        noise = np.sqrt(s["norm_sq"] / d)
        signal = s["signal"] / d
        se = np.sqrt(np.maximum(s["signal_sq"] / d - signal**2, 0.0) / max(d - 1, 1))
        snr, snr_se = signal / noise, se / noise
        reliable = signal > 3 * se
        snr_k = [p / d / noise[i] for i, p in enumerate(s["per_pattern"])]
        retained = np.array([(v > config.threshold).sum() for v in snr_k])
        th = theory(steps(m, config), n, ts)
        th_retained = np.array([(v > config.threshold).sum() for v in th["per_pattern"]])
        late_ok = late & reliable
        exp_rate = (
            float(np.polyfit(ts[late_ok] / n, np.log(snr[late_ok]), 1)[0]) if late_ok.sum() >= 2 else math.nan
        )
        out[m] = {
            "snr": snr.tolist(),
            "snr_se": snr_se.tolist(),
            "reliable": reliable.tolist(),
            "snr_theory": th["first"].tolist(),
            "retained_count": retained.tolist(),
            "retained_fraction": (retained / ts).tolist(),
            "retained_fraction_theory": (th_retained / ts).tolist(),
            "slope_early": fit_loglog(ts[early & reliable], snr[early & reliable]),
            "slope_late": fit_loglog(ts[late_ok], snr[late_ok]),
            "late_points": int(late_ok.sum()),
            "exp_rate_late": exp_rate,
            # theory fitted on the same points as the simulation
            "slope_early_theory": fit_loglog(ts[early & reliable], th["first"][early & reliable]),
            "slope_late_theory": fit_loglog(ts[late_ok], th["first"][late_ok]),
            "exp_rate_late_theory": (
                float(np.polyfit(ts[late_ok] / n, np.log(th["first"][late_ok]), 1)[0])
                if late_ok.sum() >= 2
                else math.nan
            ),
            "peak_retained_per_n": float(retained.max() / n),
            "peak_retained_at": int(ts[retained.argmax()]),
            # |simulation − theory| in standard errors (the t = 1 point is exact in every draw: se = 0)
            "max_z_theory": float(np.max(np.abs(snr - th["first"]) / np.hypot(snr_se, 1e-6 * th["first"]))),
        }
    return out


def run(config: Config, out: str | None = None) -> dict[str, Any]:
    """Simulate both methods, fit the slopes, and write results, figures and report."""
    start = time.perf_counter()
    gen = setup_runtime(config.seed, config.threads)
    sums = simulate(config, gen)
    methods = analyse(config, sums)
    ts = grid(config)
    results = {
        "results": {
            "n_inputs": config.n_inputs,
            "capacity": config.n_inputs,
            "patterns": config.patterns,
            "load": config.patterns / config.n_inputs,
            "patterns_seen": ts.tolist(),
            "early_range": [1, config.early_end * config.n_inputs],
            "late_range": [config.late_start * config.n_inputs, config.patterns],
            "methods": methods,
        }
    }
    seconds = time.perf_counter() - start
    findings = make_findings(config, results["results"])
    table = md_table(
        ["method", "slope early", "slope late", "late rate per N", "peak retained / N", "SNR at T"],
        [
            [
                m.upper(),
                f"{r['slope_early']:.3f} ({r['slope_early_theory']:.3f})",
                f"{r['slope_late']:.3f} ({r['slope_late_theory']:.3f})",
                f"{r['exp_rate_late']:.2f} ({r['exp_rate_late_theory']:.2f})",
                f"{r['peak_retained_per_n']:.2f}",
                f"{r['snr'][-1]:.3g} ({r['snr_theory'][-1]:.3g})",
            ]
            for m, r in methods.items()
        ],
    )
    table = (
        "Simulation (exact theory in brackets); the late rate is the fitted d ln SNR / d(t/N).\n\n" + table
    )
    return finish(
        out,
        "patterns",
        config,
        results,
        title=TITLE,
        claim=CLAIM,
        figures=figures(config, results["results"]) if out is not None else {},
        findings=findings,
        tables=[table],
        seconds=seconds,
    )


def _times_n(x: float) -> str:
    """A multiple of N as text: 'N', '0.25N'."""
    return "N" if x == 1 else f"{x:g}N"


def make_findings(config: Config, r: dict[str, Any]) -> list[str]:
    """Sentences computed from the measured curves, read against the paper's claim."""
    n, big_t, ts = config.n_inputs, r["patterns"], np.asarray(r["patterns_seen"])
    sgd, ewc = r["methods"]["sgd"], r["methods"]["ewc"]
    lines = [
        f"Early regime (t ≤ {_times_n(config.early_end)}, N = {n}): the log–log slope of the first "
        f"pattern's SNR is {sgd['slope_early']:.3f} for SGD and {ewc['slope_early']:.3f} for EWC "
        f"(paper: ≈ −0.5 for both; {config.draws} draws).",
    ]
    exp_sgd, exp_ewc = sgd["exp_rate_late"], ewc["exp_rate_late"]
    lines.append(
        f"Late regime (t ≥ {_times_n(config.late_start)}): SGD's SNR falls by a factor e^{-exp_sgd:.2f} "
        f"per N patterns (log–log slope {sgd['slope_late']:.2f} over {sgd['late_points']} reliable points), "
        f"EWC's by e^{-exp_ewc:.2f} (log–log slope {ewc['slope_late']:.2f})."
    )
    on_power_law = abs(ewc["slope_late"] + 0.5) < 0.15
    sgd_faster = (
        math.isfinite(exp_sgd) and exp_sgd < 3 * exp_ewc and sgd["slope_late"] < ewc["slope_late"] - 0.5
    )
    if on_power_law and sgd_faster:
        lines.append(
            "As in the paper: near capacity SGD forgets exponentially while EWC stays on the power law."
        )
    else:
        lines.append(
            "Not as the paper says: "
            + ("EWC leaves the −0.5 power law late; " if not on_power_law else "")
            + ("SGD does not decay clearly faster than EWC late." if not sgd_faster else "")
        )

    def at_end(res: dict[str, Any]) -> str:
        snr, se, th = res["snr"][-1], res["snr_se"][-1], res["snr_theory"][-1]
        if res["reliable"][-1]:
            return f"{snr:.3g} ± {se:.2g} (theory {th:.2g})"
        return f"indistinguishable from 0 in simulation ({snr:.2g} ± {se:.2g}; theory {th:.2g})"

    lines.append(
        f"After T = {big_t} patterns ({r['load']:g}N) the first pattern's SNR is {at_end(sgd)} with SGD and "
        f"{at_end(ewc)} with EWC."
    )
    f_sgd, f_ewc = np.asarray(sgd["retained_fraction"]), np.asarray(ewc["retained_fraction"])
    lines.append(
        f"Most memories held at once (SNR > {config.threshold:g}): SGD {sgd['peak_retained_per_n']:.2f}N "
        f"(at t = {sgd['peak_retained_at']}), EWC {ewc['peak_retained_per_n']:.2f}N "
        f"(at t = {ewc['peak_retained_at']})."
    )
    beyond = ts >= n
    ahead = beyond & (f_ewc > f_sgd)
    behind = beyond & (f_ewc < f_sgd)
    if ahead.any():
        text = (
            f"Beyond capacity EWC retains a larger fraction of the patterns seen than SGD from "
            f"t = {ts[ahead][0]} (EWC {f_ewc[ahead][0]:.0%}, SGD {f_sgd[ahead][0]:.0%})"
        )
        later = behind & (ts > ts[ahead][0])
        if later.any():
            t_x = ts[later][0]
            text += (
                f" up to t ≈ {t_x} ({t_x / n:.1f}N); from there on it retains fewer: EWC's patterns "
                "share one SNR, which crosses the threshold for all of them at once "
                f"(at T: EWC {f_ewc[-1]:.0%}, SGD {f_sgd[-1]:.0%})."
            )
        else:
            text += f" through T (at T: EWC {f_ewc[-1]:.0%}, SGD {f_sgd[-1]:.0%})."
        lines.append(text)
    else:
        lines.append(
            f"EWC never retains a larger fraction than SGD beyond capacity (at T: EWC {f_ewc[-1]:.0%}, "
            f"SGD {f_sgd[-1]:.0%}): not as the paper says."
        )
    z = max(sgd["max_z_theory"], ewc["max_z_theory"])
    lines.append(
        f"The simulated SNR of the first pattern stays within {z:.1f} standard errors of the exact "
        f"expectation recursions at all {len(ts)} recorded points."
    )
    return lines


def figures(config: Config, r: dict[str, Any]) -> dict[str, Any]:
    """snr.png (log–log SNR of the first pattern) and retained.png (memories above the threshold)."""
    from ewc.report import method_color, method_label

    n, ts = config.n_inputs, np.asarray(r["patterns_seen"])
    with figure_style():
        fig = new_figure((6.4, 4.4))
        ax = fig.add_subplot()
        for m, res in r["methods"].items():
            snr, ok = np.asarray(res["snr"]), np.asarray(res["reliable"])
            c = method_color(m)
            ax.plot(ts[ok], snr[ok], "o-", ms=3, lw=1.2, color=c, label=f"{method_label(m)} (simulation)")
            ax.plot(
                ts, res["snr_theory"], "--", lw=1, color=c, alpha=0.8, label=f"{method_label(m)} (theory)"
            )
        snr0 = r["methods"]["sgd"]["snr_theory"][0]
        ax.plot(ts, snr0 * ts**-0.5, ":", color="black", lw=1, label="slope −0.5")
        floor = 3 * float(np.median(r["methods"]["ewc"]["snr_se"][len(ts) // 2 :]))
        ax.axhline(floor, color="0.6", lw=0.8, ls="-.", label="3 s.e. of the mean (simulation floor)")
        ax.axvline(n, color="0.4", lw=0.8)
        ax.text(n, snr0, " N", va="top", color="0.3")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(max(floor / 10, 1e-4), snr0 * 1.5)
        ax.set_xlabel("patterns seen t")
        ax.set_ylabel("SNR of the first pattern")
        ax.set_title(f"Linear unit, N = {n}, {config.draws} draws")
        ax.legend(loc="lower left", fontsize=8)

        fig2 = new_figure((9.5, 3.8))
        axes = fig2.subplots(1, 2)
        for m, res in r["methods"].items():
            c = method_color(m)
            axes[0].plot(ts, res["retained_fraction"], "o-", ms=3, lw=1.2, color=c, label=method_label(m))
            axes[0].plot(ts, res["retained_fraction_theory"], "--", lw=1, color=c, alpha=0.8)
            axes[1].plot(ts, np.asarray(res["retained_count"]) / n, "o-", ms=3, lw=1.2, color=c)
        for ax2 in axes:
            ax2.set_xscale("log")
            ax2.axvline(n, color="0.4", lw=0.8)
            ax2.set_xlabel("patterns seen t")
        axes[0].set_ylabel(f"fraction of patterns with SNR > {config.threshold:g}")
        axes[1].set_ylabel(f"patterns with SNR > {config.threshold:g}, per N")
        axes[0].legend(title="solid: simulation, dashed: theory", fontsize=8)
        fig2.suptitle("Memories retained (vertical line: N)")
    return {"snr.png": fig, "retained.png": fig2}
