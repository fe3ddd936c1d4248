"""`agescale evaluate`: metrics of one model or an ensemble on a shard split, as report.json,
report.md and plots/*.png (MAE by age bin, predicted vs true, age-group confusion matrix,
interval coverage by age bin for methods with a distribution, and attention or Grad-CAM maps
on sample faces)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from base.config import explain
from base.errors import UserError
from data_pipeline.config import LoaderConfig
from data_pipeline.loaders import create_loader
from data_pipeline.records import RACES
from trainer import calibration
from trainer.load import load_trained, run_dir_of
from trainer.metrics import DEFAULT_EDGES, MIN_FACES_PER_CELL, AgeMetrics
from trainer.models import Ensemble


def _collect(models, loader, tta: str = "none", rule: dict | None = None) -> dict[str, np.ndarray]:
    ens = Ensemble.for_tta(models, tta)
    cols: dict[str, list] = {"pred": [], "age": [], "gender": [], "race": [], "female_prob": [], "lo": [], "hi": [],
                             "scale": []}
    metrics = AgeMetrics(calibration=rule)
    keys, images = [], []
    for batch in loader:
        keep = batch["valid"]
        res = ens.predict(batch["image"], batch.get("body"))
        metrics.update(res["age"], batch["age"], gender=batch["gender"], gender_prob=res.get("gender_prob"),
                       race=batch["race"], valid=keep, distribution=res.get("distribution"), ages=ens.ages)
        cols["pred"].append(res["age"][keep].numpy())
        for k in ("age", "gender", "race"):
            cols[k].append(batch[k][keep].numpy())
        if "gender_prob" in res:
            cols["female_prob"].append(res["gender_prob"][keep].numpy())
        dist = res["distribution"][keep] if "distribution" in res else None
        scale = calibration.spread(dist, ens.ages, int(keep.sum()))
        cols["scale"].append(scale.numpy())
        bounds = calibration.interval(res["age"][keep], dist, ens.ages, rule)
        if bounds is not None:
            cols["lo"].append(bounds[0].numpy()), cols["hi"].append(bounds[1].numpy())
        if len(images) < 8:
            images += [img for img, v in zip(batch["image"], keep) if v][: 8 - len(images)]
        keys += [k for k, v in zip(batch["key"], keep.tolist()) if v]
    metrics.reduce()
    out = {k: np.concatenate(v) for k, v in cols.items() if v}
    out["metrics"], out["keys"], out["samples"] = metrics.compute(), keys, torch.stack(images)
    return out


def race_by_age_bin(data: dict, edges=DEFAULT_EDGES) -> dict:
    """MAE per race inside each age bin (race groups differ in age mix, so the overall spread
    between races mixes the two); per bin also the spread (max - min) over races with >= 5
    faces. {bin: {"count": n, "mae": {race: mae}, "spread": s}}."""
    edges = np.array(edges)
    names = [f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])] + [f"{edges[-1]}+"]
    bins = np.searchsorted(edges[1:], data["age"], side="right")
    err = np.abs(data["pred"] - data["age"])
    table = {}
    for b, name in enumerate(names):
        in_bin = bins == b
        if not in_bin.any():
            continue
        per = {RACES[r]: round(float(err[in_bin & (data["race"] == r)].mean()), 3)
               for r in RACES if (in_bin & (data["race"] == r)).sum() >= MIN_FACES_PER_CELL}
        table[name] = {"count": int(in_bin.sum()), "mae": per,
                       "spread": round(max(per.values()) - min(per.values()), 3) if len(per) > 1 else None}
    return table


def _saliency(model, images: torch.Tensor) -> torch.Tensor:
    """Attention maps when the model has them, else Grad-CAM of the predicted age over the
    backbone's last feature map. (N, H, W) in [0, 1]."""
    if model.attention is not None:
        with torch.no_grad():
            maps = model(images)["attention"]
    elif model.cfg.architecture != "timm":
        # MiVOLO and SwinFace have no single last feature map for Grad-CAM: use the gradient of
        # the predicted age with respect to the pixels (a plain saliency map) instead.
        images = images.detach().clone().requires_grad_(True)
        model.method.estimate(model(images)["age"]).sum().backward()
        maps = images.grad.abs().sum(1).detach()
    else:
        fmap = model._feature_map(images).detach().requires_grad_(True)
        pooled = model.backbone.forward_head(fmap if getattr(model.backbone, "output_fmt", "NCHW") == "NCHW"
                                             else fmap.permute(0, 2, 3, 1), pre_logits=True)
        age_in = pooled
        if model.gender_embed is not None:
            age_in = torch.cat([pooled, model.gender_embed(torch.sigmoid(model.gender(pooled)))], 1)
        model.method.estimate(model.age(age_in)).sum().backward()
        weights = fmap.grad.mean(dim=(2, 3), keepdim=True)
        maps = torch.relu((weights * fmap).sum(1)).detach()
    maps = maps - maps.flatten(1).min(1)[0][:, None, None]
    return maps / maps.flatten(1).max(1)[0][:, None, None].clamp_min(1e-8)


