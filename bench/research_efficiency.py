"""How good skylab's keep/revert decisions are, against a synthetic experiment of known truth.

A simulated driver runs whole campaigns through the real decision code of
`skylab.engine` (`next_action`, `judge`, `pooled_sigma`, `best_kept`, `prune_reason`)
the way the local driver does: start the baseline, ask the strategy for a change on
top of the best kept point, start each run `next_action` asks for (a trial's next run,
or the best's, measured again), judge a trial after each of its runs and again after
each run of the best it waits for, until `next_action` says Stop. Only train.py is
simulated.

The synthetic experiment. train.py has five module-level constants with 4, 4, 3, 5 and
4 allowed values; value 0 of each is the baseline's. A point's true metric (val_bpb-like,
lower is better) is additive: 1.0 plus the sum of its values' effects, the baseline's
values having effect 0. Each campaign seed draws every other value's effect once, in
units of the run-to-run spread measured on the CPU profile (REFERENCE_SIGMA, 0.015):

- 20 % help: -0.5 to -3 of those units, so that a true gain is comparable to the noise;
- 65 % are neutral or slightly harmful: -0.2 to +0.6 units;
- 15 % clearly harm: +3 to +8 units.

The true optimum of the (finite) space is then 1.0 plus the sum of each constant's
lowest effect. One run's observed metric is the true value plus Gaussian noise of sd
--noise (0.015 by default); the effects stay fixed, so a larger --noise makes the same
changes harder to tell apart.

Each run also reports a training-loss curve at 5 %, 10 %, ..., 100 % of the budget:
loss(f) = true value + the run's noise draw + (CURVE_HEIGHT + slow start) * (1 - f)^2 +
a small per-point jitter. A quarter of the values carry a slow start (0.02 to 0.12),
summed over a point's values: such a change trains worse early and ends the same, so
pruning on the curve can stop a change that would have been kept. While a run goes,
its curve is fed point by point to `prune_reason` against the best kept trial's and the
baseline's curves; a pruned run costs the share of the budget it reached.

The strategy is a random sweep: each proposal changes ONE constant of the parent to
another of its values, drawn at random among the parent's neighbours not tried yet in
the campaign (among all of them when every one was tried).

Every configuration runs the same --campaigns experiments (seeds --seed, --seed + 1,
...) with the same budget, --hours of runs of --budget-seconds each (8 h of 300 s
runs: 96 runs), as a user gives a campaign hours: noise-aware at the defaults, the
same with pruning on, the same at z = 2, and `noise = "off"`. A campaign's clock counts
the runs' shares of the budget, so pruning buys more trials.

    .venv/bin/python bench/research_efficiency.py
    .venv/bin/python bench/research_efficiency.py --campaigns 400 --hours 16 --noise 0.03

It prints a Markdown table, also written to $OUT/research_efficiency.md when OUT is set.
It needs only the standard library and skylab.engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from skylab import engine

BASE_VALUE = 1.0
REFERENCE_SIGMA = 0.015
VALUE_COUNTS: tuple[int, ...] = (4, 4, 3, 5, 4)
# (share of values, lowest effect, highest effect), effects in REFERENCE_SIGMA units.
EFFECT_KINDS: tuple[tuple[float, float, float], ...] = (
    (0.20, -3.0, -0.5),
    (0.65, -0.2, 0.6),
    (0.15, 3.0, 8.0),
)
SLOW_START_SHARE = 0.25
SLOW_START_RANGE = (0.02, 0.12)
CURVE_HEIGHT = 3.0
# The per-point jitter of a loss curve, as a share of --noise: a run's curve mostly
# follows its own noise draw, as a seed's training loss follows its val_bpb.
CURVE_JITTER = 0.25
FRACTIONS: tuple[float, ...] = tuple(k / 20 for k in range(1, 21))

OBJECTIVE = engine.Objective("minimize")

Point = tuple[int, ...]
Curve = tuple[engine.CurvePoint, ...]


@dataclass(frozen=True)
class Experiment:
    """The truth of one campaign: EFFECTS[c][v] is value v of constant c's effect."""

    effects: tuple[tuple[float, ...], ...]
    slow_starts: tuple[tuple[float, ...], ...]

    @property
    def baseline(self) -> Point:
        return tuple(0 for _ in self.effects)

    def true_value(self, point: Point) -> float:
        return BASE_VALUE + math.fsum(row[v] for row, v in zip(self.effects, point, strict=True))

    def slow_start(self, point: Point) -> float:
        return math.fsum(row[v] for row, v in zip(self.slow_starts, point, strict=True))

    def optimum(self) -> float:
        """The best true value of the whole space: additive, so each constant's best."""
        return BASE_VALUE + math.fsum(min(row) for row in self.effects)

    def neighbours(self, point: Point) -> list[Point]:
        """The points that differ from POINT in exactly one constant."""
        return [
            (*point[:c], v, *point[c + 1 :])
            for c, row in enumerate(self.effects)
            for v in range(len(row))
            if v != point[c]
        ]


