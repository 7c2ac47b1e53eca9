"""`auto`: screen first, mitigate only what needs it (memaudit's own; METHODS.md 3.6).

Each prompt is screened (memaudit/screen: the default score, seeds 0..seeds-1) and flagged when
its score is above the threshold: `threshold`, else one calibrated on the clean prompt list
`calibrate` at `fpr`, else the plan's [screen] scores and threshold (`use_screen`, set by the
audit runner). Rows of unflagged prompts get plain CFG, eps_hat = e_u + s0 (e_c - e_u),
from the same batched forward `cfg` makes, so their images are bit-identical to `cfg`'s for
the same rows and batches. Rows of flagged prompts get `mitigation` (a method spec; default
`dynamic`, the transition rule) and, when a copy criterion is given, AMG's per-step check on
top (parts `amg`, default all): eps_hat = eps_mitigation + (eps_AMG - eps_CFG). Everything a
mitigation adds (prompt/embedding/noise changes, its extra conditions, AMG's similarity) is
computed on the flagged rows only, in forwards of their own; the main batched forward keeps
cfg's rows. Screening one prompt is its own forward(s) (the prompt's seeds in one batch), so
its decision does not depend on the batch it came in.
Trace: auto_flagged, auto_score per row, and the mitigation's fields on flagged rows (None
elsewhere); `generation_record` gives the decision and its reason per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memaudit.common import UserError
from memaudit.guidance.base import Guidance, StepState, cfg_combine
from memaudit.models.cond import Cond


class Auto(Guidance):
    name = "auto"
    uses_criterion = True

    @dataclass
    class Params:
        score: str = ""  # screening score; "" = memaudit.screen.DEFAULT_SCORE
        threshold: float | None = None  # flag when score > threshold
        calibrate: str | None = None  # clean prompt list to calibrate the threshold on
        fpr: float = 0.01  # false-positive rate of that calibration
        seeds: int = 4  # screening seeds 0..seeds-1
        mitigation: str = "dynamic"  # method spec for flagged prompts
        amg: str = "spe,dup,sim"  # AMG parts on top when a criterion is given; "none": off

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if self.params.seeds < 1:
            raise UserError("auto.seeds must be >= 1")
        self.all_params: dict[str, dict[str, Any]] = {}
        self.bind_params({})
        self.scores: dict[str, float] = {}
        self.screen: dict[str, Any] | None = None  # the plan's screening (use_screen)
        self.threshold: float | None = None
        self.threshold_source = ""
        self.flags = torch.zeros(0, dtype=torch.bool)
        self.rows: list[str] = []

    # --- configuration -------------------------------------------------------------------
    def bind_params(self, params: dict[str, dict[str, Any]]) -> None:
        """Build the inner mitigation and AMG with the run's parameters of those methods."""
        from memaudit.guidance.spec import build_guidance

        self.all_params = dict(params or {})
        if self.params.mitigation.split(":")[0] == "auto":
            raise UserError("auto.mitigation cannot be auto")
        self.inner = build_guidance(self.params.mitigation, self.all_params)
        self.needs_criterion = bool(self.inner.needs_criterion)
        parts = self.params.amg.strip().lower()
        self.amg = None
        if parts not in ("", "none", "off", "false"):
            amg_params = {k: v for k, v in self.all_params.get("amg", {}).items()
                          if k != "parts"}
            self.amg = build_guidance("amg", {"amg": {**amg_params, "parts": parts}})

    def use_screen(self, scores: dict[str, float], threshold: float | None, score: str,
                   seeds: int, steps: int = 1, source: str = "plan [screen]") -> None:
        """Decide with precomputed scores (the audit plan's screening unit)."""
        self.screen = {"scores": dict(scores), "threshold": threshold, "score": score,
                       "seeds": int(seeds), "steps": int(steps), "source": source}

    @property
    def score_name(self) -> str:
        from memaudit.screen import DEFAULT_SCORE

        if self.screen is not None and self.params.threshold is None \
                and self.params.calibrate is None:
            return self.screen["score"]
        return self.params.score or DEFAULT_SCORE

    def _score(self, model: Any, prompt: str) -> float:
        from memaudit.screen import screen_prompts

        if prompt not in self.scores:
            own = self.screen is None or self.params.threshold is not None \
                or self.params.calibrate is not None
            seeds = self.params.seeds if own else self.screen["seeds"]
            steps = 1 if own else self.screen["steps"]
            if not own and prompt in self.screen["scores"]:
                self.scores[prompt] = float(self.screen["scores"][prompt])
            else:
                self.scores[prompt] = float(screen_prompts(
                    model, [prompt], steps=steps, seeds=seeds, batch_size=seeds,
                    score=self.score_name, progress=False)[0])
        return self.scores[prompt]

    def _resolve_threshold(self, model: Any) -> float:
        if self.threshold is not None:
            return self.threshold
        p = self.params
        if p.threshold is not None:
            self.threshold, self.threshold_source = float(p.threshold), "auto.threshold"
        elif p.calibrate is not None:
            from memaudit.data.prompts import read_prompts
            from memaudit.screen import calibrate_threshold

            clean = [r.text for r in read_prompts(p.calibrate)]
            vals = [self._score(model, c) for c in clean]
            self.threshold = calibrate_threshold(vals, p.fpr)
            self.threshold_source = f"calibrated on {p.calibrate} at FPR {p.fpr:g}"
        elif self.screen is not None and self.screen["threshold"] is not None:
            self.threshold = float(self.screen["threshold"])
            self.threshold_source = self.screen["source"]
        else:
            raise UserError("method 'auto' needs a screening threshold: give "
                            "auto.threshold=X or auto.calibrate=CLEAN_PROMPTS, or a plan "
                            "[screen] table with a threshold or clean_label")
        return self.threshold

    def decision(self, model: Any, prompt: str) -> bool:
        return self._score(model, prompt) > self._resolve_threshold(model)

    # --- before the loop -------------------------------------------------------------------
    def prepare_prompts(self, prompts: list[str], seeds: list[int], model: Any) -> list[str]:
        self.rows = list(prompts)
        self.flags = torch.tensor([self.decision(model, p) for p in prompts], dtype=torch.bool)
        idx = self.idx
        if not idx:
            return prompts
        sub = self.inner.prepare_prompts([prompts[i] for i in idx], [seeds[i] for i in idx],
                                         model)
        out = list(prompts)
        for i, p in zip(idx, sub, strict=True):
            out[i] = p
        return out

    @property
    def idx(self) -> list[int]:
        return self.flags.nonzero().flatten().tolist()

    def prepare_embeddings(self, emb_c: Cond, emb_u: Cond, x_T: torch.Tensor,
                           seeds: list[int], model: Any, t0: torch.Tensor
                           ) -> tuple[Cond, Cond]:
        idx = self.idx
        if not idx:
            return emb_c, emb_u
        rows = torch.tensor(idx)
        c, u = self.inner.prepare_embeddings(emb_c[rows], emb_u[rows], x_T[rows.to(x_T.device)],
                                             [seeds[i] for i in idx], model, t0)
        return emb_c.put(rows, c.detach()), emb_u.put(rows, u.detach())

    def prepare_noise(self, x_T: torch.Tensor, emb_c: Cond, emb_u: Cond, seeds: list[int],
                      model: Any, t0: torch.Tensor) -> torch.Tensor:
        idx = self.idx
        if not idx:
            return x_T
        rows = torch.tensor(idx)
        dev = rows.to(x_T.device)
        new = self.inner.prepare_noise(x_T[dev], emb_c[rows], emb_u[rows],
                                       [seeds[i] for i in idx], model, t0)
        if new is x_T[dev]:
            return x_T
        x = x_T.detach().clone()
        x[dev] = new.detach().to(x)
        return x

    # --- each step -------------------------------------------------------------------------
    def _sub(self, state: StepState, key: str, rows: torch.Tensor) -> StepState:
        dev = rows.to(state.x_t.device)
        mem = state.memory.setdefault(key, {})
        return StepState(index=state.index, num_steps=state.num_steps, t=state.t, u=state.u,
                         x_t=state.x_t[dev], alpha_bar=state.alpha_bar, s0=state.s0,
                         model=state.model, criterion=state.criterion,
                         e_u=state.e_u[dev], e_c=state.e_c[dev], emb_u=state.emb_u[rows],
                         emb_c=state.emb_c[rows], memory=mem,
                         prompts=[state.prompts[i] for i in rows.tolist()],
                         seeds=[state.seeds[i] for i in rows.tolist()])

    @staticmethod
    def _extra(g: Guidance, sub: StepState) -> None:
        """The mitigation's extra conditions, evaluated on the flagged rows only."""
        conds = g.extra_conditions(sub) or {}
        if not conds:
            return
        embs = list(conds.values())
        with torch.no_grad():
            out = sub.model.eps(torch.cat([sub.x_t] * len(embs)), sub.t, Cond.cat(embs))
        sub.extra = dict(zip(conds, out.float().chunk(len(embs)), strict=True))

    def guide(self, state: StepState):
        b = state.e_c.shape[0]
        eps = cfg_combine(state.e_u, state.e_c, state.s0)
        trace: dict[str, Any] = {
            "auto_flagged": self.flags.float(),
            "auto_score": torch.tensor([self.scores[p] for p in self.rows], dtype=torch.float64)}
        idx = self.idx
        if not idx:
            return eps, trace
        if self.needs_criterion and state.criterion is None:
            raise UserError(f"auto.mitigation {self.params.mitigation!r} needs a copy "
                            "criterion (give an index)")
        rows = torch.tensor(idx)
        sub = self._sub(state, "auto_inner", rows)
        self._extra(self.inner, sub)
        eps_f, tr = self.inner.guide(sub)
        parts = [tr or {}]
        self.applied = self.params.mitigation
        if self.amg is not None and state.criterion is not None:
            self.applied += f" + amg:{self.params.amg}"
            sub_a = self._sub(state, "auto_amg", rows)
            self._extra(self.amg, sub_a)
            eps_a, tr_a = self.amg.guide(sub_a)
            eps_f = eps_f + (eps_a - cfg_combine(sub_a.e_u, sub_a.e_c, state.s0))
            parts.append(tr_a or {})
        eps = eps.clone()
        eps[rows.to(eps.device)] = eps_f.to(eps)
        for tr in parts:
            for key, value in tr.items():
                trace[key] = _scatter(value, idx, b)
        return eps, trace

    def generation_record(self, prompt: str, seed: int) -> dict[str, Any]:
        if prompt not in self.scores:
            return {}
        flagged = self.scores[prompt] > (self.threshold if self.threshold is not None
                                         else float("inf"))
        used = getattr(self, "applied", self.params.mitigation)
        return {"auto": {"flagged": bool(flagged), "score": self.scores[prompt],
                         "threshold": self.threshold, "score_name": self.score_name,
                         "threshold_source": self.threshold_source,
                         "applied": used if flagged else "cfg"}}


def _scatter(value: Any, idx: list[int], b: int) -> list[Any]:
    """A flagged-rows trace value as a list over all b rows (None on unflagged rows)."""
    out: list[Any] = [None] * b
    if torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == len(idx):
        vals = value.detach().cpu().tolist()
    elif isinstance(value, list | tuple) and len(value) == len(idx):
        vals = list(value)
    else:
        vals = [value.item() if torch.is_tensor(value) else value] * len(idx)
    for i, v in zip(idx, vals, strict=True):
        out[i] = v
    return out