def _plots(data: dict, model, mean, std, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    edges = np.array(DEFAULT_EDGES)
    names = [f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])] + [f"{edges[-1]}+"]
    groups_true = np.searchsorted(edges[1:], data["age"], side="right")
    groups_pred = np.searchsorted(edges[1:], data["pred"], side="right")
    err = np.abs(data["pred"] - data["age"])
    made = []

    fig, ax = plt.subplots(figsize=(8, 4))
    mae = [err[groups_true == g].mean() if (groups_true == g).any() else np.nan for g in range(len(names))]
    ax.bar(names, mae)
    ax.set(xlabel="true age", ylabel="MAE (years)", title="MAE by age bin")
    fig.savefig(out / "mae_by_age_bin.png", dpi=100, bbox_inches="tight")
    made.append("mae_by_age_bin.png")

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(data["age"], data["pred"], s=4, alpha=0.4)
    top = max(data["age"].max(), data["pred"].max())
    ax.plot([0, top], [0, top], "k--", lw=1)
    ax.set(xlabel="true age", ylabel="predicted age", title="Predicted vs true age")
    fig.savefig(out / "pred_vs_true.png", dpi=100, bbox_inches="tight")
    made.append("pred_vs_true.png")

    conf = np.zeros((len(names), len(names)))
    np.add.at(conf, (groups_true, groups_pred), 1)
    conf = conf / conf.sum(1, keepdims=True).clip(min=1)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(conf, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45)
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted group", ylabel="true group", title="Age-group confusion (row-normalised)")
    fig.colorbar(im)
    fig.savefig(out / "age_group_confusion.png", dpi=100, bbox_inches="tight")
    made.append("age_group_confusion.png")

    if "lo" in data:
        covered = (data["age"] >= data["lo"]) & (data["age"] <= data["hi"])
        cov = [covered[groups_true == g].mean() if (groups_true == g).any() else np.nan for g in range(len(names))]
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar(names, cov)
        ax.axhline(0.9, color="k", ls="--", lw=1)
        ax.set(ylim=(0, 1), xlabel="true age", ylabel="coverage", title="90 % interval coverage by age bin")
        fig.savefig(out / "interval_coverage.png", dpi=100, bbox_inches="tight")
        made.append("interval_coverage.png")

    images = data["samples"]
    maps = _saliency(model, images.clone())
    faces = (images * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).clamp(0, 1)
    fig, axes = plt.subplots(2, len(images), figsize=(2 * len(images), 4), squeeze=False)
    for i in range(len(images)):
        axes[0, i].imshow(faces[i].permute(1, 2, 0).numpy())
        axes[1, i].imshow(faces[i].permute(1, 2, 0).numpy())
        axes[1, i].imshow(maps[i].numpy(), cmap="jet", alpha=0.5, interpolation="bilinear",
                          extent=(0, faces.shape[3], faces.shape[2], 0))
        for a in axes[:, i]:
            a.axis("off")
    kind = "attention" if model.attention is not None else "gradcam"
    fig.suptitle("Attention maps" if kind == "attention" else "Grad-CAM of the predicted age")
    fig.savefig(out / f"{kind}.png", dpi=100, bbox_inches="tight")
    made.append(f"{kind}.png")
    plt.close("all")
    return made


