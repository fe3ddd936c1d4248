"""The sweep's tables and plot, from Ray Tune's ResultGrid and each trial's own run directory.

A trial's status: `completed` (the trainer finished and wrote summary.json), `stopped` (the
scheduler ended it early, e.g. an ASHA rung), or `errored` (it crashed on every attempt).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import yaml

from search.spec import SweepSpec
from search.trial import ATTEMPTS, trial_dir

TRIAL_ID = re.compile(r"([0-9a-f]{5}_\d{5})")


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
        **{k: (result.config or {}).get(k) for k in spec.space},
        "val_rounds": len(history), "epochs": history[-1]["epoch"] if history else 0,
        "steps": history[-1]["step"] if history else 0,
        "final_val_mae": maes[-1] if maes else None, "best_val_mae": min(maes) if maes else None,
        "test_mae": (summary or {}).get("test", {}).get("mae"),
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
    result = {"metric": spec.metric, "mode": spec.mode, "scheduler": spec.scheduler.name,
              "best_trial": best["trial_id"] if best else None,
              "best_val_mae": best["best_val_mae"] if best else None,
              "best_params": {k: best[k] for k in spec.space} if best else None,
              "counts": {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped", "errored")},
              "trials": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
