"""Config-driven training hooks: trainable-group phases and early-stop criteria.

These implement the trainer features the staged pipelines need (paper Sec. 5.3-5.4) as
:class:`~resetnet.train.trainer.Trainer` callbacks, built from two config sections:

``phases`` (null: ``trainable`` throughout): a per-step schedule of trainable groups.

* ``{rule: schedule, phases: [{at: 0, trainable: [head]}, {at: 0.25, trainable: [head, stage2]}, ...]}``:
  explicit switch points (steps when > 1, fractions of the budget when <= 1).
* ``{rule: incremental, every: 0.2}``: incremental learning (Sec. 5.4.2): start with the
  head, then unfreeze the stages from the last one backwards, one every ``every``
  (steps or fraction), then the stem, i.e. ``[head]``, ``[head, stage2]``, ..., ``[all]``.
* ``{rule: fixed, groups: [[controller], [all, -controller]], length: 1000}``: two-phase
  learning (Sec. 5.4.1), alternating the groups every ``length`` steps.
* ``{rule: progressive, groups: [...], length: 500, growth: [1.0, 2.0]}``: like ``fixed``,
  but the length of phase i is multiplied by ``growth[i]`` after each of its turns
  ("progressive time for one of the phases").
* ``{rule: convergence, groups: [...], window: 200, tol: 0.01, min_length: 200, max_length: null}``:
  switch when the current phase has converged: the mean training loss of the last
  ``window`` steps improved by less than ``tol`` (relative) on the window before.

A group list is a union of parameter groups (``controller``, ``units``, ``stem``,
``stage{i}``, ``head``, ``all``); a name prefixed with ``-`` is removed from the union
(``[all, -controller]``: everything but the controllers). Only parameters the optimizer
holds (``trainable``) can be switched on, so phase configs use ``trainable: [all]``.
Frozen parameters keep ``grad = None``, which SGD and Adam skip (no update, no weight
decay, momentum untouched). With ``freeze_bn_stats`` the BatchNorm statistics of the
frozen modules of the current phase are fixed.

``stop``: early-stop criteria, checked during training; they call ``Trainer.request_stop``, so
the run ends as if its budget were spent (final evaluation and checkpoint) with the summary's
and the checkpoint's ``stop_reason`` set.

* ``route_convergence`` (Sec. 5.3 step 6, "train until the policy converged"), made
  measurable: every ``every`` steps the eval-mode hard routes (arg-max unit of every
  controller invocation) of a fixed probe batch (the first ``probe_size`` training
  images, not augmented) are recorded; the policy has converged when less than
  ``threshold`` of them changed over the last ``window`` steps. Each probe is logged
  as a ``route_convergence`` row of ``metrics.jsonl``.
* ``skip_rate`` (Sec. 5.3 step 8, "until the trade-off is reached"): stop once the mean
  training skip rate (zero-unit choices) over the last ``window`` steps reaches ``target``.

Both wait ``min_steps`` before they may stop a run.
"""
from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "PHASE_RULES", "check_phases", "resolve_groups", "PhaseSchedule", "RouteConvergence", "SkipRateTarget",
    "config_callbacks", "hard_routes", "route_change_fraction", "probe_batch",
]

PHASE_RULES = ("schedule", "incremental", "fixed", "progressive", "convergence")

_RULE_KEYS = {
    "schedule": {"rule", "phases"},
    "incremental": {"rule", "every", "groups"},
    "fixed": {"rule", "groups", "length"},
    "progressive": {"rule", "groups", "length", "growth"},
    "convergence": {"rule", "groups", "window", "tol", "min_length", "max_length"},
}


def _err(key: str, msg: str) -> Exception:
    from .config import ConfigError

    return ConfigError(f"config key {key!r}: {msg}")


def _check_group_list(value: Any, key: str) -> list[str]:
    from .params import check_group_names

    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise _err(key, f"expected a non-empty list of parameter groups (a '-' prefix removes one), got {value!r}")
    try:
        check_group_names([g[1:] if isinstance(g, str) and g.startswith("-") else g for g in value])
    except ValueError as err:
        raise _err(key, str(err)) from None
    if all(isinstance(g, str) and g.startswith("-") for g in value):
        raise _err(key, f"{value!r} only removes groups; name at least one group to train")
    return list(value)


def _num(value: Any, key: str, *, integer: bool = False, positive: bool = True) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _err(key, f"expected a number, got {value!r}")
    if positive and value <= 0:
        raise _err(key, f"expected a positive number, got {value!r}")
    if integer:
        if float(value) != int(value):
            raise _err(key, f"expected an integer, got {value!r}")
        return int(value)
    return float(value)


