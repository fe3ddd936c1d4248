"""`agescale` command line. Thin: parse arguments, load the config, call one function.

User errors (UserError) print one line `agescale: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from base.errors import UserError
from base.paths import out_dir, out_file
from launch import __version__


def _config(args: argparse.Namespace, extra: list[str] = ()):
    from trainer.run_config import load_config

    return load_config(args.config, [*extra, *args.overrides])


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config (default: built-in defaults = configs/base.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. data.shard.max_samples_per_shard=500")


# ---------------------------------------------------------------- shard / verify / datasets

def cmd_shard(args: argparse.Namespace) -> int:
    from base.config import resolved
    from data_pipeline.config import parse_splits
    from data_pipeline.shard import shard_datasets

    if len(args.dataset) != len(args.src):
        raise UserError(f"give one --src per --dataset (got {len(args.dataset)} --dataset, {len(args.src)} --src)")
    extra = []
    if args.splits is not None:
        try:
            splits = parse_splits(args.splits)
        except ValueError as e:
            raise UserError(str(e)) from None
        extra.append("data.shard.splits=" + json.dumps(splits))
    for flag, key in (("seed", "seed"), ("max_side", "max_side"), ("workers", "workers"), ("executor", "executor")):
        if getattr(args, flag) is not None:
            extra.append(f"data.shard.{key}={getattr(args, flag)}")
    cfg = _config(args, extra)
    m = shard_datasets(list(zip(args.dataset, args.src)), args.out, cfg.data, overwrite=args.overwrite,
                       resume=args.resume, resolved_config=resolved(cfg))
    for split, info in m["splits"].items():
        print(f"{split:>6}: {info['count']:6d} samples in {len(info['shards'])} shards")
    print(f"rejected: {len(m['rejected'])} (reasons in {args.out / 'manifest.json'})")
    if m["total"].get("duplicates"):
        print(f"duplicates: {m['total']['duplicates']} identical files stored once (listed in the manifest)")
    print(f"wrote {args.out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from data_pipeline.verify import verify_shards

    problems, n = verify_shards(args.dir)
    for p in problems:
        print(f"FAIL {p}")
    if problems:
        print(f"{args.dir}: {len(problems)} problem(s) in {n} shards", file=sys.stderr)
        return 1
    print(f"{args.dir}: {n} shards OK")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from data_pipeline.datasets import list_datasets

    for a in list_datasets():
        print(f"{a.name:<10} {a.summary}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.run_config import load_config
    from trainer.run_log import guard_run_dir
    from trainer.train import train

    cfg = load_config(args.config, args.overrides)
    guard_run_dir(Path(cfg.train.run_dir), args.resume, args.overwrite)
    summary = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        test = summary.get("test", {})
        print(f"run: {cfg.train.run_dir}")
        print(f"best validation MAE: {summary['best_val_mae']:.2f}")
        if test:
            print(f"test MAE: {test['mae']:.2f}  CS@5: {test['cs@5']:.3f}  "
                  f"gender accuracy: {test.get('gender_accuracy', float('nan')):.3f}  ({test['count']} images)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from trainer.report import evaluate_runs

    out = out_dir(args.out or (args.runs[0] if args.runs[0].is_dir() else args.runs[0].parent) / f"eval-{args.data.name}")
    report = evaluate_runs(args.runs, args.data, out, tta=args.tta, calibrate_on=args.calibrate_on,
                           image_size=args.image_size, crop_pct=args.crop_pct, decode=args.decode)
    m = report["metrics"]
    cov = m.get("interval90_coverage")
    print(f"MAE {m['mae']:.2f}  CS@5 {m['cs@5']:.3f}  gender accuracy {m.get('gender_accuracy', float('nan')):.3f}"
          + (f"  90% interval coverage {cov:.3f}" if cov is not None else "") + f"  ({m['count']} images)")
    fr = report["framing"]
    print(f"test-time augmentation: {report['tta']}; age: {report['decode']}; framing: {fr['image_size']} px, crop {fr['crop_pct']:g}; "
          f"interval: {report['interval_calibration']['from']}")
    print(f"wrote {out / 'report.md'}, {out / 'report.json'} and {len(report['plots'])} plots")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from trainer.export import export_bundle

    if args.format == "triton":
        import tempfile

        from trainer.export_triton import write_repository

        out = out_dir(args.out)
        with tempfile.TemporaryDirectory() as tmp:
            export_bundle(args.run, Path(tmp), tta=args.tta, detector=False, calibrate_on=args.calibrate_on)
            model_dir = write_repository(Path(tmp), out, max_batch_size=args.max_batch_size)
        print(f"wrote the Triton model repository {out}: {model_dir.name}/config.pbtxt, {model_dir.name}/1/model.onnx")
        return 0
    export_bundle(args.run, out_dir(args.out), tta=args.tta, detector=not args.no_detector,
                  calibrate_on=args.calibrate_on)
    print(f"wrote {args.out}: model.safetensors model.onnx preprocess.json labels.json card.md card.json"
          + ("" if args.no_detector else " detector/"))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    # Serving side: ONNX Runtime, NumPy and Pillow only (no torch, DeepSpeed, DALI, Ray).
    from serving.predict import Predictor, expand

    if not (args.bundle / "model.onnx").exists():
        raise UserError(f"{args.bundle}: no model.onnx (make one with `agescale export RUN --out BUNDLE`)")
    files = expand(args.images)
    if not files:
        raise UserError("no images given (files or folders)")
    if not args.no_detect:
        return _predict_photos(args, files)
    if args.annotate:
        raise UserError("--annotate draws detected faces; it cannot be used with --no-detect")
    failed = 0
    for r in Predictor(args.bundle).predict(files, batch_size=args.batch_size):
        failed += "error" in r
        if args.json:
            print(json.dumps(r))
        elif "error" in r:
            print(f"{r['file']}: error: {r['error']}")
        else:
            iv = f" (90%: {r['interval90'][0]:.0f}-{r['interval90'][1]:.0f})" if "interval90" in r else ""
            g = f", P(female) {r['female_prob']:.2f}" if "female_prob" in r else ""
            print(f"{r['file']}: age {r['age']:.1f}{iv}{g}")
    return 1 if failed else 0


def cmd_tune(args: argparse.Namespace) -> int:
    from search.sweep import resume_sweep, run_sweep

    if args.resume:
        if args.spec or args.overrides or args.only:
            raise UserError("--resume DIR continues a sweep as it was started; give no SPEC, overrides or --only")
        out, result = args.resume, resume_sweep(args.resume)
    else:
        if not args.spec or not args.out:
            raise UserError("give a sweep SPEC and --out DIR (or --resume DIR)")
        out, result = args.out, run_sweep(args.spec, out_dir(args.out), args.overrides, args.only)
    keys = list(result["best_params"] or {})
    print(f"{'trial':<13} {'status':<10} {'best MAE':>8} {'epochs':>6}  " + "  ".join(keys))
    for r in result["trials"]:
        mae = f"{r['best_val_mae']:.3f}" if r["best_val_mae"] is not None else "-"
        print(f"{r['trial_id'] or '?':<13} {r['status']:<10} {mae:>8} {r['epochs']:>6}  "
              + "  ".join(str(r.get(k)) for k in keys))
    if result["best_trial"]:
        print(f"best: {result['best_trial']} (validation MAE {result['best_val_mae']:.3f}) -> {out / 'best.yaml'}")
    print(f"wrote {out / 'results.csv'}, {out / 'results.json'}, {out / 'val_mae.png'}")
    return 0 if result["best_trial"] else 1


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from cluster.ray_session import start_ray
    from serving.service import Limits, build_app

    if not (args.bundle / "model.onnx").exists():
        raise UserError(f"{args.bundle}: no model.onnx (make one with `agescale export RUN --out BUNDLE`)")
    limits = Limits(max_upload_bytes=args.max_upload_mb * 1024 * 1024, max_pixels=args.max_pixels,
                    request_timeout_s=args.timeout_s, max_batch_size=args.max_batch_size,
                    batch_wait_ms=args.batch_wait_ms, threads=args.threads,
                    spin=args.ort_spinning == "on")
    start_ray(args.address, num_cpus=None)
    from ray import serve

    serve.start(http_options={"host": args.host, "port": args.port}, logging_config={"log_level": "WARNING"})
    app = build_app(args.bundle.resolve(), limits, args.replicas, args.cpus_per_replica)
    serve.run(app, name="agescale", route_prefix="/")
    print(f"serving {args.bundle} on http://{args.host}:{args.port}/ ({args.replicas} replica(s), batches of up to "
          f"{args.max_batch_size} requests, {args.batch_wait_ms} ms wait); Ctrl-C stops", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    return 0


def cmd_slurm(args: argparse.Namespace) -> int:
    from cluster.slurm_job import JobSpec, submit, write

    spec = JobSpec(config=args.config, overrides=args.overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                   nproc_per_node=args.nproc_per_node, cpus_per_task=args.cpus_per_task, time=args.time,
                   partition=args.partition, max_restarts=args.max_restarts, max_requeues=args.max_requeues,
                   signal_lead=args.signal_lead, job_name=args.job_name)
    script, run_dir = write(spec, args.out and out_file(args.out))
    print(f"wrote {script} (run directory {run_dir}, logs in {run_dir / 'slurm'})")
    if args.submit:
        job = submit(script)
        print(f"submitted job {job}")
    else:
        print(f"submit with: sbatch {script}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from trainer.config import FAMILY_ARGS
    from trainer.methods import list_methods

    print("age methods (model.method, options in model.method_args):")
    for m in list_methods():
        print(f"  {m.name:<14} {m.summary}")
    print("model families (model.architecture, options in model.model_args):")
    for name, args_cls in FAMILY_ARGS.items():
        options = ", ".join(f"{k}={f.default}" for k, f in args_cls.model_fields.items()) or "none"
        print(f"  {name:<14} {' '.join((args_cls.__doc__ or '').split())} Options: {options}.")
    return 0


# ---------------------------------------------------------------- bench

def cmd_bench_shard(args: argparse.Namespace) -> int:
    from bench.shard import run, run_synthetic

    if args.synthetic is not None:
        return _emit(run_synthetic(args.synthetic, workers=args.workers), args.out)
    return _emit(run(args.src, workers=args.workers, rounds=args.rounds), args.out)


def cmd_bench_loader(args: argparse.Namespace) -> int:
    from bench.loader import run

    return _emit(run(args.src, shards=args.shards, images=args.images, rounds=args.rounds, gpu=args.gpu), args.out)


def cmd_bench_train(args: argparse.Namespace) -> int:
    from bench.train import run

    return _emit(run(image_size=args.image_size, batch=args.batch, steps=args.steps, rounds=args.rounds,
                     compiled=args.compiled, autocast=args.autocast), args.out)


def _predict_photos(args: argparse.Namespace, files: list[Path]) -> int:
    from serving.photo import PhotoPredictor

    predictor = PhotoPredictor(args.bundle)
    if args.annotate:
        out_dir(args.annotate, "--annotate").mkdir(parents=True, exist_ok=True)
    failed = 0
    for r in predictor.predict(files, annotate_dir=args.annotate):
        failed += "error" in r
        if args.json:
            print(json.dumps(r))
        elif "error" in r:
            print(f"{r['file']}: error: {r['error']}")
        elif not r["faces"]:
            print(f"{r['file']}: {r['note']}")
        else:
            for i, f in enumerate(r["faces"]):
                iv = f" (90%: {f['interval90'][0]:.0f}-{f['interval90'][1]:.0f})" if "interval90" in f else ""
                sex = f"  P(female) {f['female_prob']:.2f}" if "female_prob" in f else ""
                box = ",".join(f"{v:.0f}" for v in f["box"])
                print(f"{r['file']} face {i + 1} [{box}] score {f['detection_score']:.2f}: age {f['age']:.1f}{iv}{sex}")
    return 1 if failed else 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from bench.serve import run

    return _emit(run(args.bundle, args.images, requests=args.requests, rounds=args.rounds, soak_s=args.soak_s,
                     payload=args.payload, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                     port=args.port, threads=args.threads, model_seconds=args.model_seconds,
                     spin=args.ort_spinning == "on"),
                 args.out)


def cmd_bench_detect(args: argparse.Namespace) -> int:
    from bench.photos import run_bench

    return _emit(run_bench(args.bundle, args.images, n_photos=args.photos, n_crops=args.crops), args.out)


def cmd_bench_predict(args: argparse.Namespace) -> int:
    from bench.predict import run

    return _emit(run(args.bundle, args.images), args.out)


def _emit(result: dict, out: Path | None) -> int:
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        out_file(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return 0


def _float_at_least(text: str, low: float, strict: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value == value or value in (float("inf"), float("-inf")) or value < low or (strict and value == low):
        raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}, got {text}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _float_at_least(text, 0.0, strict=True)


def _non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _float_at_least(text, 0.0, strict=False)


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse prints the one-line error and exits 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agescale", description="Facial age estimation: data, training, serving.")
    parser.add_argument("--version", action="version", version=f"agescale {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("shard", help="convert face-age datasets into WebDataset shards",
                       description="Read datasets, decode-check every image, split deterministically and write "
                                   "OUT/<split>/*.tar with DALI index files and OUT/manifest.json.")
    p.add_argument("--dataset", action="append", required=True, metavar="NAME",
                   help="dataset format (see `agescale datasets`); repeat with --src to combine datasets")
    p.add_argument("--src", action="append", required=True, type=Path, metavar="PATH",
                   help="dataset folder (or CSV file for --dataset csv)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--splits", help="split ratios, e.g. train=0.8,val=0.1,test=0.1 or test=1")
    p.add_argument("--seed", type=int, help="split and shuffle seed")
    p.add_argument("--max-side", type=int, help="shrink images whose longer side is above this (re-encodes JPEG)")
    p.add_argument("--workers", type=int, help="decode-check processes (default: all cores)")
    p.add_argument("--executor", choices=["local", "ray"],
                   help="local: a process pool (default); ray: one Ray task per shard, on the cluster at "
                        "data.shard.ray_address or a private local instance (= data.shard.executor)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="replace an earlier shard set in OUT")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run into OUT: shards already written whose record and sha256 "
                        "check out are kept, the rest written")
    _add_config_args(p)
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("verify", help="check shards and index files against the manifest",
                       description="Re-read every shard and DALI index in DIR against DIR/manifest.json; "
                                   "exit 1 naming each missing, truncated or altered file.")
    p.add_argument("dir", type=Path, help="shard directory written by `agescale shard`")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("datasets", help="list dataset formats", description="List the registered dataset adapters.")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("train", help="train a model (one process, or distributed under torchrun / SLURM)",
                       description="Train with DeepSpeed as CONFIG says. Under torchrun or srun it runs distributed "
                                   "(gloo on CPU, nccl on GPU). SIGTERM/SIGUSR1 save a checkpoint and exit with "
                                   "code 75; --resume continues from the latest checkpoint.")
    p.add_argument("config", type=Path, help="YAML run config, e.g. configs/experiments/utkface_cpu.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. train.epochs=3")
    p.add_argument("--resume", action="store_true", help="continue from run_dir/checkpoints/LATEST if present")
    p.add_argument("--overwrite", action="store_true",
                   help="run_dir holds an earlier run: delete its files (config, metrics, checkpoints, best/, ...) "
                        "and start afresh (without this or --resume, such a run_dir is refused)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluation report (metrics, plots) of a run, a checkpoint or an ensemble",
                       description="Evaluate one model, or several as an ensemble, on a shard split; writes "
                                   "report.json, report.md and plots/*.png.")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_OR_CHECKPOINT",
                   help="run directory, best/model.safetensors or checkpoints/stepN; several = an ensemble")
    p.add_argument("--data", required=True, type=Path, help="SHARDS/<split>, e.g. runs/shards/utk/test")
    p.add_argument("--out", type=Path, help="report folder (default: RUN/eval-<split>)")
    p.add_argument("--tta", choices=("none", "hflip", "hflip_zoom"),
                   help="test-time augmentation (default: the run's model.tta)")
    p.add_argument("--calibrate-on", type=Path, metavar="SHARDS/SPLIT",
                   help="fit the 90%% interval on this split first (default: the run's calibration.json; "
                        "use it for ensembles)")
    p.add_argument("--image-size", type=_positive_int, metavar="PX",
                   help="evaluate at this size instead of the run's (ResNet backbones; FixRes-style test size)")
    p.add_argument("--crop-pct", type=_positive_float, metavar="P",
                   help="centre crop P of the image, 0 < P <= 1 (default: the run's data.loader.eval_crop_pct)")
    p.add_argument("--decode", choices=("mean", "median"),
                   help="report the mean or the median of each model's age distribution (default: the run's "
                        "model.decode; the median minimises the expected absolute error)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="serving bundle: safetensors, ONNX, preprocessing, labels, model card",
                       description="Write a bundle that a serving system loads with ONNX Runtime alone.")
    p.add_argument("run", type=Path, metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--out", required=True, type=Path, help="bundle folder")
    p.add_argument("--tta", choices=("none", "hflip", "hflip_zoom"),
                   help="test-time augmentation inside model.onnx (default: the run's model.tta)")
    p.add_argument("--calibrate-on", type=Path, metavar="SHARDS/SPLIT",
                   help="fit the 90%% interval on this split for the exported TTA (default: the run's "
                        "calibration.json, which applies only to the TTA it was fitted with)")
    p.add_argument("--format", choices=("bundle", "triton"), default="bundle",
                   help="bundle (default; for predict and serve) or a Triton model repository "
                        "(OUT/agescale/config.pbtxt + 1/model.onnx)")
    p.add_argument("--max-batch-size", type=_positive_int, default=64, help="triton: max_batch_size")
    p.add_argument("--no-detector", action="store_true", help="leave the face detector out of the bundle")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="predict age, 90%% interval and gender from images with a bundle",
                       description="Uses ONNX Runtime, NumPy and Pillow only. Finds every face in each photo "
                                   "(MTCNN from the bundle), aligns it like the training crops and predicts; "
                                   "--no-detect takes pre-aligned face crops and resizes them as preprocess.json says.")
    p.add_argument("bundle", type=Path)
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE_OR_DIR")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--batch-size", type=_positive_int, default=32,
                   help="--no-detect: images per ONNX Runtime call")
    p.add_argument("--no-detect", action="store_true",
                   help="the images are aligned face crops (UTKFace-style): no detection, one result per image")
    p.add_argument("--annotate", type=Path, metavar="OUT_DIR",
                   help="write each photo with boxes, landmarks and labels drawn to OUT_DIR")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("tune", help="Ray Tune sweep over losses, augmentation and optimizer settings",
                       description="Each trial is a real training run (ASHA by default, PBT or FIFO as the spec "
                                   "says). Writes OUT/results.csv, results.json, best.yaml (a config for "
                                   "`agescale train`) and val_mae.png. A sweep whose driver stopped continues "
                                   "with --resume OUT.")
    p.add_argument("spec", nargs="?", type=Path, help="sweep spec YAML, e.g. configs/tune/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides of the base run config, e.g. data.loader.shards=runs/shards")
    p.add_argument("--out", type=Path, help="sweep folder")
    p.add_argument("--resume", type=Path, metavar="OUT", help="continue the sweep in OUT")
    p.add_argument("--only", metavar="NAME[,NAME]", type=lambda s: [n for n in s.split(",") if n],
                   help="run only these of the spec's variants (e.g. one row of the methods table)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("serve", help="HTTP service on Ray Serve: POST /predict with a photo",
                       description="A Ray Serve deployment with a FastAPI ingress: POST /predict (multipart field "
                                   "'file' or a raw image body) returns the JSON of `predict --json`; GET /healthz, "
                                   "/readyz, /metadata, /stats and an upload page at /. Faces of concurrent requests "
                                   "share ONNX Runtime calls (@serve.batch).")
    p.add_argument("bundle", type=Path)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_positive_int, default=8000)
    p.add_argument("--replicas", type=_positive_int, default=1)
    p.add_argument("--cpus-per-replica", type=_positive_float, default=1.0)
    p.add_argument("--threads", type=_positive_int, help="ONNX Runtime threads per replica (default: its own)")
    p.add_argument("--ort-spinning", choices=("on", "off"), default="on",
                   help="ONNX Runtime threads busy-wait between calls (ONNX Runtime's default); off leaves "
                        "the cores to the HTTP stack between model calls")
    p.add_argument("--max-batch-size", type=_positive_int, default=32,
                   help="requests per model call (1 turns dynamic batching off)")
    p.add_argument("--batch-wait-ms", type=_positive_float, default=10.0, help="how long a batch waits to fill")
    p.add_argument("--max-upload-mb", type=_positive_int, default=10)
    p.add_argument("--max-pixels", type=_positive_int, default=40_000_000)
    p.add_argument("--timeout-s", type=_positive_float, default=30.0, help="per-request limit (408 past it)")
    p.add_argument("--address", help="join a running Ray cluster ('auto' or host:port) instead of a local one")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("slurm", help="write (and submit) an sbatch script: srun x torchrun per node",
                       description="An sbatch script for CONFIG: one srun task per node running torchrun with a "
                                   "c10d rendezvous on the first node, --max-restarts for failed workers, "
                                   "SIGTERM before the time limit (checkpoint, then requeue and resume), "
                                   "per-node logs in RUN_DIR/slurm/. nccl with --gpus-per-node > 0, else gloo.")
    p.add_argument("config", type=Path, help="YAML run config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, baked into the script")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU nodes (gloo); >0: GPU nodes (nccl)")
    p.add_argument("--nproc-per-node", type=int, help="trainer processes per node (default: one per GPU, or 1)")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per node task (default: nproc on CPU nodes)")
    p.add_argument("--time", help="time limit, e.g. 04:00:00")
    p.add_argument("--partition")
    p.add_argument("--job-name")
    p.add_argument("--max-restarts", type=int, default=1, help="torchrun restarts after a worker fails")
    p.add_argument("--max-requeues", type=int, default=5, help="requeues after a SIGTERM checkpoint")
    p.add_argument("--signal-lead", type=int, default=120, help="seconds before the time limit to send SIGTERM")
    p.add_argument("--out", type=Path, help="script path (default: RUN_DIR/slurm/job.sbatch)")
    p.add_argument("--submit", action="store_true", help="also submit it with sbatch")
    p.set_defaults(func=cmd_slurm)

    p = sub.add_parser("methods", help="list age methods (model.method) and model families (model.architecture)",
                       description="List the registered age-estimation methods, selected by model.method, and "
                                   "the model families, selected by model.architecture.")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("bench", help="benchmarks (JSON with ratio and target)",
                       description="Benchmarks; each prints JSON whose `ratio` is compared with `target`.")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="NAME")
    b = bsub.add_parser("shard", help="sharding throughput vs a bare decode of the same JPEGs",
                        description="Images/s of `agescale shard` against a bare PIL decode with the same number of "
                                    "processes, and `tar cf` of the same files.")
    b.add_argument("--src", type=Path, default=Path("../shared/data/utkface"), help="folder of UTKFace JPEGs")
    b.add_argument("--synthetic", type=int, metavar="N",
                   help="instead: generate N UTKFace-like JPEGs in a temporary folder and report images/s at 20k, "
                        "50k and N, the driver's peak RSS and the loader's start-up on the result")
    b.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported (default 5)")
    b.add_argument("--workers", type=int, help="processes for both (default: all cores)")
    b.add_argument("--out", type=Path, help="also write the JSON here")
    b.set_defaults(func=cmd_bench_shard)
    b = bsub.add_parser("loader", help="loader images/s: DALI-CPU vs torch, 112/224 px, with and without augmentation",
                        description="Shards the shared images (unless --shards is given) and measures every loader "
                                    "backend in one run.")
    b.add_argument("--src", type=Path, default=Path("../shared/data/utkface"), help="folder of UTKFace JPEGs")
    b.add_argument("--shards", type=Path, help="use this shard directory instead of sharding --src")
    b.add_argument("--images", type=int, default=2400, help="images timed per measurement")
    b.add_argument("--rounds", type=int, default=3, help="measurements per configuration, interleaved; the median "
                                                         "is reported")
    b.add_argument("--gpu", action="store_true", help="add the GPU rows: DALI mixed decode + its augmentation "
                                                      "operators on CUDA (needs a GPU)")
    b.add_argument("--out", type=Path, help="also write the JSON here")
    b.set_defaults(func=cmd_bench_loader)
    b = bsub.add_parser("train", help="trainer step time vs a bare PyTorch loop (synthetic data)",
                        description="Same model, batch and threads: the DeepSpeed trainer against a bare "
                                    "forward/backward/AdamW loop, in one run.")
    b.add_argument("--image-size", type=int, default=64)
    b.add_argument("--batch", type=int, default=32)
    b.add_argument("--steps", type=int, default=40, help="timed steps of each (after 10 warm-up steps)")
    b.add_argument("--rounds", type=int, default=3, help="measurements of each, interleaved; medians compared")
    b.add_argument("--compiled", action="store_true", help="also the torch.compile rows (compiles ~1 min each)")
    b.add_argument("--autocast", action="store_true", help="also the bf16 autocast rows (train.precision="
                   "bf16_autocast; fast on CPUs with AVX512-BF16 or AMX)")
    b.add_argument("--out", type=Path, help="also write the JSON here")
    b.set_defaults(func=cmd_bench_train)
    b = bsub.add_parser("predict", help="ONNX Runtime vs torch eager images/s at batch 1 and 32",
                        description="Serving throughput of a bundle: ONNX Runtime against the same model in torch "
                                    "eager mode, on the same preprocessed images, in one run.")
    b.add_argument("bundle", type=Path)
    b.add_argument("--images", type=Path, default=Path("data/sample/utkface"), help="folder with >= 32 images")
    b.add_argument("--out", type=Path, help="also write the JSON here")
    b.set_defaults(func=cmd_bench_predict)
    b = bsub.add_parser("detect", help="detection recall and age agreement on photos composited from crops",
                        description="Composites 1-4 face crops at random positions and sizes onto larger textured "
                                    "backgrounds; reports detection recall/precision at IoU >= 0.5 and |age from the "
                                    "detected, aligned face - age from the crop itself|; then the same |Δage| for "
                                    "crops padded onto a grey canvas.")
    b.add_argument("bundle", type=Path)
    b.add_argument("--images", type=Path, default=Path("data/sample/utkface"), help="aligned face crops")
    b.add_argument("--photos", type=_positive_int, default=200)
    b.add_argument("--crops", type=_positive_int, default=500)
    b.add_argument("--out", type=Path, help="also write the JSON here")
    b.set_defaults(func=cmd_bench_detect)
    b = bsub.add_parser("serve", help="the HTTP service under locust load: batching on vs off, then a soak",
                        description="Starts the bundle on Ray Serve twice (dynamic batching on and off), drives "
                                    "each with locust (headless) at concurrency 1, 8 and 32 on loopback, interleaved "
                                    "rounds, medians; then a soak with 1%% corrupt uploads. ratio = throughput "
                                    "with batching / without at concurrency 32 (target 1.5).")
    b.add_argument("bundle", type=Path)
    b.add_argument("--images", type=Path, default=Path("data/sample/utkface"), help="face crops for the payloads")
    b.add_argument("--payload", choices=("crop", "photo"), default="crop",
                   help="crop: aligned crops (?detect=false); photo: composited photos with 1-4 faces (detection on)")
    b.add_argument("--requests", type=_positive_int, default=400, help="requests per locust run")
    b.add_argument("--rounds", type=_positive_int, default=2)
    b.add_argument("--soak-s", type=_non_negative_float, default=120.0, help="soak length (0 skips it)")
    b.add_argument("--max-batch-size", type=_positive_int, default=32)
    b.add_argument("--batch-wait-ms", type=_positive_float, default=10.0)
    b.add_argument("--port", type=_positive_int, default=8765)
    b.add_argument("--threads", type=_positive_int, help="ONNX Runtime threads per replica (default: its own)")
    b.add_argument("--ort-spinning", choices=("on", "off"), default="on",
                   help="ONNX Runtime threads busy-wait between calls (as `serve --ort-spinning`)")
    b.add_argument("--model-seconds", type=_positive_float, default=3.0,
                   help="length of each timing of the model alone (batch 1 and full batch, 2 rounds)")
    b.add_argument("--out", type=Path, help="also write the JSON here")
    b.set_defaults(func=cmd_bench_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options too (`agescale slurm CFG --nodes 2 train.epochs=3`): argparse
    # leaves KEY=VALUE words after an option unparsed, so they are collected here.
    args, rest = parser.parse_known_args(argv)
    if rest:
        if not hasattr(args, "overrides") or any(w.startswith("-") or "=" not in w for w in rest):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = [*args.overrides, *rest]
    try:
        if args.func.__name__.startswith("cmd_bench") and args.out:
            out_file(args.out)  # before the benchmark runs, not after
        return args.func(args)
    except UserError as e:
        print(f"agescale: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("agescale: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