def draw_effect(rng: random.Random) -> float:
    pick = rng.random()
    for share, low, high in EFFECT_KINDS:
        if pick < share:
            return rng.uniform(low, high) * REFERENCE_SIGMA
        pick -= share
    _, low, high = EFFECT_KINDS[-1]
    return rng.uniform(low, high) * REFERENCE_SIGMA


def draw_slow_start(rng: random.Random) -> float:
    return rng.uniform(*SLOW_START_RANGE) if rng.random() < SLOW_START_SHARE else 0.0


def draw_experiment(rng: random.Random, value_counts: Sequence[int] = VALUE_COUNTS) -> Experiment:
    effects = tuple((0.0, *(draw_effect(rng) for _ in range(count - 1))) for count in value_counts)
    slow_starts = tuple(
        (0.0, *(draw_slow_start(rng) for _ in range(count - 1))) for count in value_counts
    )
    return Experiment(effects, slow_starts)


# One run of the simulated train.py.


@dataclass(frozen=True)
class RunOutcome:
    run: engine.RunView
    curve: Curve
    fraction: float  # of the budget it used


def loss_at(experiment: Experiment, point: Point, offset: float, fraction: float) -> float:
    """The noiseless training loss at FRACTION of a run whose seed is OFFSET off."""
    height = CURVE_HEIGHT + experiment.slow_start(point)
    return experiment.true_value(point) + offset + height * (1.0 - fraction) ** 2


def simulate_run(
    experiment: Experiment,
    point: Point,
    number: int,
    noise: float,
    rng: random.Random,
    policy: engine.NoisePolicy,
    best_curves: Sequence[Curve],
    baseline_curves: Sequence[Curve],
) -> RunOutcome:
    """Train POINT once, asking prune_reason after every progress point but the last (by
    then the run has ended on its own)."""
    offset = rng.gauss(0.0, noise)
    curve: list[engine.CurvePoint] = []
    for fraction in FRACTIONS:
        loss = loss_at(experiment, point, offset, fraction) + rng.gauss(0.0, noise * CURVE_JITTER)
        curve.append(engine.CurvePoint(fraction, loss))
        if fraction < FRACTIONS[-1] and engine.prune_reason(
            policy, curve, best_curves, baseline_curves
        ):
            return RunOutcome(engine.RunView(number, "pruned"), tuple(curve), fraction)
    metric = experiment.true_value(point) + offset
    return RunOutcome(engine.RunView(number, "success", metric), tuple(curve), 1.0)


def propose(experiment: Experiment, parent: Point, tried: set[Point], rng: random.Random) -> Point:
    """The random sweep: change one constant of PARENT, preferring untried points."""
    neighbours = experiment.neighbours(parent)
    untried = [point for point in neighbours if point not in tried]
    return rng.choice(untried or neighbours)