def check_phases(value: Any, key: str = "phases") -> dict | None:
    """Validate and normalise a ``phases`` config value (see the module docstring)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _err(key, f"expected null or a mapping with a 'rule' ({', '.join(PHASE_RULES)}), got {value!r}")
    rule = value.get("rule")
    if rule not in PHASE_RULES:
        raise _err(f"{key}.rule", f"unknown rule {rule!r}; valid rules: {', '.join(PHASE_RULES)}")
    unknown = sorted(set(value) - _RULE_KEYS[rule])
    if unknown:
        raise _err(key, f"unknown key(s) {unknown} for rule {rule!r}; valid keys: {', '.join(sorted(_RULE_KEYS[rule]))}")
    out: dict[str, Any] = {"rule": rule}
    if rule == "schedule":
        phases = value.get("phases")
        if not isinstance(phases, (list, tuple)) or not phases:
            raise _err(f"{key}.phases", "expected a non-empty list of {at, trainable} entries")
        norm = []
        for i, p in enumerate(phases):
            if not isinstance(p, Mapping) or set(p) != {"at", "trainable"}:
                raise _err(f"{key}.phases[{i}]", f"expected a mapping with keys 'at' and 'trainable', got {p!r}")
            at = _num(p["at"], f"{key}.phases[{i}].at", positive=False)
            if at < 0:
                raise _err(f"{key}.phases[{i}].at", f"expected a position >= 0, got {at}")
            norm.append({"at": at, "trainable": _check_group_list(p["trainable"], f"{key}.phases[{i}].trainable")})
        if norm[0]["at"] != 0:
            raise _err(f"{key}.phases[0].at", "the first phase must start at 0")
        out["phases"] = norm
        return out
    if rule == "incremental":
        out["every"] = _num(value.get("every", 0.2), f"{key}.every")
        out["groups"] = [_check_group_list(g, f"{key}.groups[{i}]") for i, g in enumerate(value["groups"])] if value.get("groups") else None
        return out
    groups = value.get("groups")
    if not isinstance(groups, (list, tuple)) or len(groups) < 2:
        raise _err(f"{key}.groups", f"expected a list of at least two group lists to alternate, got {groups!r}")
    out["groups"] = [_check_group_list(g, f"{key}.groups[{i}]") for i, g in enumerate(groups)]
    if rule in ("fixed", "progressive"):
        length = value.get("length", 1000)
        lengths = list(length) if isinstance(length, (list, tuple)) else [length] * len(groups)
        if len(lengths) != len(groups):
            raise _err(f"{key}.length", f"expected one number or one per group ({len(groups)}), got {length!r}")
        out["length"] = [_num(v, f"{key}.length", integer=True) for v in lengths]
    if rule == "progressive":
        growth = value.get("growth", 2.0)
        growths = list(growth) if isinstance(growth, (list, tuple)) else [growth] * len(groups)
        if len(growths) != len(groups):
            raise _err(f"{key}.growth", f"expected one number or one per group ({len(groups)}), got {growth!r}")
        out["growth"] = [_num(v, f"{key}.growth") for v in growths]
    if rule == "convergence":
        out["window"] = _num(value.get("window", 200), f"{key}.window", integer=True)
        out["tol"] = _num(value.get("tol", 0.01), f"{key}.tol", positive=False)
        out["min_length"] = _num(value.get("min_length", out["window"] * 2), f"{key}.min_length", integer=True, positive=False)
        ml = value.get("max_length")
        out["max_length"] = None if ml is None else _num(ml, f"{key}.max_length", integer=True)
    return out


def resolve_groups(model: nn.Module, groups: Sequence[str]) -> list[nn.Parameter]:
    """Parameters of the union of the groups without a ``-`` prefix, minus those with one."""
    from .params import select_parameters

    keep = [g for g in groups if not g.startswith("-")]
    drop = [g[1:] for g in groups if g.startswith("-")]
    removed = {id(p) for p in select_parameters(model, drop)} if drop else set()
    return [p for p in select_parameters(model, keep) if id(p) not in removed]


def _position(value: float, total: int) -> int:
    from .config import resolve_position

    return int(resolve_position(value, total))


def _incremental_phases(model: nn.Module, every: float, total: int, groups: list[list[str]] | None) -> list[dict]:
    if groups is None:
        n = len(getattr(model, "stages", []))
        acc = ["head"]
        groups = [list(acc)]
        for i in reversed(range(n)):
            acc.append(f"stage{i}")
            groups.append(list(acc))
        groups.append(["all"])
    step = _position(every, total)
    return [{"at": i * step, "trainable": g} for i, g in enumerate(groups)]


class PhaseSchedule:
    """Callback switching the trainable parameter groups as the ``phases`` config says.

    ``phase_at(step)`` gives the index of the phase that trains the update made at
    ``step`` for the deterministic rules; the convergence rule keeps state
    (``state_dict``), also written to ``DIR/phases_state.json`` so a resumed run
    continues the current phase.
    """

    STATE_FILE = "phases_state.json"

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.spec = dict(spec)
        self.rule = spec["rule"]
        self.current: int | None = None
        self.switches: list[dict] = []
        # convergence rule state
        self.phase_start = 0
        self.losses: deque[float] = deque()

    # ---------------------------------------------------------------- pure schedule
    def groups(self, model: nn.Module, total: int) -> list[list[str]]:
        if self.rule == "schedule":
            return [p["trainable"] for p in self.spec["phases"]]
        if self.rule == "incremental":
            return [p["trainable"] for p in _incremental_phases(model, self.spec["every"], total, self.spec.get("groups"))]
        return [list(g) for g in self.spec["groups"]]

    def phase_at(self, step: int, model: nn.Module, total: int) -> int:
        """Phase index for the update at ``step`` (deterministic rules)."""
        if self.rule in ("schedule", "incremental"):
            phases = self.spec["phases"] if self.rule == "schedule" else _incremental_phases(model, self.spec["every"], total, self.spec.get("groups"))
            idx = 0
            for i, p in enumerate(phases):
                if p["at"] == 0 or step >= _position(p["at"], total):
                    idx = i
            return idx
        if self.rule == "fixed":
            cycle = sum(self.spec["length"])
            pos = step % cycle
            for i, n in enumerate(self.spec["length"]):
                if pos < n:
                    return i
                pos -= n
        if self.rule == "progressive":
            lengths = list(self.spec["length"])
            pos = step
            while True:
                for i, n in enumerate(lengths):
                    n = max(1, int(round(n)))
                    if pos < n:
                        return i
                    pos -= n
                lengths = [n * g for n, g in zip(lengths, self.spec["growth"])]
        raise ValueError(f"phase_at is not defined for rule {self.rule!r}")  # convergence: stateful

    # ---------------------------------------------------------------- applying
    def _apply(self, trainer: Any, index: int) -> None:
        from .params import frozen_batchnorms

        groups = self.groups(trainer.model, trainer.total_steps)[index]
        wanted = {id(p) for p in resolve_groups(trainer.model, groups)}
        owned = {id(p) for p in trainer.trainable}
        outside = wanted - owned
        if outside:
            from .config import ConfigError

            raise ConfigError(
                f"config key 'phases': phase {index} ({groups}) selects {len(outside)} parameters the optimizer does not "
                f"hold; set 'trainable' to a superset of every phase (e.g. [all])"
            )
        for p in trainer.trainable:
            p.requires_grad_(id(p) in wanted)
            if id(p) not in wanted:
                p.grad = None
        if trainer.cfg.get("freeze_bn_stats"):
            trainer.frozen_bn = frozen_batchnorms(trainer.model)
        trainer.set_train_mode()
        if self.current != index:
            self.switches.append({"step": int(trainer.step), "phase": index, "trainable": groups})
            trainer.logger.log("phase", trainer.step, {"phase": index, "trainable": groups, "rule": self.rule})
        self.current = index

    def on_fit_start(self, trainer: Any) -> None:
        if self.rule == "convergence":
            self._load_state(trainer)
            self._apply(trainer, self.current or 0)
        else:
            self._apply(trainer, self.phase_at(trainer.step, trainer.model, trainer.total_steps))

    def on_step_end(self, trainer: Any, step: int, stats: Mapping[str, torch.Tensor]) -> None:
        if self.rule != "convergence":
            index = self.phase_at(step, trainer.model, trainer.total_steps)
            if index != self.current:
                self._apply(trainer, index)
            return
        w = self.spec["window"]
        self.losses.append(float(stats["loss"]))
        while len(self.losses) > 2 * w:
            self.losses.popleft()
        length = step - self.phase_start
        switch = False
        if self.spec["max_length"] is not None and length >= self.spec["max_length"]:
            switch = True
        elif length >= self.spec["min_length"] and len(self.losses) == 2 * w:
            old = sum(list(self.losses)[:w]) / w
            new = sum(list(self.losses)[w:]) / w
            switch = (old - new) < self.spec["tol"] * abs(old)
        if switch:
            n = len(self.spec["groups"])
            self.phase_start = step
            self.losses.clear()
            self._apply(trainer, ((self.current or 0) + 1) % n)
            self._save_state(trainer)
        elif step % 100 == 0:
            self._save_state(trainer)

    # ---------------------------------------------------------------- state (convergence rule)
    def state_dict(self) -> dict:
        return {"current": self.current or 0, "phase_start": self.phase_start, "losses": list(self.losses), "switches": self.switches}

    def _save_state(self, trainer: Any) -> None:
        if getattr(trainer.runtime, "is_main", True):
            state = dict(self.state_dict(), step=int(trainer.step))
            Path(trainer.out_dir).mkdir(parents=True, exist_ok=True)
            (Path(trainer.out_dir) / self.STATE_FILE).write_text(json.dumps(state), encoding="utf-8")

    def _load_state(self, trainer: Any) -> None:
        path = Path(trainer.out_dir) / self.STATE_FILE
        if trainer.step == 0 or not path.is_file():
            return
        state = json.loads(path.read_text(encoding="utf-8"))
        self.current = int(state["current"])
        self.phase_start = min(int(state["phase_start"]), trainer.step)
        self.losses = deque(float(v) for v in state.get("losses", []))
        self.switches = list(state.get("switches", []))


# ----------------------------------------------------------------------------- routes
def probe_batch(loader: Any, size: int) -> torch.Tensor:
    """The first ``size`` images of a :class:`~resetnet.data.DeviceLoader`, normalised, not augmented."""
    n = min(int(size), int(loader.num_samples))
    x = loader.images[:n]
    return loader._normalize(x)


@torch.no_grad()
def hard_routes(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, t) arg-max unit of every controller invocation (all modules' iterations) in eval mode."""
    was = model.training
    model.eval()
    try:
        _, routing = model(x, return_routing=True)
    finally:
        model.train(was)
    if not routing:
        raise ValueError("hard_routes: the model has no ReSet modules")
    return torch.cat([r.hard_route() for r in routing], dim=1)


