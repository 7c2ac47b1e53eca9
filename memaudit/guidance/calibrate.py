"""Calibrate the transition-point rules on a model (Jain et al. CVPR 2025; METHODS 3.1; issue 17).

The paper sets the switch point by hand per scenario (t = 500, 600, 700). memaudit measures it:
for each rule, sweep its switch parameter from "CFG from the first step" to "CFG never on"
(`static`: tau from 1 to 0 in 0.05 steps, with s_before 0 and 1; `opposite`: tau likewise;
`dynamic`: the earliest step of its minimum search, `min_step`), generate a clean prompt list
and a trigger list on the same seeds, and keep the **latest** switch (CFG on for the fewest
steps, so the least basin guidance) at which clean-prompt alignment stays >= `keep` (0.95) of
cfg's. The reproduction rate of the triggers it leaves is reported beside it, and the choice
goes into a plan's `[params.METHOD]` tables.

Alignment and reproduction are callables (`images, prompts -> per-image values`): on the
canary, the digit classifier and "own planted image nearest and nL2 < 1.4"; on a real model,
the CLIP score and the trigger's known training image under the fixed criterion cut
(`memaudit.criteria.reproduction`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: The rules this calibrates and the parameter each sweeps.
RULES = ("static", "opposite", "dynamic")
TAUS = tuple(round(1.0 - 0.05 * i, 2) for i in range(21))  # 1.0, 0.95, ..., 0.0
KEEP = 0.95


@dataclass
class Candidate:
    method: str
    params: dict[str, float]
    alignment: float  # mean over clean prompts x seeds
    alignment_ratio: float  # / cfg's
    reproduction: float  # mean over triggers x seeds
    unet_rows: float  # per image, relative to cfg's


@dataclass
class Calibration:
    cfg_alignment: float
    cfg_reproduction: float
    keep: float
    chosen: dict[str, Candidate] = field(default_factory=dict)
    candidates: list[Candidate] = field(default_factory=list)

    def toml(self) -> str:
        """The chosen parameters as plan `[params.METHOD]` tables, the measurement as
        comments."""
        lines = [f"# transition rules calibrated by `memaudit calibrate` (issue 17): the latest "
                 f"switch keeping clean-prompt alignment >= {self.keep:g} of cfg's",
                 f"# cfg: alignment {self.cfg_alignment:.4g}, trigger reproduction "
                 f"{self.cfg_reproduction:.1%}"]
        for name, c in self.chosen.items():
            lines += ["", f"[params.{name}]  # alignment {c.alignment_ratio:.3f} of cfg's, "
                          f"reproduction {c.reproduction:.1%}"]
            lines += [f"{k} = {_toml_number(v)}" for k, v in c.params.items()]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _toml_number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and not isinstance(v, float) else repr(float(v))


def sweep(method: str, steps: int, taus: Sequence[float] = TAUS) -> list[dict[str, float]]:
    """Candidate parameters of one rule, ordered from CFG earliest to CFG latest."""
    taus = sorted((float(t) for t in taus), reverse=True)
    if method == "static":
        return [{"tau": t, "s_before": s} for s in (0.0, 1.0) for t in taus]
    if method == "opposite":
        return [{"tau": t} for t in taus]
    if method == "dynamic":
        last = max(3, int(round(0.8 * steps)))  # dynamic switches by u = 0.2 anyway
        return [{"min_step": j} for j in range(2, last + 1, max(1, steps // 10))]
    raise ValueError(f"cannot calibrate {method!r}; calibrated rules: {', '.join(RULES)}")


def calibrate_transition(model, clean: Sequence[str], triggers: Sequence[str],
                         alignment: Callable[[Any, list[str]], Sequence[float | None]],
                         reproduced: Callable[[Any, list[str]], Sequence[bool | None]],
                         methods: Sequence[str] = RULES, seeds: Sequence[int] = (0, 1, 2, 3),
                         steps: int | None = None, guidance_scale: float | None = None,
                         keep: float = KEEP, batch_size: int = 256,
                         taus: Sequence[float] = TAUS,
                         progress: Callable[[str], None] | None = None) -> Calibration:
    """Sweep each rule (see the module docstring) and choose its latest switch that keeps
    clean alignment >= keep x cfg's; among several sweeps of one rule (static's s_before 0
    and 1) the one leaving the lowest reproduction (ties: the higher alignment). Each sweep
    stops at its first switch that loses the alignment (`sweep_rule`)."""
    from memaudit.guidance import build_guidance
    from memaudit.sampler import sample

    steps = int(steps or model.default_steps)
    clean, triggers = list(clean), list(triggers)
    prompts = [p for p in clean + triggers for _ in seeds]
    rseeds = [s for _ in clean + triggers for s in seeds]
    n_clean = len(clean) * len(seeds)

    def run(spec: str, params: dict[str, dict[str, float]]) -> tuple[float, float, float]:
        g = build_guidance(spec, params)
        imgs, rows = [], 0.0
        for lo in range(0, len(prompts), batch_size):
            res = sample(model, prompts[lo:lo + batch_size], rseeds[lo:lo + batch_size], g,
                         steps=steps, guidance_scale=guidance_scale)
            imgs.append(res.images)
            rows += res.unet_rows * len(res.images)
        import torch

        images = torch.cat(imgs)
        al = [a for a in alignment(images[:n_clean], prompts[:n_clean]) if a is not None]
        rep = [r for r in reproduced(images[n_clean:], prompts[n_clean:]) if r is not None]
        return (float(np.mean(al)) if al else float("nan"),
                float(np.mean(rep)) if rep else float("nan"), rows / len(prompts))

    say = progress or (lambda s: None)
    a0, r0, u0 = run("cfg", {})
    say(f"cfg: alignment {a0:.3f}, reproduction {r0:.0%}")
    cal = Calibration(cfg_alignment=a0, cfg_reproduction=r0, keep=keep)
    def measure(method: str, params: dict[str, float]) -> Candidate:
        a, r, u = run(method, {method: dict(params)})
        c = Candidate(method, dict(params), a, _ratio(a, a0), r, _ratio(u, u0))
        say(f"{method} {params}: alignment {c.alignment_ratio:.3f} of cfg, "
            f"reproduction {r:.0%}")
        return c

    for method in methods:
        mine = sweep_rule(method, sweep(method, steps, taus), measure, keep)
        cal.candidates += mine
        best = choose(method, mine, keep)
        if best is not None:
            cal.chosen[method] = best
    return cal


def sweep_rule(method: str, candidates: Sequence[dict[str, float]],
               measure: Callable[[str, dict[str, float]], Candidate], keep: float
               ) -> list[Candidate]:
    """Measure a rule's candidates in sweep order (CFG earliest to latest), each sweep
    (static: one per s_before) up to and including its first candidate whose alignment ratio
    falls below `keep`: a later switch gives CFG to fewer steps, so it is not measured (the
    chosen switch is the last kept before it)."""
    out: list[Candidate] = []
    lost: set[Any] = set()
    for params in candidates:
        family = params.get("s_before")
        if family in lost:
            continue
        c = measure(method, params)
        out.append(c)
        if not c.alignment_ratio >= keep:
            lost.add(family)
    return out


def choose(method: str, candidates: Sequence[Candidate], keep: float) -> Candidate | None:
    """The latest switch of each sweep (static: s_before 0 and 1) whose alignment ratio is
    >= keep; of those, the lowest reproduction (ties: the higher alignment). None when no
    candidate keeps the alignment. A switch that never turns CFG on (`never_on`) is measured
    but never chosen: it is sampling without guidance, not a transition rule."""
    latest: dict[Any, Candidate] = {}
    for c in candidates:
        if never_on(method, c.params):
            continue
        family = c.params.get("s_before")
        if c.alignment_ratio >= keep and (family not in latest
                                          or _later(method, c.params, latest[family].params)):
            latest[family] = c
    if not latest:
        return None
    return min(latest.values(), key=lambda c: (round(c.reproduction, 9), -c.alignment_ratio))


def never_on(method: str, params: dict[str, float]) -> bool:
    """True when the rule's switch comes after the last step: static and opposite at tau 0
    (CFG, the default scale, is never applied)."""
    return method in ("static", "opposite") and float(params.get("tau", 1.0)) <= 0.0


def _ratio(a: float, b: float) -> float:
    """a / b, where b = 0 counts a = 0 as equal (1) and a > 0 as better (inf)."""
    if b:
        return a / b
    return 1.0 if a == 0 else float("inf") if a > 0 else float("nan")


def _later(method: str, a: dict[str, float], b: dict[str, float]) -> bool:
    """a switches CFG on later than b (fewer CFG steps)."""
    if method == "dynamic":
        return a["min_step"] > b["min_step"]
    return a["tau"] < b["tau"]
