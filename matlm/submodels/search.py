"""Search for per-layer FFN width vectors on the Pareto front of metric vs cost.

    space = SearchSpace.build(config, "granularities")
    budget = Budget("params", 5e6, seq_len=128)
    result = search(space, budget, evaluate, method="evolution", max_evals=64, seed=0)

`evaluate(list of width vectors) -> list of metric values` is the only model-facing
piece (the CLI scores each candidate's held-out loss or the task's primary metric, the
one `matlm eval` reports, through the masked path: one compiled function for every
width vector). Everything else is plain Python,
so the search logic is tested against metrics whose optimum is known exactly.

Candidates. Each layer picks a width from one shared, sorted list of *levels*
(`SearchSpace`): the model's granularity widths ("granularities", the default: the
widths training optimised), or every multiple of `lcm(width_alignment,
ffn_nest_blocks)` up to the narrowest stored layer width ("aligned": finer, never
trained on directly). Every candidate is checked against the budget *before* it is
evaluated: `Budget.cost` is `param_count` (parameters the submodel uses) or
`forward_flops_per_token` at the run's sequence length (matmul FLOPs as the sliced
submodel executes them).

Methods (both seeded, both given the same `max_evals` new evaluations; the uniform
granularities under the budget are always evaluated on top, as reference points):
- `heuristic`, the paper's Mix'n'Match rule: widths that grow slowly with depth. The
  family is every non-decreasing level vector whose level never skips a step between
  adjacent layers (S,S,M,M,L,... but not S,L); its members under the budget closest to
  it in cost (most capacity) are evaluated, best of them wins.
- `evolution`: regularised evolution (Real et al. 2019, aging + tournament) over level
  vectors, seeded with the uniform points and the best-costed heuristic members. A child
  moves one layer one level up or down, or shifts a level from one layer to another
  (cost-neutral for equal layers); a child over the budget is narrowed at random layers
  until it fits. Duplicates are never re-evaluated.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np

from matlm.evaluation import task_metrics
from matlm.evaluation.errors import EvalError
from matlm.model.config import ModelConfig
from matlm.model.counting import forward_flops_per_image, forward_flops_per_token, param_count
from matlm.model.vit_config import ViTConfig

METHODS = ("heuristic", "evolution")
SPACES = ("granularities", "aligned")
BUDGET_KINDS = ("params", "flops")
# The heuristic family is enumerated lazily up to this many vectors (deep models with
# fine levels have astronomically many slowly-growing vectors).
FAMILY_LIMIT = 200_000


class SearchError(EvalError):
    """Bad search input (budget, space, method, evaluation count)."""


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    config: ModelConfig
    name: str
    levels: tuple  # Sorted allowed widths, shared by every layer.

    @classmethod
    def build(cls, config: ModelConfig, name: str = "granularities") -> "SearchSpace":
        cap = min(config.ffn_dims)  # An extracted model stores narrower layers.
        if name == "granularities":
            levels = tuple(w for w in config.granularities.widths if w <= cap)
        elif name == "aligned":
            step = math.lcm(config.width_alignment, config.ffn_nest_blocks)
            levels = tuple(range(step, cap + 1, step))
        else:
            raise SearchError(f"--space must be one of {', '.join(SPACES)}, got {name!r}")
        if not levels:
            raise SearchError(f"search space {name!r} has no widths <= the narrowest stored "
                              f"layer width {cap}")
        return cls(config, name, levels)

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    def widths(self, levels: Sequence[int]) -> tuple:
        return tuple(self.levels[i] for i in levels)

    def label(self, widths: Sequence[int]) -> str:
        return self.config.granularities.name_of(widths)


def forward_flops(config, seq_len: int, widths: Sequence[int]) -> float:
    """A candidate's cost in FLOPs: forward matmul FLOPs per token (at `seq_len`) for the
    LM, per image for the ViT (its tokens are the image's patches; `seq_len` unused)."""
    if isinstance(config, ViTConfig):
        return forward_flops_per_image(config, widths)
    return forward_flops_per_token(config, seq_len, widths)


@dataclasses.dataclass(frozen=True)
class Budget:
    kind: str  # "params" or "flops" (forward matmul FLOPs per token)
    limit: float
    seq_len: int  # For FLOPs: attention's share depends on the sequence length.

    def __post_init__(self):
        if self.kind not in BUDGET_KINDS:
            raise SearchError(f"budget kind must be one of {BUDGET_KINDS}, got {self.kind!r}")

    def cost(self, config: ModelConfig, widths: Sequence[int]) -> float:
        return float(param_count(config, widths) if self.kind == "params"
                     else forward_flops(config, self.seq_len, widths))

    def fits(self, config: ModelConfig, widths: Sequence[int]) -> bool:
        return self.cost(config, widths) <= self.limit


def check_budget(space: SearchSpace, budget: Budget) -> None:
    """The narrowest submodel of the space must fit: one line naming the flag otherwise."""
    smallest = (space.levels[0],) * space.n_layers
    cost = budget.cost(space.config, smallest)
    if cost > budget.limit:
        raise SearchError(
            f"--budget_{budget.kind}={budget.limit:.6g} is below the smallest submodel "
            f"({space.label(smallest)} in every layer: {cost:.6g} {budget.kind}); "
            f"give at least {cost:.6g}")


@dataclasses.dataclass(frozen=True)
class Candidate:
    widths: tuple
    params: int
    flops: float  # Forward matmul FLOPs per token, sliced.
    metric: float
    source: str  # "uniform", "heuristic" or "evolution"
    order: int  # Evaluation order (0-based).


@dataclasses.dataclass
class SearchResult:
    method: str
    budget: Budget
    space: SearchSpace
    minimize: bool
    candidates: list  # Every evaluated candidate, in evaluation order.
    front: list  # Non-dominated candidates, by increasing cost.
    best: Candidate  # Best metric under the budget (ties: cheaper).
    uniform: list  # The uniform granularities under the budget (evaluated).
    family_truncated: bool = False
    # Uniform granularities *over* the budget: scored for the plot only, never candidates.
    over_budget: list = dataclasses.field(default_factory=list)

    def cost(self, c: Candidate) -> float:
        return float(c.params if self.budget.kind == "params" else c.flops)


def objective(value: float, minimize: bool) -> float:
    """Lower is better; NaN (an empty metric) is worst."""
    if math.isnan(value):
        return math.inf
    return value if minimize else -value


def pareto_front(candidates: Sequence[Candidate], cost: Callable[[Candidate], float],
                 minimize: bool) -> list:
    """Candidates that no other beats on both cost and metric (and equals on neither
    strictly worse): sorted by cost, each strictly better than every cheaper one."""
    ordered = sorted(candidates, key=lambda c: (cost(c), objective(c.metric, minimize)))
    front, best = [], math.inf
    for c in ordered:
        o = objective(c.metric, minimize)
        if o < best:
            front.append(c)
            best = o
    return front


def slow_growth_family(n_levels: int, n_layers: int, limit: int = FAMILY_LIMIT
                       ) -> tuple[list, bool]:
    """(level vectors that never decrease with depth and never skip a level between
    adjacent layers, whether the enumeration stopped at `limit`)."""
    out: list = []

    def extend(prefix):
        if len(out) >= limit:
            return
        if len(prefix) == n_layers:
            out.append(tuple(prefix))
            return
        last = prefix[-1]
        for nxt in (last, last + 1):
            if nxt < n_levels:
                extend(prefix + [nxt])

    for start in range(n_levels):
        extend([start])
    return out, len(out) >= limit


class _Scorer:
    """Evaluates level vectors once each, in order; counts new evaluations."""

    def __init__(self, space, budget, evaluate, minimize, progress):
        self.space, self.budget, self.evaluate = space, budget, evaluate
        self.minimize, self.progress = minimize, progress
        self.seen: dict = {}  # level vector -> Candidate
        self.candidates: list = []

    def score(self, level_vectors: Sequence[tuple], source: str) -> list:
        fresh = [v for v in dict.fromkeys(level_vectors) if v not in self.seen]
        config = self.space.config
        for v in fresh:  # Never evaluate a candidate over the budget.
            widths = self.space.widths(v)
            if not self.budget.fits(config, widths):
                raise AssertionError(f"candidate {widths} is over the budget")
        if fresh:
            metrics = self.evaluate([self.space.widths(v) for v in fresh])
            for v, m in zip(fresh, metrics):
                widths = self.space.widths(v)
                c = Candidate(widths, param_count(config, widths),
                              forward_flops(config, self.budget.seq_len, widths),
                              float(m), source, len(self.candidates))
                self.seen[v] = c
                self.candidates.append(c)
                if source != "uniform" and self.progress:
                    self.progress(c)
        return [self.seen[v] for v in level_vectors]

    def fitness(self, v) -> tuple:
        """Metric first; among equal metrics the cheaper vector wins (a plateau, e.g.
        layers whose extra units carry nothing, is walked down towards the front)."""
        c = self.seen[v]
        return (objective(c.metric, self.minimize), self.budget.cost(self.space.config, c.widths))


def _family_by_cost(space, budget, seed) -> tuple[list, bool]:
    """The heuristic family under the budget, most expensive first (ties: fewer distinct
    levels, i.e. the slower growth, then a seeded order)."""
    family, truncated = slow_growth_family(len(space.levels), space.n_layers)
    rng = np.random.default_rng(seed)
    tiebreak = rng.permutation(len(family))
    costed = [(budget.cost(space.config, space.widths(v)), len(set(v)), int(t), v)
              for v, t in zip(family, tiebreak)]
    costed = [c for c in costed if c[0] <= budget.limit]
    costed.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [c[3] for c in costed], truncated


def _repair(space, budget, levels: list, rng) -> tuple:
    """Narrows random layers one level at a time until the vector fits the budget."""
    while not budget.fits(space.config, space.widths(levels)):
        wide = [i for i, l in enumerate(levels) if l > 0]
        levels[int(rng.choice(wide))] -= 1  # The all-narrowest vector fits (checked).
    return tuple(levels)


def _mutate(space, budget, parent: tuple, rng) -> tuple:
    levels, n, top = list(parent), space.n_layers, len(space.levels) - 1
    if n > 1 and rng.random() < 0.5:  # Shift a level from one layer to another.
        up = [i for i in range(n) if levels[i] < top]
        down = [i for i in range(n) if levels[i] > 0]
        if up and down:
            i = int(rng.choice(up))
            others = [j for j in down if j != i]
            if others:
                levels[i] += 1
                levels[int(rng.choice(others))] -= 1
                return _repair(space, budget, levels, rng)
    i = int(rng.integers(n))
    moves = [d for d in (-1, 1) if 0 <= levels[i] + d <= top]
    levels[i] += int(rng.choice(moves))
    return _repair(space, budget, levels, rng)


def search(space: SearchSpace, budget: Budget,
           evaluate: Callable[[list], Sequence[float]], method: str = "evolution",
           max_evals: int = 64, seed: int = 0, minimize: bool = True,
           progress: Optional[Callable[[Candidate], None]] = None,
           population: int = 16, tournament: int = 8) -> SearchResult:
    """Runs `method` with at most `max_evals` new evaluations (see the module docstring)."""
    if method not in METHODS:
        raise SearchError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 1:
        raise SearchError(f"--max_evals must be an integer >= 1, got {max_evals!r}")
    check_budget(space, budget)
    scorer = _Scorer(space, budget, evaluate, minimize, progress)
    # Reference points: every uniform granularity that fits (not counted in max_evals).
    spec = space.config.granularities
    uniform_levels = [(space.levels.index(w),) * space.n_layers for w in spec.widths
                      if w in space.levels and budget.fits(space.config, (w,) * space.n_layers)]
    uniform = scorer.score(uniform_levels, "uniform")
    over = [w for w in spec.widths
            if w <= space.levels[-1] and not budget.fits(space.config, (w,) * space.n_layers)]
    over_budget = []
    if over:
        vectors = [(w,) * space.n_layers for w in over]
        over_budget = [Candidate(v, param_count(space.config, v),
                                 forward_flops(space.config, budget.seq_len, v),
                                 float(m), "uniform (over budget)", -1)
                       for v, m in zip(vectors, evaluate(vectors))]
    base = len(scorer.candidates)
    family, truncated = _family_by_cost(space, budget, seed)
    if method == "heuristic":
        picked = [v for v in family if v not in scorer.seen][:max_evals]
        scorer.score(picked, "heuristic")
    else:
        _evolve(space, budget, scorer, family, max_evals, base, seed, population, tournament)
    candidates = scorer.candidates
    result = SearchResult(method, budget, space, minimize, candidates, [], None, uniform,
                          truncated, over_budget)
    result.front = pareto_front(candidates, result.cost, minimize)
    result.best = min(candidates, key=lambda c: (objective(c.metric, minimize),
                                                 result.cost(c), c.order))
    return result


def _evolve(space, budget, scorer, family, max_evals, base, seed, population, tournament):
    rng = np.random.default_rng(seed)
    pool = list(scorer.seen)  # The uniform points seed the population...
    want = min(max(population - len(pool), 0), max_evals)
    seeds = [v for v in family if v not in scorer.seen][:want // 2]
    attempts = 0
    while len(seeds) < want and attempts < 50 * population:  # Tiny spaces run out.
        # ... with the heuristic's best-costed members and random vectors that fit.
        attempts += 1
        v = _repair(space, budget, [int(x) for x in rng.integers(len(space.levels),
                                                                 size=space.n_layers)], rng)
        if v not in scorer.seen and v not in seeds:
            seeds.append(v)
    seeds = seeds[:max_evals]
    scorer.score(seeds, "evolution")
    pool += [v for v in seeds if v not in pool]
    stale = 0
    while len(scorer.candidates) - base < max_evals and stale < 200:
        contenders = [pool[int(i)] for i in rng.choice(len(pool), size=min(tournament, len(pool)),
                                                       replace=False)]
        parent = min(contenders, key=scorer.fitness)
        child = _mutate(space, budget, parent, rng)
        if child in scorer.seen:
            stale += 1  # Space (nearly) exhausted around the parents: stop eventually.
            continue
        stale = 0
        scorer.score([child], "evolution")
        pool.append(child)
        if len(pool) > population:
            pool.pop(0)  # Aging: the oldest leaves, not the worst.


# --- scoring candidates with a checkpoint (masked path) ---------------------------------

class TaskEvaluator:
    """Scores width vectors on one prepared task (`matlm.evaluation.runner`) with one
    masked-path scorer: the widths are a traced array, so every candidate reuses the
    same compiled function(s).

    The metric is the task's primary metric, the number `matlm eval` reports for it (its
    own `primary_metric`, else its kind's default), minimised when lower is better: both
    from `matlm.evaluation.task_metrics`."""

    def __init__(self, task, config: ModelConfig, params, vocab, options, scorer=None):
        from matlm.evaluation import scoring
        if not options.masked:
            raise SearchError("the search scores candidates through the masked path")
        self.task, self.config, self.vocab, self.options = task, config, vocab, options
        self.key = task.metric
        self.minimize = task_metrics.lower_is_better(self.key)
        self.scorer = scorer or scoring.SubmodelScorer(config, params, options.batch_size,
                                                       options.max_len, masked=True)

    def with_task(self, task) -> "TaskEvaluator":
        """The same scorer (no recompiling) on another prepared task."""
        other = object.__new__(TaskEvaluator)
        other.__dict__.update(self.__dict__)
        other.task = task
        return other

    def __call__(self, widths_list: Sequence[Sequence[int]]) -> list[float]:
        from matlm.evaluation import runner
        from matlm.evaluation.submodels import Submodel
        subs = [Submodel(f"candidate{i}", tuple(w), 0, 0) for i, w in enumerate(widths_list)]
        out = runner.run([self.task], self.config, None, subs, subs[0].name, self.vocab,
                         self.options, scorer=self.scorer)
        metrics = out["tasks"][self.task.name]["metrics"]
        return [float(metrics[s.name][self.key]) for s in subs]

    def compiled_count(self) -> int:
        return self.scorer.compiled_count()


class ImageEvaluator:
    """Scores width vectors by a MatViT's `metric` (top1, top5 or loss) on a fixed sample
    of labelled image batches, all through one masked-path compiled function
    (`matlm.evaluation.image_classification.ImageClassifier`)."""

    METRICS = ("top1", "top5", "loss")

    def __init__(self, batches: Sequence[dict], config, params, metric: str = "top1",
                 task: str = "images", classifier=None):
        from matlm.evaluation import image_classification
        if metric not in self.METRICS:
            raise SearchError(f"--metric={metric!r} is not a MatViT metric; give one of "
                              f"{', '.join(self.METRICS)}")
        self.batches, self.config, self.params, self.key = list(batches), config, params, metric
        self.task = task
        self.minimize = task_metrics.lower_is_better(metric)
        self.classifier = classifier or image_classification.ImageClassifier(config,
                                                                             masked=True)

    def with_batches(self, batches: Sequence[dict]) -> "ImageEvaluator":
        """The same compiled function on another sample."""
        return ImageEvaluator(batches, self.config, self.params, self.key, self.task,
                              self.classifier)

    def __call__(self, widths_list: Sequence[Sequence[int]]) -> list[float]:
        from matlm.evaluation import image_classification
        from matlm.evaluation.submodels import Submodel
        subs = [Submodel(f"candidate{i}", tuple(w), 0, 0) for i, w in enumerate(widths_list)]
        out = image_classification.evaluate(self.config, self.params, self.batches, subs,
                                            subs[0].name, task=self.task, progress=False,
                                            classifier=self.classifier)
        metrics = out["tasks"][self.task]["metrics"]
        return [float(metrics[s.name][self.key]) for s in subs]

    def compiled_count(self) -> int:
        return self.classifier.compiled_count()


# --- reporting -----------------------------------------------------------------------------

CSV_FIELDS = ("widths", "label", "params", "flops_per_token", "metric", "source")


def _row(result: SearchResult, c: Candidate, confirm: Optional[dict]) -> dict:
    row = {"widths": ",".join(map(str, c.widths)), "label": result.space.label(c.widths),
           "params": c.params, "flops_per_token": int(round(c.flops)), "metric": c.metric,
           "source": c.source}
    if confirm is not None:
        row["metric_confirm"] = confirm.get(c.widths, float("nan"))
    return row


def front_table(result: SearchResult, metric_name: str, confirm: Optional[dict] = None) -> str:
    from tabulate import tabulate
    rows = []
    for c in result.front:
        r = _row(result, c, confirm)
        marks = "best under budget" if c is result.best else ""
        rows.append([r["widths"], f"{c.params:,}", f"{c.flops / 1e6:.3f}", f"{c.metric:.4f}"]
                    + ([f"{r['metric_confirm']:.4f}"] if confirm is not None else [])
                    + [c.source, marks.strip()])
    per = "image" if isinstance(result.space.config, ViTConfig) else "token"
    headers = (["widths", "params", f"MFLOPs/{per}", metric_name]
               + ([f"{metric_name} (confirm)"] if confirm is not None else []) + ["found by", ""])
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def write_outputs(result: SearchResult, output_dir, metric_name: str, info: dict,
                  confirm: Optional[dict] = None, plot: bool = True) -> list:
    """front.csv, candidates.csv, best.json (+ search.png) under `output_dir`."""
    import csv
    import json
    from pathlib import Path
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    fields = list(CSV_FIELDS) + (["metric_confirm"] if confirm is not None else [])
    written = []
    for name, rows in (("front.csv", result.front), ("candidates.csv", result.candidates)):
        path = output_dir / name
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for c in rows:
                writer.writerow(_row(result, c, confirm))
        written.append(path)

    def describe(c):
        return _row(result, c, confirm) if c is not None else None

    under = [c for c in result.uniform]
    nearest = max(under, key=result.cost) if under else None
    best = describe(result.best)
    summary = {
        **info,
        "method": result.method,
        "budget": {"kind": result.budget.kind, "limit": result.budget.limit,
                   "seq_len": result.budget.seq_len},
        "space": {"name": result.space.name, "widths": list(result.space.levels)},
        "metric": metric_name, "lower_is_better": result.minimize,
        "best": best,
        "nearest_uniform": describe(nearest),
        "evaluated": len(result.candidates),
        "front": [describe(c) for c in result.front],
        "uniform_over_budget": [describe(c) for c in result.over_budget],
        "heuristic_family_truncated": result.family_truncated,
    }
    path = output_dir / "best.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    written.append(path)
    if plot:
        written.append(_plot(result, output_dir / "search.png", metric_name))
    return written


def _plot(result: SearchResult, path, metric_name: str):
    import matplotlib
    matplotlib.use("Agg")  # No display on servers.
    import matplotlib.pyplot as plt

    scale, unit = (1e6, "M parameters") if result.budget.kind == "params" else (
        1e6, "MFLOPs per token (forward)")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for source, style in (("heuristic", dict(marker=".", color="tab:blue")),
                          ("evolution", dict(marker=".", color="tab:orange"))):
        pts = [c for c in result.candidates if c.source == source]
        if pts:
            ax.scatter([result.cost(c) / scale for c in pts], [c.metric for c in pts],
                       s=14, alpha=0.6, label=f"{source} candidates", **style)
    front = result.front
    ax.step([result.cost(c) / scale for c in front], [c.metric for c in front], where="post",
            color="black", lw=1.2, label="Pareto front")
    ax.scatter([result.cost(c) / scale for c in front], [c.metric for c in front],
               facecolors="none", edgecolors="black", s=40)
    uni = sorted(result.uniform + result.over_budget, key=result.cost)
    ax.plot([result.cost(c) / scale for c in uni], [c.metric for c in uni], "s--",
            color="tab:green", label="uniform granularities")
    for c in uni:
        ax.annotate(result.space.label(c.widths), (result.cost(c) / scale, c.metric),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.scatter([result.cost(result.best) / scale], [result.best.metric], marker="*", s=160,
               color="tab:red", zorder=5, label="best under budget")
    ax.axvline(result.budget.limit / scale, color="tab:red", ls=":", lw=1, label="budget")
    ax.set_xlabel(unit)
    ax.set_ylabel(metric_name)
    ax.set_title(f"matlm search ({result.method}, {len(result.candidates)} evaluated)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