def _reframe(cfg, image_size: int | None, crop_pct: float | None) -> bool:
    """Set the evaluation framing on `cfg` (in place), validated by the loader's own schema;
    True if it differs from the run's."""
    lc = cfg.data.loader
    update = {k: v for k, v in (("image_size", image_size), ("eval_crop_pct", crop_pct)) if v is not None}
    try:
        new = LoaderConfig.model_validate({**lc.model_dump(), **update})
    except ValidationError as e:
        flags = {"image_size": "--image-size", "eval_crop_pct": "--crop-pct"}
        raise UserError(explain(e, lambda key: flags.get(key, "evaluate"), LoaderConfig)) from None
    if new.image_size != lc.image_size and cfg.model.fixed_input_size:
        raise UserError(f"--image-size {new.image_size}: the run's {cfg.model.architecture} model "
                        f"({cfg.model.backbone}) is built for {lc.image_size} px input")
    cfg.data.loader = new
    return (new.image_size, new.eval_crop_pct) != (lc.image_size, lc.eval_crop_pct)


def fit_rule(models, cfg, calibrate_on: Path, tta: str) -> dict:
    """The split-conformal 90 % interval of `models` with `tta`, fitted on the shard split
    `calibrate_on` (SHARDS/<split>) at the framing of `cfg`."""
    if not (calibrate_on.parent / "manifest.json").exists():
        raise UserError(f"--calibrate-on {calibrate_on}: expected SHARDS/<split>, e.g. runs/shards/utk/val")
    cal_cfg = cfg.model_copy(deep=True)
    cal_cfg.data.loader.shards = str(calibrate_on.parent)
    cal = _collect(models, create_loader(cal_cfg.data, calibrate_on.name, train=False), tta)
    rule = calibration.fit(torch.from_numpy(cal["pred"]), torch.from_numpy(cal["age"]),
                           torch.from_numpy(cal["scale"]))
    rule["split"], rule["tta"] = str(calibrate_on), tta
    rule["decode"] = models[0].method.decode
    return rule


