"""Pruning to a latency budget measured on the target (HALP, Shen et al. 2022).

1. **Table.** Every Conv2d is timed alone in onnxruntime (a one-node ONNX model, see
   :class:`slimdeploy.ortbench.ConvSpec`) at the deployed input size, batch and threads: once at each
   candidate output width with its input at the dense width, and once at each candidate input width
   with its output at the dense width. A conv's latency at (in, out) is estimated from these two slices
   as T(in_d, out) · T(in, out_d) / T(in_d, out_d). The table is cached as JSON, keyed by the layers,
   the input shape, batch, threads, onnxruntime version and machine.
2. **Plan.** Each conv's latency is charged to the group that sets its output width, given the widths
   its input groups have (first dense, then the last plan's: a few rounds). Per group, keeping the
   k best channels is worth the sum of their scores; choosing one aligned width per group to maximise
   the total score within the budget is a multiple-choice knapsack, solved exactly by dynamic
   programming over the budget cut into bins (tens of groups × tens of widths: milliseconds). A greedy
   on score per millisecond would be HALP's cheaper alternative, but latency is not monotone in width
   (SIMD steps), where greedy choices go wrong.
3. **Check.** The pruned model is exported and timed interleaved with the dense one; while it misses
   the target's band, the budget is rescaled by aim / measured and re-planned. The band is ``within``
   ±5 % of the target, or ``at_most`` the target and no more than 5 % below it (a budget the deployed
   model must not exceed; the aim is the band's middle, so timing noise rarely pushes it over).
   A target that the smallest allowed widths miss is out of reach: an error says what they measured.
4. **Fill.** Every plan measured in the band is acceptable, and which one lands there first is up to
   timing noise. So a few more rounds aim at the band's upper half, where a larger budget may buy a
   plan that keeps more score, and the in-band plan keeping the most score is returned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimdeploy import ortbench
from slimdeploy.errors import InputError
from slimdeploy.graph import ChannelGroup, output_layers
from slimdeploy.ortbench import CALL_OVERHEAD_KEY, ConvSpec

TOLERANCE = 0.05  # how far from the target the measured latency may land (see FITS)
# How the measured latency must relate to the target: the band of (measured / target - 1) accepted.
FITS = {"within": (-TOLERANCE, TOLERANCE), "at_most": (-TOLERANCE, 0.0)}
KNAPSACK_BINS = 2000
FILL_ROUNDS = 2  # rounds after the first in-band one, looking for an in-band plan that keeps more score


@dataclass
class ConvLayer:
    name: str
    spec: ConvSpec  # at dense widths
    out_group: int | None  # index of the group setting its output channels
    in_groups: list[int]  # groups setting (parts of) its input channels
    depthwise: bool

    def spec_at(self, cin: int, cout: int) -> ConvSpec:
        if self.depthwise:  # one filter group per input channel; the multiplier stays
            return dataclasses.replace(self.spec, in_ch=cin, groups=cin, out_ch=cin * self.spec.out_ch // self.spec.in_ch)
        return dataclasses.replace(self.spec, in_ch=cin, out_ch=cout)


@dataclass
class GroupChoices:
    widths: list[int]  # candidate kept channels, ascending; the last is the dense width
    values: list[float]  # sum of the kept channels' scores at each width


# --- layers and candidate widths ----------------------------------------------------------------------

def _padding(conv: nn.Conv2d) -> tuple:
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    return tuple(conv.padding)


def _input_sizes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple]:
    """Input H×W of every Conv2d, from one forward pass."""
    sizes, hooks = {}, []

    def record(name):
        def hook(module, args):  # returns None: the input passes unchanged
            sizes.setdefault(name, tuple(args[0].shape[2:]))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_pre_hook(record(name)))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return sizes


def describe_layers(model: nn.Module, graph, groups: list[ChannelGroup], example: torch.Tensor) -> list[ConvLayer]:
    """Every Conv2d the model runs, with the groups that set its output and input widths."""
    index = {g.root: k for k, g in enumerate(groups)}
    names = {m: n for n, m in model.named_modules()}
    out_group, in_groups = {}, {}
    for tp_group in graph.get_all_groups(ignored_layers=output_layers(model)):
        root = names.get(tp_group[0].dep.target.module)
        if root not in index:
            continue
        for item in tp_group.items:
            module = item.dep.target.module
            if not isinstance(module, nn.Conv2d):
                continue
            if graph.is_out_channel_pruning_fn(item.dep.handler):
                out_group[names[module]] = index[root]
            elif graph.is_in_channel_pruning_fn(item.dep.handler):
                in_groups.setdefault(names[module], set()).add(index[root])
    sizes = _input_sizes(model, example[:1])
    layers = []
    for name, conv in model.named_modules():
        if not isinstance(conv, nn.Conv2d) or name not in sizes:
            continue
        spec = ConvSpec(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
                        _padding(conv), tuple(conv.dilation), conv.groups, sizes[name])
        depthwise = conv.groups > 1 and conv.groups == conv.in_channels
        layers.append(ConvLayer(name, spec, out_group.get(name), sorted(in_groups.get(name, ())), depthwise))
    return layers


def group_choices(group: ChannelGroup, position_scores: torch.Tensor, round_to: int | None,
                  min_channels: int) -> GroupChoices:
    """Kept widths a plan may give ``group`` (multiples of ``round_to`` per conv group, at least
    ``min_channels`` and every channel no BN scores) and the score each keeps."""
    g = group.ch_groups
    positions = group.channels // g
    step = round_to // math.gcd(round_to, g) if round_to else 1
    unscored = int(torch.isinf(position_scores).sum())  # channels without slimming evidence always stay
    least = max(min(math.ceil(min_channels / g), positions), unscored)
    kept = [k for k in range(step, positions, step) if k >= least] + [positions]
    ranked = torch.sort(position_scores.nan_to_num(posinf=0.0), descending=True).values
    total = ranked.cumsum(0)
    return GroupChoices([k * g for k in kept], [float(total[k - 1]) for k in kept])


def position_scores(group: ChannelGroup, scores: torch.Tensor) -> torch.Tensor:
    """One score per position within a conv group, as make_plan ranks them."""
    return scores.view(group.ch_groups, group.channels // group.ch_groups).amax(0)


# --- the latency table --------------------------------------------------------------------------------

def _input_width(layer: ConvLayer, groups: list[ChannelGroup], widths: list[int]) -> int:
    """Input channels at the given group widths (each input group contributes its own channels)."""
    return layer.spec.in_ch - sum(groups[g].channels - widths[g] for g in layer.in_groups)


def needed_specs(layers: list[ConvLayer], groups: list[ChannelGroup], choices: list[GroupChoices]) -> list[ConvSpec]:
    """The two slices of every conv: each candidate output width at dense input, and each candidate
    input width at dense output."""
    dense = [g.channels for g in groups]
    specs = []
    for layer in layers:
        outs = choices[layer.out_group].widths if layer.out_group is not None else [layer.spec.out_ch]
        if layer.depthwise:
            specs += [layer.spec_at(w, w) for w in outs]
            continue
        specs += [layer.spec_at(layer.spec.in_ch, w) for w in outs]
        for g in layer.in_groups:
            for w in choices[g].widths:
                specs.append(layer.spec_at(_input_width(layer, groups, dense[:g] + [w] + dense[g + 1:]),
                                           layer.spec.out_ch))
    return list(dict.fromkeys(specs))


def structure_key(layers: list[ConvLayer], specs: list[ConvSpec], input_shape, batch: int, threads: int) -> str:
    """Names what the table must be measured for (the device's own settings are recorded beside it)."""
    raw = json.dumps([[dataclasses.asdict(layer) for layer in layers], sorted(s.key() for s in specs),
                      list(input_shape), batch, threads], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def layer_description(layers, specs, input_shape, batch: int, threads: int) -> dict:
    """The JSON ``ortbench.py --table`` reads, to build the table on another device."""
    return {"key": structure_key(layers, specs, input_shape, batch, threads),
            "layers": [dataclasses.asdict(s) for s in specs]}


def default_table_path(key: str, batch: int, threads: int) -> Path:
    settings = ortbench.table_settings(batch, threads)
    runtime = hashlib.sha256(json.dumps([key, settings], sort_keys=True).encode()).hexdigest()[:20]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slimdeploy" / "latency"
    return root / f"{runtime}.json"


def load_table(path: Path, key: str, specs: list[ConvSpec], batch: int, threads: int, iters: int) -> dict:
    """The table at ``path`` if it was made for ``key`` and holds every spec; else timed here (only the
    missing layers) and written back."""
    table = {"key": key, "settings": ortbench.table_settings(batch, threads), "entries": {}}
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            entries = stored["entries"]
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path}: not a latency table (expected JSON with 'key' and 'entries')") from None
        if stored.get("key") != key:
            raise InputError(f"{path}: latency table made for another model, input size, batch or threads "
                             f"(key {stored.get('key')}, this model needs {key})")
        table = stored
    missing = [s for s in specs if s.key() not in table["entries"]]
    if missing or CALL_OVERHEAD_KEY not in table["entries"]:
        config = ortbench.SessionConfig(threads=threads)
        table["entries"].update(ortbench.time_layers(missing, batch, config=config, iters=iters))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)
    return table["entries"]


