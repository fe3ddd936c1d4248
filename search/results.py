"""The sweep's tables and plot, from Ray Tune's ResultGrid and each trial's own run directory.

A trial's status: `completed` (the trainer finished and wrote summary.json), `stopped` (the
scheduler ended it early, e.g. an ASHA rung), or `errored` (it crashed on every attempt).
"""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import numpy as np
import yaml

from search.spec import SweepSpec
from search.trial import ATTEMPTS, trial_dir

TRIAL_ID = re.compile(r"([0-9a-f]{5}_\d{5})")
# test metrics (from the trainer's summary.json) the tables carry, besides the MAE
TEST_COLUMNS = ("cs@5", "gender_accuracy", "age_group_accuracy", "interval90_coverage", "worst_race_mae_in_age_groups")


def _trial_id(result) -> str | None:
    # The trial's folder names it; its last metrics may be another trial's after a PBT exploit.
    m = TRIAL_ID.search(Path(result.path).name)
    return m.group(1) if m else (result.metrics or {}).get("trial_id")


def _history(run: Path | None) -> list[dict]:
    """(step, epoch, val_mae) per validation, from the trainer's own log: one per step, the last
    one where a resume or a PBT copy went over a step again, so it is the run's final lineage."""
    log = run / "metrics.jsonl" if run else None
    if not log or not log.exists():
        return []
    maes = {}
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if rec["phase"] == "val":
            maes[rec["step"]] = rec["mae"]
    spe = json.loads((run / "run.json").read_text()).get("steps_per_epoch") or 0
    return [{"step": s, "epoch": round(s / spe, 3) if spe else None, "val_mae": maes[s]} for s in sorted(maes)]


def _run_facts(run: Path | None) -> dict:
    """What the methods table needs beyond the metrics: parameters (from best/), median images/s
    of the trainer's own rows, and the wall time from the run's first start to its summary."""
    facts = {"parameters": None, "images_per_s": None, "train_s": None}
    if run is None:
        return facts
    best = run / "best" / "model.safetensors"
    if best.exists():
        from safetensors import safe_open

        with safe_open(str(best), "np") as f:
            facts["parameters"] = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    log = run / "metrics.jsonl"
    if log.exists():
        rates = [r["images_per_s"] for r in map(json.loads, log.read_text().splitlines())
                 if r.get("phase") == "train" and "images_per_s" in r]
        facts["images_per_s"] = float(np.median(rates[1:] or rates)) if rates else None  # the first warms up
    summary, meta = run / "summary.json", run / "run.json"
    if summary.exists() and meta.exists():
        start = json.loads(meta.read_text())["starts"][0]["time"]
        facts["train_s"] = round(summary.stat().st_mtime - time.mktime(time.strptime(start, "%Y-%m-%dT%H:%M:%S")))
    return facts


def _row(result, spec: SweepSpec, out: Path) -> dict:
    tid = _trial_id(result)
    run = trial_dir(str(out), tid) if tid else None
    summary_file = run / "summary.json" if run else None
    summary = json.loads(summary_file.read_text()) if summary_file and summary_file.exists() else None
    attempts_file = run / ATTEMPTS if run else None
    attempts = len(attempts_file.read_text().splitlines()) if attempts_file and attempts_file.exists() else 0
    history = _history(run)
    error = None
    if result.error is not None:
        text = str(result.error).strip().splitlines()
        error = next((l for l in reversed(text) if l.strip()), type(result.error).__name__)[:500]
    status = "errored" if error else "completed" if summary else "stopped"
    maes = [h["val_mae"] for h in history]
    return {
        "trial_id": tid, "status": status,
        **({"variant": (result.config or {}).get("variant")} if spec.variants else {}),
        **{k: (result.config or {}).get(k) for k in spec.space},
        "val_rounds": len(history), "epochs": history[-1]["epoch"] if history else 0,
        "steps": history[-1]["step"] if history else 0,
        "final_val_mae": maes[-1] if maes else None, "best_val_mae": min(maes) if maes else None,
        "test_mae": (summary or {}).get("test", {}).get("mae"),
        **{f"test_{k}": (summary or {}).get("test", {}).get(k) for k in TEST_COLUMNS},
        **_run_facts(run),
        "attempts": attempts, "error": error, "run_dir": str(run) if run else None,
        "history": history,
    }


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["history"]:
            label = f"{r['trial_id']} ({r['status']}, best {r['best_val_mae']:.2f})"
            ax.plot([h["epoch"] if h["epoch"] is not None else h["step"] for h in r["history"]],
                    [h["val_mae"] for h in r["history"]], marker="o",
                    label=label, linestyle="--" if r["status"] != "completed" else "-")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation MAE (years)")
    ax.set_title("validation MAE of every trial")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(values: list, digits: int = 2, spread: bool = False) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return ""
    mean = float(np.mean(vals))
    if spread and len(vals) > 1:
        return f"{mean:.{digits}f} ± {float(np.std(vals, ddof=1)):.{digits}f}"
    return f"{mean:.{digits}f}"


