"""Evaluation metrics, accumulated as sums and counts so that ranks reduce exactly.

MAE, RMSE, CS@k (share within k years), gender accuracy, age-group accuracy and the average
absolute group difference, MAE per race and per gender with the spread (max - min) between
groups, the worst race's MAE within age groups (races differ in age mix), and the 90 % interval's
coverage and width: the calibrated interval when a calibration
rule is given (trainer/calibration.py, any method), else the distribution's central interval.
`reduce()` all-reduces the sums (never a mean of means), so two ranks give the single-process
result.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from data_pipeline.records import GENDERS, RACES
from trainer import calibration

DEFAULT_EDGES = tuple(range(0, 101, 10))  # groups 0-9, ..., 90-99, 100+
MIN_FACES_PER_CELL = 5  # a race counts in an age group's comparison from this many faces (here and in report.py)


class AgeMetrics:
    def __init__(self, cs_k: float = 5.0, group_edges: tuple[int, ...] = DEFAULT_EDGES, interval: float = 0.9,
                 calibration: dict | None = None):
        self.cs_k, self.calibration = cs_k, calibration
        self.interval = calibration["level"] if calibration else interval
        self.edges = torch.tensor(group_edges, dtype=torch.float64)
        g = len(group_edges)
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.state = {"n": z(1), "abs": z(1), "sq": z(1), "cs": z(1), "gender_n": z(1), "gender_ok": z(1),
                      "groups": z(g, g), "race_n": z(len(RACES)), "race_abs": z(len(RACES)),
                      "sex_n": z(len(GENDERS)), "sex_abs": z(len(GENDERS)),
                      "bin_race_n": z(g, len(RACES)), "bin_race_abs": z(g, len(RACES)),
                      "dist_n": z(1), "covered": z(1), "width": z(1)}

    def group(self, age: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(age.double(), self.edges[1:], right=True)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, age: torch.Tensor, *, gender: torch.Tensor | None = None,
               gender_prob: torch.Tensor | None = None, race: torch.Tensor | None = None,
               valid: torch.Tensor | None = None, distribution: torch.Tensor | None = None,
               ages: torch.Tensor | None = None) -> None:
        """`distribution` (N, K) over `ages` (K,) enables the interval metrics."""
        keep = torch.ones_like(age, dtype=torch.bool) if valid is None else valid.bool()
        pred, age = pred.detach().double().cpu()[keep.cpu()], age.double().cpu()[keep.cpu()]
        keep = keep.cpu()
        err = (pred - age).abs()
        s = self.state
        s["n"] += len(age)
        s["abs"] += err.sum()
        s["sq"] += (err ** 2).sum()
        s["cs"] += (err <= self.cs_k).sum()
        gi, gt = self.group(pred), self.group(age)
        s["groups"].index_put_((gt, gi), torch.ones_like(err), accumulate=True)
        for labels, n_key, abs_key in ((race, "race_n", "race_abs"), (gender, "sex_n", "sex_abs")):
            if labels is not None:
                lab = labels.cpu()[keep]
                known = lab >= 0
                s[n_key].index_add_(0, lab[known], torch.ones_like(err[known]))
                s[abs_key].index_add_(0, lab[known], err[known])
                if n_key == "race_n":
                    s["bin_race_n"].index_put_((gt[known], lab[known]), torch.ones_like(err[known]), accumulate=True)
                    s["bin_race_abs"].index_put_((gt[known], lab[known]), err[known], accumulate=True)
        if gender is not None and gender_prob is not None:
            g, p = gender.cpu()[keep], gender_prob.detach().double().cpu()[keep]
            known = g >= 0
            s["gender_n"] += known.sum()
            s["gender_ok"] += ((p[known] >= 0.5).long() == g[known]).sum()
        d = None if distribution is None else distribution.detach()[keep.to(distribution.device)]
        bounds = calibration.interval(pred, d, ages, self.calibration, self.interval) if ages is not None else None
        if bounds is not None:
            lo, hi = bounds
            s["dist_n"] += len(age)
            s["covered"] += ((age >= lo) & (age <= hi)).sum()
            s["width"] += (hi - lo).sum()

    def reduce(self) -> None:
        """Sum every count over the ranks (a no-op outside torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            for v in self.state.values():
                dist.all_reduce(v, op=dist.ReduceOp.SUM)

    def compute(self) -> dict:
        s = self.state
        n = s["n"].item()
        out = {"count": int(n)}
        if n == 0:
            return out
        out |= {"mae": s["abs"].item() / n, "rmse": (s["sq"].item() / n) ** 0.5, f"cs@{self.cs_k:g}": s["cs"].item() / n}
        groups = s["groups"]
        idx = torch.arange(len(groups), dtype=torch.float64)
        out["age_group_accuracy"] = groups.diag().sum().item() / n
        out["age_group_mean_abs_diff"] = (groups * (idx[:, None] - idx[None]).abs()).sum().item() / n
        if s["gender_n"].item():
            out["gender_accuracy"] = s["gender_ok"].item() / s["gender_n"].item()
        for name, table, n_key, abs_key in (("race", RACES, "race_n", "race_abs"), ("gender", GENDERS, "sex_n", "sex_abs")):
            per = {table[i]: s[abs_key][i].item() / s[n_key][i].item() for i in table if s[n_key][i] > 0}
            if per:
                out[f"mae_by_{name}"] = per
                out[f"mae_spread_{name}"] = max(per.values()) - min(per.values())
        worst = self._worst_race_in_bins()
        if worst is not None:
            out["worst_race_mae_in_age_groups"] = worst
        if s["dist_n"].item():
            out[f"interval{int(self.interval * 100)}_coverage"] = s["covered"].item() / s["dist_n"].item()
            out[f"interval{int(self.interval * 100)}_mean_width"] = s["width"].item() / s["dist_n"].item()
        return out

    def _worst_race_in_bins(self, min_faces: int = MIN_FACES_PER_CELL) -> float | None:
        """Per age group, the MAE of its worst race among those with >= `min_faces` faces there;
        averaged over the groups with two such races, weighted by their faces. None if none has."""
        n, a = self.state["bin_race_n"], self.state["bin_race_abs"]
        total = weight = 0.0
        for b in range(len(n)):
            ok = n[b] >= min_faces
            if ok.sum() < 2:
                continue
            faces = n[b][ok].sum().item()
            total += faces * (a[b][ok] / n[b][ok]).max().item()
            weight += faces
        return total / weight if weight else None
