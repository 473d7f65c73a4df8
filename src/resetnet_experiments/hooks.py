"""Trainer callbacks the paper's pipelines need: trainable-group phases and early stops (Sec. 5.3-5.4).

* :class:`PhaseSchedule`: which parameter groups train at each step. Rules: ``fixed`` (alternate
  the groups every ``length`` steps; two-phase learning, Sec. 5.4.1, "constant number of
  iterations"), ``progressive`` (the same, the phases' lengths multiplied by ``growth`` after each
  turn: "progressive time for one of the phases"), ``convergence`` (switch when the mean training
  loss of the last ``window`` steps improved by less than ``tol`` on the window before: "convergence
  of the current phase"), and ``incremental`` (Sec. 5.4.2: the head, then the stages unfrozen from
  the last one backwards, one every ``every``, then everything).
* :class:`RouteConvergence` (Sec. 5.3 step 6, "train until the policy converged", made measurable):
  every ``every`` steps the eval-mode hard routes of a fixed probe batch (the first ``probe_size``
  training images, not augmented) are recorded; the run stops when less than ``threshold`` of them
  changed over the last ``window`` steps.
* :class:`SkipRateTarget` (Sec. 5.3 step 8, "until the trade-off is reached"): stop once the mean
  training skip rate of the last ``window`` steps reaches ``target``.

Groups are unions of parameter groups (``controller``, ``units``, ``stem``, ``stage{i}``, ``head``,
``all``); a ``-`` prefix removes one (``[all, -controller]``: everything but the controllers). The
optimizer holds every parameter of ``trainable`` (use ``[all]``); a frozen phase's parameters keep
``grad = None``, which SGD and Adam skip. Each callback has ``spec()``, the parameters that change a
run's result (part of a stage's cache key).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resetnet.errors import ConfigError
from resetnet.train.config import Position, resolve_position
from resetnet.train.params import check_group_names, frozen_batchnorms, select_parameters

__all__ = ["PhaseSchedule", "RouteConvergence", "SkipRateTarget", "resolve_groups", "probe_routes", "route_change_fraction"]


def resolve_groups(model: nn.Module, groups: Sequence[str]) -> list[nn.Parameter]:
    """Parameters of the union of the groups without a ``-`` prefix, minus those with one."""
    try:
        check_group_names([g.lstrip("-") for g in groups])
    except ValueError as err:
        raise ConfigError(f"phase groups {list(groups)}: {err}") from None
    removed = {id(p) for p in select_parameters(model, [g[1:] for g in groups if g.startswith("-")])}
    return [p for p in select_parameters(model, [g for g in groups if not g.startswith("-")]) if id(p) not in removed]


@dataclass
class PhaseSchedule:
    """Switches the trainable parameter groups during a run (see the module docstring)."""

    rule: str  # fixed, progressive, convergence, incremental
    groups: list[list[str]] = field(default_factory=list)
    length: list[int] = field(default_factory=list)  # fixed, progressive: steps per phase
    growth: list[float] = field(default_factory=list)  # progressive: factor per phase after each of its turns
    window: int = 200  # convergence
    tol: float = 0.01  # convergence
    min_length: int = 400  # convergence
    every: Position = "20%"  # incremental

    STATE_FILE = "phases_state.json"

    def __post_init__(self) -> None:
        if self.rule not in ("fixed", "progressive", "convergence", "incremental"):
            raise ConfigError(f"phase rule {self.rule!r}: valid rules are fixed, progressive, convergence, incremental")
        if self.rule != "incremental" and len(self.groups) < 2:
            raise ConfigError(f"phase rule {self.rule!r} needs at least two group lists to alternate, got {self.groups!r}")
        if self.rule in ("fixed", "progressive") and len(self.length) != len(self.groups):
            raise ConfigError(f"phase rule {self.rule!r}: one length per group list, got {self.length!r}")
        self.current: int | None = None
        self.phase_start = 0
        self.losses: deque[float] = deque()

    def spec(self) -> dict:
        return {k: v for k, v in asdict(self).items()}

    def phases(self, model: nn.Module) -> list[list[str]]:
        if self.rule != "incremental":
            return [list(g) for g in self.groups]
        acc, out = ["head"], [["head"]]
        for i in reversed(range(len(getattr(model, "stages", [])))):
            acc = acc + [f"stage{i}"]
            out.append(acc)
        return out + [["all"]]

    def phase_at(self, step: int, model: nn.Module, total: int) -> int:
        """The phase of the update at ``step`` (every rule but ``convergence``, which keeps state)."""
        if self.rule == "incremental":
            return min(step // max(resolve_position(self.every, total), 1), len(self.phases(model)) - 1)
        lengths = [float(n) for n in self.length]
        pos = step if self.rule == "progressive" else step % int(sum(lengths))
        while True:
            for i, n in enumerate(lengths):
                n = max(1, int(round(n)))
                if pos < n:
                    return i
                pos -= n
            lengths = [n * g for n, g in zip(lengths, self.growth)]

    def _apply(self, trainer: Any, index: int) -> None:
        groups = self.phases(trainer.model)[index]
        wanted = {id(p) for p in resolve_groups(trainer.model, groups)}
        if wanted - {id(p) for p in trainer.trainable}:
            raise ConfigError(f"phase {index} ({groups}) selects parameters the optimizer does not hold; set 'trainable' to [all]")
        for p in trainer.trainable:
            p.requires_grad_(id(p) in wanted)
            if id(p) not in wanted:
                p.grad = None
        if trainer.cfg.freeze_bn_stats:
            trainer.frozen_bn = frozen_batchnorms(trainer.model)
        trainer.set_train_mode()
        if self.current != index:
            trainer.logger.log("phase", trainer.step, {"phase": index, "trainable": groups, "rule": self.rule})
        self.current = index

    def on_fit_start(self, trainer: Any) -> None:
        if self.rule == "convergence":
            path = Path(trainer.out_dir) / self.STATE_FILE
            if trainer.step > 0 and path.is_file():  # a resumed run continues its phase
                state = json.loads(path.read_text(encoding="utf-8"))
                self.current, self.phase_start = int(state["current"]), min(int(state["phase_start"]), trainer.step)
                self.losses = deque(float(v) for v in state["losses"])
            self._apply(trainer, self.current or 0)
        else:
            self._apply(trainer, self.phase_at(trainer.step, trainer.model, trainer.total_steps))

    def on_step_end(self, trainer: Any, step: int, stats: Mapping[str, torch.Tensor]) -> None:
        if self.rule != "convergence":
            index = self.phase_at(step, trainer.model, trainer.total_steps)
            if index != self.current:
                self._apply(trainer, index)
            return
        w = self.window
        self.losses.append(float(stats["loss"]))
        while len(self.losses) > 2 * w:
            self.losses.popleft()
        if step - self.phase_start >= self.min_length and len(self.losses) == 2 * w:
            old, new = sum(list(self.losses)[:w]) / w, sum(list(self.losses)[w:]) / w
            if (old - new) < self.tol * abs(old):
                self.phase_start = step
                self.losses.clear()
                self._apply(trainer, ((self.current or 0) + 1) % len(self.groups))
        if trainer.runtime.is_main and (step % 100 == 0 or step == self.phase_start):
            state = {"current": self.current or 0, "phase_start": self.phase_start, "losses": list(self.losses), "step": step}
            (Path(trainer.out_dir) / self.STATE_FILE).write_text(json.dumps(state), encoding="utf-8")


@torch.no_grad()
def probe_routes(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, t) eval-mode arg-max unit of every controller invocation (all modules' iterations) for ``x``."""
    was = model.training
    model.eval()
    try:
        _, routing = model(x, return_routing=True)
    finally:
        model.train(was)
    if not routing:
        raise ConfigError("route convergence needs a model with ReSet modules")
    return torch.cat([r.hard_route() for r in routing], dim=1)