def latency_table(model: nn.Module, example: torch.Tensor, graph, groups: list[ChannelGroup],
                  choices: list[GroupChoices], batch: int, threads: int, table_path=None) -> tuple["CostModel", Path]:
    """The cost model of ``model`` at the input size of ``example``, from the table at ``table_path``
    (default: the cache) or timed here; and the table's path."""
    layers = describe_layers(model, graph, groups, example)
    specs = needed_specs(layers, groups, choices)
    key = structure_key(layers, specs, tuple(example.shape[1:]), batch, threads)
    path = Path(table_path) if table_path else default_table_path(key, batch, threads)
    return CostModel(layers, groups, load_table(path, key, specs, batch, threads, iters=50)), path


# --- cost model and knapsack --------------------------------------------------------------------------

class CostModel:
    """Latency (ms) of the convs at given group widths, from the table's two slices per conv."""

    def __init__(self, layers: list[ConvLayer], groups: list[ChannelGroup], entries: dict):
        self.layers, self.groups, self.entries = layers, groups, entries
        self.dense = [g.channels for g in groups]
        self.in_widths = {layer.name: [c for c in range(1, layer.spec.in_ch + 1)
                                       if layer.spec_at(c, layer.spec.out_ch).key() in entries]
                          for layer in layers if not layer.depthwise}

    def _time(self, spec: ConvSpec) -> float:
        return max(self.entries[spec.key()] - self.entries[CALL_OVERHEAD_KEY], 1e-6)

    def layer_ms(self, layer: ConvLayer, widths: list[int]) -> float:
        cout = widths[layer.out_group] if layer.out_group is not None else layer.spec.out_ch
        cin = _input_width(layer, self.groups, widths)
        if layer.depthwise:
            return self._time(layer.spec_at(cout, cout))
        at_out = self._time(layer.spec_at(layer.spec.in_ch, cout))
        if cin == layer.spec.in_ch:
            return at_out
        return at_out * self._in_slice(layer, cin) / self._time(layer.spec)

    def _in_slice(self, layer: ConvLayer, cin: int) -> float:
        """T(cin, dense out), interpolated between measured input widths (several input groups may
        combine into a width none of them was measured at)."""
        measured = self.in_widths[layer.name]
        return float(np.interp(cin, measured, [self._time(layer.spec_at(c, layer.spec.out_ch)) for c in measured]))

    def total_ms(self, widths: list[int]) -> float:
        return sum(self.layer_ms(layer, widths) for layer in self.layers)

    def group_ms(self, group: int, width: int, widths: list[int]) -> float:
        """Latency of the convs whose input or output ``group`` sets, at ``width``, the other groups as
        given."""
        trial = widths[:group] + [width] + widths[group + 1:]
        return sum(self.layer_ms(layer, trial) for layer in self.layers
                   if layer.out_group == group or group in layer.in_groups)