def methods_table(rows: list[dict], spec: SweepSpec) -> str:
    """One markdown row per configuration (the variant and every searched key but the seed),
    its numbers averaged over the seeds that ran it; the MAE with its std over seeds, so a gap
    between two rows can be read against seed noise. Sorted by test MAE, else best val MAE."""
    keys = [*(["variant"] if spec.variants else []), *(k for k in spec.space if k != "train.seed")]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] != "errored":
            # a variant `NAME@seedN` is NAME again with another seed: the same row
            group = tuple(str(r.get(k)).split("@")[0] if k == "variant" else str(r.get(k)) for k in keys)
            groups.setdefault(group, []).append(r)

    def order(item):
        mae = [r["test_mae"] for r in item[1] if r["test_mae"] is not None]
        val = [r["best_val_mae"] for r in item[1] if r["best_val_mae"] is not None]
        return (float(np.mean(mae)) if mae else float("inf"), float(np.mean(val)) if val else float("inf"))

    head = [*keys, "seeds", "test MAE", "best val MAE", "CS@5", "gender acc.", "age-group acc.",
            "90 % coverage", "worst-race MAE in age groups", "train time (min)", "parameters (M)", "images/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for group, rs in sorted(groups.items(), key=order):
        col = lambda k: [r.get(k) for r in rs]  # noqa: E731
        params = [p / 1e6 if p else None for p in col("parameters")]
        minutes = [t / 60 if t else None for t in col("train_s")]
        lines.append("| " + " | ".join([
            *group, str(len(rs)), _fmt(col("test_mae"), spread=True), _fmt(col("best_val_mae"), spread=True),
            _fmt(col("test_cs@5"), 3), _fmt(col("test_gender_accuracy"), 3), _fmt(col("test_age_group_accuracy"), 3),
            _fmt(col("test_interval90_coverage"), 3), _fmt(col("test_worst_race_mae_in_age_groups")),
            _fmt(minutes, 1), _fmt(params, 1), _fmt(col("images_per_s"), 0)]) + " |")
    return "\n".join(lines) + "\n"


def write_results(grid, spec: SweepSpec, base: dict, out: Path) -> dict:
    rows = sorted((_row(r, spec, out) for r in grid), key=lambda r: r["trial_id"] or "")
    columns = [k for k in rows[0] if k != "history"] if rows else []
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    ok = [r for r in rows if r["best_val_mae"] is not None and r["status"] != "errored"]
    best = min(ok, key=lambda r: r["best_val_mae"]) if ok else None
    if best:
        cfg = yaml.safe_load((Path(best["run_dir"]) / "config.yaml").read_text())
        cfg["train"]["run_dir"] = str(out / "best_run")
        header = (f"# Best of the sweep in {out}: trial {best['trial_id']}, best validation MAE "
                  f"{best['best_val_mae']:.3f}.\n# Train it with: agescale train {out / 'best.yaml'}\n")
        (out / "best.yaml").write_text(header + yaml.safe_dump(cfg, sort_keys=False))
    _plot(rows, out / "val_mae.png")
    (out / "results.md").write_text(
        f"# Sweep {out.name}: one row per configuration, mean over seeds (± std where more than one)\n\n"
        "Test metrics from each trial's own `summary.json` (its best-validation weights on the test split; "
        "empty when the trial ran without `train.test_at_end`). Age groups: 0-9, 10-19, ..., 90-99, 100+. "
        "Worst-race MAE in age groups: per age group the MAE of its worst race (>= 5 faces), averaged "
        "over groups weighted by faces. Train time: first start to summary, validation and test included; "
        "images/s: median of the trainer's logged rates.\n\n" + methods_table(rows, spec))
    result = {"metric": spec.metric, "mode": spec.mode, "scheduler": spec.scheduler.name,
              "best_trial": best["trial_id"] if best else None,
              "best_val_mae": best["best_val_mae"] if best else None,
              "best_params": {k: best[k] for k in [*(["variant"] if spec.variants else []), *spec.space]}
              if best else None,
              "counts": {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped", "errored")},
              "trials": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