# The simulated driver.


@dataclass(frozen=True)
class Config:
    """One way of deciding, run for BUDGET_RUNS whole training budgets (and at most
    TRIALS trials, when given), as a user gives a campaign hours."""

    name: str
    policy: engine.NoisePolicy
    budget_runs: float
    trials: int | None = None


@dataclass
class Campaign:
    """What one campaign did, and how it compares with the truth."""

    experiment: Experiment
    trials: list[engine.TrialView] = field(default_factory=list)
    points: dict[str, Point] = field(default_factory=dict)
    curves: dict[int, list[Curve]] = field(default_factory=dict)
    executions: int = 0
    budget_used: float = 0.0  # in whole training budgets
    budget_saved: float = 0.0  # the unspent share of pruned runs, in whole budgets
    true_keeps: int = 0
    false_keeps: int = 0
    pruned_trials: int = 0
    false_prunes: int = 0

    def true_value(self, trial: engine.TrialView) -> float:
        return self.experiment.true_value(self.points[trial.commit])

    def final_value(self) -> float:
        best = engine.best_kept(self.trials, OBJECTIVE)
        assert best is not None  # the baseline is always kept in these campaigns
        return self.true_value(best)

    def baseline_value(self) -> float:
        return self.experiment.true_value(self.experiment.baseline)

    def regret(self) -> float:
        return self.final_value() - self.experiment.optimum()


def decided(trials: Sequence[engine.TrialView]) -> list[engine.TrialView]:
    return [trial for trial in trials if trial.status != "running"]


def start_trial(campaign: Campaign, number: int, point: Point, parent: str | None) -> None:
    commit = str(number)
    campaign.points[commit] = point
    campaign.curves[number] = []
    campaign.trials.append(
        engine.TrialView(number, "running", parent is None, commit, parent=parent)
    )


def index_of(trials: Sequence[engine.TrialView], number: int) -> int:
    return next(i for i, trial in enumerate(trials) if trial.number == number)


def curves_of(campaign: Campaign, trial: engine.TrialView | None) -> list[Curve]:
    return [] if trial is None else campaign.curves[trial.number]


def run_once(
    campaign: Campaign,
    number: int,
    config: Config,
    noise: float,
    rng: random.Random,
    limits: engine.CampaignLimits,
) -> None:
    """Run trial NUMBER once more, then record what judge makes of it (the best kept
    trial, measured again, only takes the run into its mean)."""
    at = index_of(campaign.trials, number)
    trial = campaign.trials[at]
    best = engine.best_kept(decided(campaign.trials), OBJECTIVE)
    baseline = next(t for t in campaign.trials if t.is_baseline)
    point = campaign.points[trial.commit]
    outcome = simulate_run(
        campaign.experiment,
        point,
        len(trial.runs) + 1,
        noise,
        rng,
        config.policy,
        # As the real driver does: only a trial's first run is pruned; its confirmations,
        # asked for on a promising first run, are paid for whole.
        curves_of(campaign, best) if not trial.counted_runs else [],
        curves_of(campaign, baseline),
    )
    campaign.executions += 1
    campaign.budget_used += outcome.fraction
    if outcome.run.status == "pruned":
        campaign.budget_saved += 1.0 - outcome.fraction
    campaign.curves[number].append(outcome.curve)
    trial = dataclasses.replace(trial, runs=(*trial.runs, outcome.run))
    if trial.status == "running":
        campaign.trials[at] = trial
        decide(campaign, at, config, limits)
        return
    # The best, measured again: the trials waiting for it are judged against its new mean.
    campaign.trials[at] = dataclasses.replace(trial, metric=statistics.fmean(trial.values()))
    for waiting, other in enumerate(campaign.trials):
        if other.status == "running" and not other.run_in_flight:
            decide(campaign, waiting, config, limits)