def knapsack(options: list[list[tuple[float, float]]], budget: float, bins: int = KNAPSACK_BINS) -> list[int] | None:
    """Pick one (cost, value) option per item maximising the total value with total cost ≤ budget.

    Exact dynamic programming over costs rounded up to ``budget / bins`` (so the answer always fits);
    None when even the cheapest options do not fit.
    """
    if budget <= 0:
        return None
    unit = budget / bins
    best = np.zeros(bins + 1)  # best[b]: best value of the items so far within b units
    picks = []
    for item in options:
        new = np.full(bins + 1, -np.inf)
        pick = np.full(bins + 1, -1)
        for k, (cost, value) in enumerate(item):
            units = math.ceil(cost / unit - 1e-9)
            if units > bins:
                continue
            shifted = np.full(bins + 1, -np.inf)
            shifted[units:] = best[:bins + 1 - units] + value
            better = shifted > new
            new[better], pick[better] = shifted[better], k
        best = new
        picks.append(pick)
    if not np.isfinite(best[bins]):
        return None
    chosen, b = [], bins
    for item, pick in zip(reversed(options), reversed(picks)):
        k = int(pick[b])
        chosen.append(k)
        b -= math.ceil(item[k][0] / unit - 1e-9)
    return chosen[::-1]


def choose_widths(cost: CostModel, choices: list[GroupChoices], budget_ms: float, rounds: int = 3,
                  grid: int = 32) -> list[int]:
    """Per group, the kept width maximising the total score with the convs' latency within ``budget_ms``.

    A conv's latency depends on two groups (input and output width), so the knapsack's per-group
    costs are a linearisation: each group is charged the convs it touches, the other groups at their
    widths in the previous round (dense at first). Such costs miss where both widths change, so each
    round solves the knapsack over a range of budgets and keeps the best choice whose whole-model
    estimate fits; the highest score over the rounds wins.
    """
    def value(widths):
        return plan_value(choices, widths)

    smallest = [c.widths[0] for c in choices]
    best = smallest
    widths = list(cost.dense)
    for _ in range(rounds):
        options = [[(cost.group_ms(g, w, widths), v) for w, v in zip(c.widths, c.values)]
                   for g, c in enumerate(choices)]
        low, high = (sum(f(cost for cost, _ in item) for item in options) for f in (min, max))
        high *= 1.05  # costs are rounded up to bins: a little more lets the all-dense choice fit
        solved = [knapsack(options, low + (high - low) * k / (grid - 1)) for k in range(grid)]
        fitting = [[c.widths[k] for c, k in zip(choices, picked)] for picked in solved if picked]
        fitting = [w for w in fitting if cost.total_ms(w) <= budget_ms]
        if not fitting:
            break
        top = max(fitting, key=value)
        if value(top) > value(best):
            best = top
        if top == widths:
            break
        widths = top
    return best