def route_change_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of (image, invocation) hard routes that differ between two route tensors."""
    return float((a != b).float().mean())


@dataclass
class RouteConvergence:
    """Stops a run when the hard routes of a fixed probe batch stop changing."""

    threshold: float = 0.01
    window: int = 500
    every: int = 100
    probe_size: int = 256
    min_steps: int = 0

    def __post_init__(self) -> None:
        self.history: deque[tuple[int, torch.Tensor]] = deque()
        self.probe: torch.Tensor | None = None

    def spec(self) -> dict:
        return asdict(self)

    def _record(self, trainer: Any, step: int) -> None:
        if self.probe is None:
            loader = trainer.data.train
            self.probe = loader.normalize(loader.images[: min(self.probe_size, loader.num_samples)])
        routes = probe_routes(trainer.model, self.probe)
        trainer.set_train_mode()
        self.history.append((step, routes))
        while len(self.history) > 1 and self.history[1][0] <= step - self.window:
            self.history.popleft()

    def on_fit_start(self, trainer: Any) -> None:
        self._record(trainer, trainer.step)

    def on_step_end(self, trainer: Any, step: int, stats: Mapping[str, torch.Tensor]) -> None:
        if step % self.every:
            return
        self._record(trainer, step)
        ref_step, ref = self.history[0]
        if step - ref_step < self.window:
            return
        changed = route_change_fraction(self.history[-1][1], ref)
        trainer.logger.log("route_convergence", step, {"changed": changed, "over_steps": step - ref_step, "threshold": self.threshold})
        if changed < self.threshold and step >= self.min_steps:
            trainer.request_stop(f"route_convergence: {changed:.4f} < {self.threshold} of hard routes changed over {step - ref_step} steps")


@dataclass
class SkipRateTarget:
    """Stops a run once the mean training skip rate of the last ``window`` steps reaches ``target``."""

    target: float
    window: int = 100
    min_steps: int = 0

    def __post_init__(self) -> None:
        self.rates: deque[float] = deque(maxlen=self.window)

    def spec(self) -> dict:
        return asdict(self)

    def on_step_end(self, trainer: Any, step: int, stats: Mapping[str, torch.Tensor]) -> None:
        rate = stats.get("skip_rate")
        if rate is None:
            raise ConfigError("a skip-rate target needs the Hybrid-RL skip term (regularizers.skip_reward.enabled: true)")
        self.rates.append(float(rate))
        if len(self.rates) == self.window and step >= self.min_steps:
            mean = sum(self.rates) / self.window
            if mean >= self.target:
                trainer.logger.log("skip_target", step, {"skip_rate": mean, "target": self.target})
                trainer.request_stop(f"skip_rate: mean {mean:.4f} >= target {self.target} over {self.window} steps")