def evaluate_runs(paths: list[Path], data: Path, out: Path, tta: str | None = None,
                  calibrate_on: Path | None = None, image_size: int | None = None,
                  crop_pct: float | None = None, decode: str | None = None) -> dict:
    """Metrics, per-race-in-age-bin table and plots of one model or an ensemble on `data`.

    Test-time augmentation: `tta`, else the first run's `model.tta`. The 90 % interval: fitted on
    `calibrate_on` (a split of the same shards) when given, else one model's stored
    `calibration.json` when it was fitted with the same TTA, else the distribution's own
    (uncalibrated) central interval.

    `image_size` / `crop_pct` change the evaluation framing (FixRes: training's random resized
    crops frame faces tighter than a whole-image evaluation does); a stored calibration was fitted
    at the run's own framing, so it applies only there (`calibrate_on` fits one at the new).

    `decode` ("mean" / "median") overrides the runs' `model.decode`, as the stored calibration's
    interval is centred on the run's own decode, it applies only to that."""
    loaded = [load_trained(p) for p in paths]
    cfg = loaded[0][0]
    tta = tta or cfg.model.tta
    if decode is not None:
        for _, m, _ in loaded:
            m.method.use_decode(decode, "--decode")
    decodes = sorted({m.method.decode for _, m, _ in loaded})
    if len(decodes) > 1:
        raise UserError(f"the ensemble's runs decode their ages differently ({', '.join(decodes)}): "
                        "pass --decode mean or --decode median")
    decode = decodes[0]
    reframed = _reframe(cfg, image_size, crop_pct)
    split, shards = data.name, data.parent
    if not (shards / "manifest.json").exists():
        raise UserError(f"--data {data}: expected SHARDS/<split>, e.g. runs/shards/utk/test")
    cfg.data.loader.shards = str(shards)
    models = [m for _, m, _ in loaded]
    rule, rule_from = None, "not calibrated (the distribution's central interval, if the method has one)"
    if calibrate_on is not None:
        rule = fit_rule(models, cfg, calibrate_on, tta)
        rule_from = f"fitted on {calibrate_on} ({rule['n']} faces)"
    elif len(loaded) == 1 and reframed:
        rule_from = ("not calibrated: the run's calibration.json was fitted at its own framing; "
                     "pass --calibrate-on SHARDS/val for this one")
    elif len(loaded) == 1:
        run = run_dir_of(paths[0])
        own = calibration.load(run)
        stored = calibration.applies(own, loaded[0][2], run, tta, decode)
        if stored is not None:
            rule, rule_from = stored, f"the run's calibration.json (fitted on its {stored.get('split', 'val')} split)"
        elif own is not None and (own.get("tta", "none"), own.get("decode", "mean")) != (tta, decode):
            rule_from = (f"not calibrated: the run's calibration.json was fitted with TTA {own.get('tta', 'none')} "
                         f"and decode {own.get('decode', 'mean')}; pass --calibrate-on SHARDS/val for this one")
    loader = create_loader(cfg.data, split, train=False)
    result = _collect(models, loader, tta, rule)
    metrics = result["metrics"]
    metrics["mae_by_race_in_age_bin"] = race_by_age_bin(result)
    plots = _plots(result, loaded[0][1], cfg.data.loader.mean, cfg.data.loader.std, out / "plots")
    lc = cfg.data.loader
    report = {"models": [str(w) for _, _, w in loaded], "data": str(data), "tta": tta, "decode": decode,
              "framing": {"image_size": lc.image_size, "crop_pct": lc.eval_crop_pct},
              "interval_calibration": {"from": rule_from, **(rule or {})}, "metrics": metrics, "plots": plots}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# agescale evaluation: {data}", "", f"Models: {', '.join(report['models'])}", "",
             f"Test-time augmentation: {tta}. Age: the {decode} of each model's output. Framing: {lc.image_size} px, centre crop {lc.eval_crop_pct:g} "
             f"of the image. 90 % interval: {rule_from}.", "",
             "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
              for k, v in metrics.items() if not isinstance(v, dict)]
    for group in ("race", "gender"):
        if f"mae_by_{group}" in metrics:
            lines += ["", f"MAE by {group} (spread {metrics[f'mae_spread_{group}']:.2f}):", "",
                      f"| {group} | MAE |", "| --- | --- |"]
            lines += [f"| {k} | {v:.2f} |" for k, v in metrics[f"mae_by_{group}"].items()]
    table = metrics["mae_by_race_in_age_bin"]
    races = [r for r in RACES.values() if any(r in row["mae"] for row in table.values())]
    if races:  # datasets without race labels (APPA-REAL, IMDB-WIKI) have none
        lines += ["", "MAE by race within each age bin (races with >= 5 faces in the bin):", "",
                  f"| age bin | faces | {' | '.join(races)} | spread |", "| --- " * (len(races) + 3) + "|"]
        for b, row in table.items():
            cells = [f"{row['mae'][r]:.2f}" if r in row["mae"] else "" for r in races]
            spread = "" if row["spread"] is None else f"{row['spread']:.2f}"
            lines.append(f"| {b} | {row['count']} | {' | '.join(cells)} | {spread} |")
    lines += ["", *[f"![{p}](plots/{p})" for p in plots], ""]
    (out / "report.md").write_text("\n".join(lines))
    return report