def plan_value(choices: list[GroupChoices], widths: list[int]) -> float:
    """The score a plan keeps: the sum over groups of the kept channels' scores."""
    return sum(c.values[c.widths.index(w)] for c, w in zip(choices, widths))


def _next_budget(rounds: list[dict], aim: float = 0.0) -> float:
    """Rescale the last budget by aimed / measured latency (the aim is target × (1 + aim)); once
    measurements bracket the aim, interpolate between the tightest budgets on either side: the
    smallest that measured over the aim and the largest under it (measurements are too noisy for more).
    Plans are discrete, so a budget may repeat the plan of a bracket's end; the next one then
    narrows the bracket instead of returning to the same budget."""
    last = rounds[-1]
    over = [r for r in rounds if r["error"] > aim]
    under = [r for r in rounds if r["error"] <= aim]
    if not over or not under:
        return last["budget_ms"] * last["target_ms"] * (1 + aim) / last["pruned_ms"]
    a = min(over, key=lambda r: r["budget_ms"])
    b = max(under, key=lambda r: r["budget_ms"])
    share = (a["error"] - aim) / (a["error"] - b["error"])  # where the error crosses the aim, linearly
    return a["budget_ms"] + share * (b["budget_ms"] - a["budget_ms"])


def _keep(rounds: list[dict], fit: str) -> int:
    """The round to keep: of those in the band, the plan keeping the most score. With none in it, for
    ``at_most`` one that meets the target if any does, then the one nearest the aim."""
    low, high = FITS[fit]
    in_band = [i for i, r in enumerate(rounds) if low <= r["error"] <= high]
    if in_band:
        return max(in_band, key=lambda i: rounds[i]["value"])
    aim = (low + high) / 2
    return min(range(len(rounds)),
               key=lambda i: (fit == "at_most" and rounds[i]["error"] > high, abs(rounds[i]["error"] - aim)))