def decide(campaign: Campaign, at: int, config: Config, limits: engine.CampaignLimits) -> None:
    """Judge the trial at AT, none of its runs going, as the drivers' settle step does."""
    trial = campaign.trials[at]
    best = None if trial.is_baseline else engine.best_kept(decided(campaign.trials), OBJECTIVE)
    sigma = engine.pooled_sigma(campaign.trials, config.policy.sigma_floor)
    spent = limits.budget_spent(campaign.budget_used)
    judgement = engine.judge(OBJECTIVE, config.policy, trial, best, sigma, budget_spent=spent)
    if isinstance(judgement, engine.Verdict):
        values = trial.values()
        trial = dataclasses.replace(
            trial,
            status=judgement.status,
            kept=judgement.kept,
            metric=statistics.fmean(values) if values else None,
        )
        if best is not None and not trial.is_baseline:
            score(campaign, trial, best)
        campaign.trials[at] = trial


def score(campaign: Campaign, trial: engine.TrialView, best: engine.TrialView) -> None:
    """Count a decided trial against the truth of the best it was measured against."""
    truly_better = campaign.true_value(trial) < campaign.true_value(best)
    if trial.kept:
        if truly_better:
            campaign.true_keeps += 1
        else:
            campaign.false_keeps += 1
    if trial.status == "pruned":
        # A pruned trial's first pruned run ends it: judge never keeps it.
        campaign.pruned_trials += 1
        campaign.false_prunes += truly_better


def run_campaign(experiment: Experiment, config: Config, noise: float, seed: str) -> Campaign:
    """One campaign of CONFIG on EXPERIMENT, driven by engine.next_action until it stops.
    Its clock counts whole training budgets: the budget is CONFIG's budget_runs."""
    runs_rng = random.Random(f"{seed}/runs")
    sweep_rng = random.Random(f"{seed}/sweep")
    limits = engine.CampaignLimits(max_trials=config.trials, budget_seconds=config.budget_runs)
    campaign = Campaign(experiment)
    while True:
        action = engine.next_action(
            campaign.trials, limits, OBJECTIVE, campaign.budget_used, policy=config.policy
        )
        if isinstance(action, engine.Stop):
            return campaign
        if isinstance(action, engine.StartBaseline):
            start_trial(campaign, action.number, experiment.baseline, None)
        elif isinstance(action, engine.Propose):
            tried = set(campaign.points.values())
            parent = campaign.points[action.parent_commit]
            point = propose(experiment, parent, tried, sweep_rng)
            start_trial(campaign, action.number, point, action.parent_commit)
        else:
            run_once(campaign, action.number, config, noise, runs_rng, limits)


# Many campaigns, summed up.


@dataclass(frozen=True)
class Summary:
    config: Config
    campaigns: tuple[Campaign, ...]
    budget_seconds: float

    @property
    def trials(self) -> float:
        return statistics.fmean([len(c.trials) for c in self.campaigns])

    @property
    def executions(self) -> float:
        return statistics.fmean([c.executions for c in self.campaigns])

    @property
    def seconds_saved(self) -> float:
        return statistics.fmean([c.budget_saved * self.budget_seconds for c in self.campaigns])

    @property
    def execution_seconds(self) -> float:
        return statistics.fmean([c.budget_used * self.budget_seconds for c in self.campaigns])

    @property
    def true_keeps(self) -> int:
        return sum(c.true_keeps for c in self.campaigns)

    @property
    def false_keeps(self) -> int:
        return sum(c.false_keeps for c in self.campaigns)

    @property
    def pruned_trials(self) -> int:
        return sum(c.pruned_trials for c in self.campaigns)

    @property
    def false_prunes(self) -> int:
        return sum(c.false_prunes for c in self.campaigns)

    @property
    def regret(self) -> float:
        return statistics.fmean([c.regret() for c in self.campaigns])

    @property
    def worse_than_baseline(self) -> int:
        return sum(c.final_value() > c.baseline_value() for c in self.campaigns)