def route_change_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of (image, invocation) hard routes that differ between two route tensors."""
    if a.shape != b.shape:
        raise ValueError(f"route tensors differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a != b).float().mean())


class RouteConvergence:
    """Early stop when the hard routes of a fixed probe batch stop changing (``stop.route_convergence``)."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.threshold = float(spec["threshold"])
        self.window = int(spec["window"])
        self.every = int(spec["every"])
        self.probe_size = int(spec["probe_size"])
        self.min_steps = int(spec["min_steps"])
        self.history: deque[tuple[int, torch.Tensor]] = deque()
        self.probe: torch.Tensor | None = None
        self.last: dict[str, Any] | None = None

    def _record(self, trainer: Any, step: int) -> None:
        if self.probe is None:
            self.probe = probe_batch(trainer.data.train, self.probe_size)
        routes = hard_routes(trainer.model, self.probe)
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
        self.last = {"changed": changed, "over_steps": step - ref_step, "threshold": self.threshold, "probe": int(ref.shape[0])}
        trainer.logger.log("route_convergence", step, self.last)
        if changed < self.threshold and step >= self.min_steps:
            trainer.request_stop(f"route_convergence: {changed:.4f} < {self.threshold} of hard routes changed over {step - ref_step} steps")


class SkipRateTarget:
    """Early stop when the mean training skip rate of the last ``window`` steps reaches ``target``."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.target = float(spec["target"])
        self.window = int(spec["window"])
        self.min_steps = int(spec["min_steps"])
        self.rates: deque[float] = deque(maxlen=self.window)

    def on_step_end(self, trainer: Any, step: int, stats: Mapping[str, torch.Tensor]) -> None:
        rate = stats.get("skip_rate")
        if rate is None:
            from .config import ConfigError

            raise ConfigError("config key 'stop.skip_rate.target': needs the Hybrid-RL skip term (regularizers.skip_reward.enabled: true)")
        self.rates.append(float(rate))
        if len(self.rates) == self.window and step >= self.min_steps:
            mean = sum(self.rates) / self.window
            if mean >= self.target:
                trainer.logger.log("skip_target", step, {"skip_rate": mean, "target": self.target})
                trainer.request_stop(f"skip_rate: mean {mean:.4f} >= target {self.target} over {self.window} steps")


def config_callbacks(cfg: Mapping[str, Any]) -> list[Any]:
    """The callbacks a validated config asks for (``phases``, ``stop``)."""
    out: list[Any] = []
    if cfg.get("phases"):
        out.append(PhaseSchedule(cfg["phases"]))
    stop = cfg.get("stop") or {}
    rc = stop.get("route_convergence") or {}
    if rc.get("enabled"):
        out.append(RouteConvergence(rc))
    sr = stop.get("skip_rate") or {}
    if sr.get("target") is not None:
        out.append(SkipRateTarget(sr))
    return out