# --- the measured correction loop --------------------------------------------------------------------

# Each round's pair is timed in blocks of about this many ms (ortbench.time_quietest): five of them span
# the slowed stretches of a shared CPU
BLOCK_MS = 400.0


def _time_pair(dense_path, pruned_path, batch, threads, iters):
    dense, pruned = ortbench.time_quietest([str(dense_path), str(pruned_path)], batch=batch,
                                           config=ortbench.SessionConfig(threads=threads),
                                           warmup=max(iters // 10, 5), iters=iters)
    return dense.p50, pruned.p50


def fit_to_latency(dense: nn.Module, example: torch.Tensor, graph, groups: list[ChannelGroup],
                   scores: list[torch.Tensor], prune_fn, *, target_speedup: float | None = None,
                   target_ms: float | None = None, round_to: int | None = None, min_channels: int = 1,
                   batch: int = 1, threads: int = 1, table_path=None, iters: int = 300,
                   max_rounds: int = 6, fill_rounds: int = FILL_ROUNDS, fit: str = "within"):
    """Plan, prune (``prune_fn(kept_widths)`` returns an outcome with ``.model`` and ``.plan``), export
    and time until the pruned model's measured latency is in the band ``fit`` names (:data:`FITS`).

    Once a round is in the band, up to ``fill_rounds`` more aim at the band's upper half. Returns the
    outcome of the in-band round whose plan keeps the most score; with none in the band, the round
    nearest its middle (for ``at_most``, among those that meet the target if any does) and a warning.
    Its ``plan.notes["latency"]`` holds each round's budget, prediction, measurement and kept score.
    """
    from slimdeploy.export import export_onnx

    check_fit(fit)
    check_targets(target_speedup, target_ms)
    low, high = FITS[fit]
    aim = (low + high) / 2
    choices = [group_choices(g, position_scores(g, s), round_to, min_channels) for g, s in zip(groups, scores)]
    cost, path = latency_table(dense, example, graph, groups, choices, batch, threads, table_path)
    input_shape = tuple(example.shape[1:])
    roots = [g.root for g in groups]
    smallest = [c.widths[0] for c in choices]

    with tempfile.TemporaryDirectory() as tmp:
        dense_path = export_onnx(dense, Path(tmp) / "dense.onnx", input_shape)
        dense_ms = ortbench.time_sessions([str(dense_path)], batch=batch,
                                          config=ortbench.SessionConfig(threads=threads),
                                          warmup=max(iters // 10, 5), iters=iters)[0].p50
        block_iters = max(20, min(iters, int(BLOCK_MS / (2 * dense_ms))))  # a pair costs < 2 dense calls
        # What the table does not see (adds, pools, the head) mostly scales with the widths too: the
        # model's latency is taken as proportional to its convs'.
        scale = dense_ms / cost.total_ms(cost.dense)
        budget = (target_ms or dense_ms / target_speedup) * (1 + aim)
        rounds, outcomes, pruned = [], [], {}

        def measure(widths, budget):
            if tuple(widths) not in pruned:  # a repeated choice is timed again: noise, not the plan, moved
                outcome = prune_fn(dict(zip(roots, widths)))
                path_now = export_onnx(outcome.model, Path(tmp) / f"pruned{len(rounds)}.onnx", input_shape)
                pruned[tuple(widths)] = (outcome, path_now)
            outcome, path_now = pruned[tuple(widths)]
            dense_now, pruned_now = _time_pair(dense_path, path_now, batch, threads, block_iters)
            target_now = target_ms or dense_now / target_speedup
            rounds.append({"budget_ms": budget, "predicted_ms": scale * cost.total_ms(widths),
                           "dense_ms": dense_now, "pruned_ms": pruned_now, "target_ms": target_now,
                           "speedup": dense_now / pruned_now, "error": pruned_now / target_now - 1,
                           "value": plan_value(choices, widths)})
            outcomes.append(outcome)
            return rounds[-1]["error"]

        for _ in range(max_rounds):
            widths = choose_widths(cost, choices, budget / scale)
            error = measure(widths, budget)
            if error > high and widths == smallest:
                # timed once more before giving up: a few seconds of a slow, shared CPU moved this
                # ratio by 25 % and must not end the search
                measure(widths, budget)
                fastest = min(rounds[-2:], key=lambda r: r["error"])
                if fastest["error"] > high:
                    raise OutOfReach(_out_of_reach(fastest, target_speedup, target_ms, round_to, min_channels))
                error = fastest["error"]
            if low <= error <= high:
                break
            budget = _next_budget(rounds, aim)
        else:
            fill_rounds = 0  # the band was never reached: nothing to fill
        fill_aim = (aim + high) / 2
        for _ in range(fill_rounds):
            best = rounds[_keep(rounds, fit)]
            budget = _next_budget(rounds, fill_aim)
            if budget <= best["budget_ms"]:
                break  # the best in-band plan already sits in the upper half: a larger budget would miss
            widths = choose_widths(cost, choices, budget / scale)
            if tuple(widths) in pruned:
                break  # the larger budget buys no other plan
            measure(widths, budget)
    keep = _keep(rounds, fit)
    outcome, final = outcomes[keep], rounds[keep]
    within = low <= final["error"] <= high
    if not within:
        warnings.warn(f"latency pruning: measured {final['pruned_ms']:.3f} ms against a target of "
                      f"{final['target_ms']:.3f} ms ({fit}) after {len(rounds)} rounds ({final['error']:+.1%})",
                      stacklevel=2)
    outcome.plan.notes["latency"] = {
        "target_speedup": target_speedup, "target_ms": target_ms, "fit": fit, "band": [low, high],
        "tolerance": TOLERANCE, "batch": batch, "threads": threads, "table": str(path),
        "solver": "multiple-choice knapsack, dynamic programming", "rounds": rounds, "chosen": final,
        "within_tolerance": within,  # within the band
    }
    return outcome


class OutOfReach(InputError):
    """A latency target that even the smallest widths the plan may choose do not reach."""


def _out_of_reach(measured: dict, target_speedup, target_ms, round_to, min_channels) -> str:
    """The error for a target that even the smallest widths the plan may choose do not reach."""
    asked = f"target_speedup {target_speedup}" if target_speedup else f"target_ms {target_ms}"
    return (f"latency pruning: {asked} is out of reach; the fastest plan allowed (every group at its smallest "
            f"width: round_to {round_to}, min_channels {min_channels}) measures {measured['speedup']:.2f}x "
            f"({measured['pruned_ms']:.3f} ms, dense {measured['dense_ms']:.3f} ms); "
            f"ask for less, or allow narrower widths")


def check_fit(fit: str) -> None:
    if fit not in FITS:
        raise InputError(f"latency_fit must be one of {', '.join(FITS)}, got {fit!r}")


def check_targets(target_speedup: float | None, target_ms: float | None) -> None:
    if (target_speedup is None) == (target_ms is None):
        raise InputError("latency pruning needs exactly one of target_speedup and target_ms")
    if target_speedup is not None and not target_speedup > 1:
        raise InputError(f"target_speedup must be > 1, got {target_speedup}")
    if target_ms is not None and not target_ms > 0:
        raise InputError(f"target_ms must be > 0, got {target_ms}")


def write_layer_description(path, layers, groups, choices, input_shape, batch: int = 1, threads: int = 1) -> dict:
    """Write what ``ortbench.py --table`` needs to build this model's table on another device."""
    description = layer_description(layers, needed_specs(layers, groups, choices), input_shape, batch, threads)
    Path(path).write_text(json.dumps(description, indent=1))
    return description