def experiments_for(campaigns: int, seed: int) -> list[Experiment]:
    return [draw_experiment(random.Random(f"{seed + i}/truth")) for i in range(campaigns)]


def summarize(
    config: Config, experiments: Sequence[Experiment], noise: float, seed: int, budget: float
) -> Summary:
    campaigns = tuple(
        run_campaign(experiment, config, noise, str(seed + i))
        for i, experiment in enumerate(experiments)
    )
    return Summary(config, campaigns, budget)


def run_configurations(
    campaigns: int, budget_runs: float, noise: float, seed: int, budget: float
) -> list[Summary]:
    """The configurations, each on the same experiments with the same budget."""
    experiments = experiments_for(campaigns, seed)
    aware = engine.NoisePolicy()
    configs = [
        Config("noise-aware (the default)", aware, budget_runs),
        Config("noise-aware, pruning on", dataclasses.replace(aware, prune=True), budget_runs),
        Config("noise-aware, z = 2", dataclasses.replace(aware, z=2.0), budget_runs),
        Config("noise off", engine.NoisePolicy(aware=False), budget_runs),
    ]
    return [summarize(config, experiments, noise, seed, budget) for config in configs]


# The report.

COLUMNS = (
    "configuration",
    "trials / campaign",
    "executions / campaign",
    "execution-seconds / campaign",
    "true keeps",
    "false keeps",
    "false keeps / campaign",
    "pruned trials",
    "false prunes",
    "mean regret",
    "final worse than baseline",
)


def row(summary: Summary) -> list[str]:
    count = len(summary.campaigns)
    return [
        summary.config.name,
        f"{summary.trials:.1f}",
        f"{summary.executions:.1f}",
        f"{summary.execution_seconds:.0f}",
        str(summary.true_keeps),
        str(summary.false_keeps),
        f"{summary.false_keeps / count:.2f}",
        str(summary.pruned_trials),
        str(summary.false_prunes),
        f"{summary.regret:.4f}",
        str(summary.worse_than_baseline),
    ]


def table(summaries: Sequence[Summary]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(summary)) + " |" for summary in summaries]
    return lines


def report(summaries: Sequence[Summary], args: argparse.Namespace) -> str:
    default, pruning = summaries[0], summaries[1]
    saved = pruning.seconds_saved
    share = saved / pruning.execution_seconds if pruning.execution_seconds else 0.0
    lines = [
        f"research efficiency: {args.campaigns} campaigns of {args.hours:g} h each "
        f"({args.hours * 3600 / args.budget_seconds:g} runs of {args.budget_seconds:g} s), "
        f"noise {args.noise:g}, seed {args.seed}",
        "",
        *table(summaries),
        "",
        f"early stopping: pruned runs left {saved:.0f} execution-seconds per campaign unspent "
        f"({share:.0%} of the budget), spent on more trials ({pruning.trials:.1f} against "
        f"{default.trials:.1f}); mean regret {pruning.regret:.4f} with pruning, "
        f"{default.regret:.4f} without",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--campaigns", type=int, default=24)
    parser.add_argument("--hours", type=float, default=8.0, help="each campaign's budget")
    parser.add_argument("--budget-seconds", type=float, default=300.0, help="of one whole run")
    parser.add_argument("--noise", type=float, default=0.015, help="run-to-run sd of the metric")
    parser.add_argument("--seed", type=int, default=0, help="of the first campaign")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.campaigns < 1 or not args.budget_seconds > 0:
        parser.error("--campaigns must be at least 1 and --budget-seconds positive")
    runs = args.hours * 3600 / args.budget_seconds
    if not runs >= 2 or not args.noise >= 0:
        parser.error("--hours must give at least 2 runs and --noise must not be negative")
    summaries = run_configurations(args.campaigns, runs, args.noise, args.seed, args.budget_seconds)
    text = report(summaries, args)
    print(text)
    out = os.environ.get("OUT")
    if out:
        Path(out, "research_efficiency.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
