"""`agescale export RUN --out DIR --format triton`: a Triton Inference Server model repository.

    DIR/<name>/config.pbtxt     platform onnxruntime_onnx, max_batch_size, dims, dynamic_batching
    DIR/<name>/1/model.onnx     the bundle's graph (decoding rule and TTA inside)
    DIR/<name>/preprocess.json, labels.json   what a client does before and after (Triton ignores them)

The dims are read from the ONNX graph itself, without its batch axis; an output whose only axis is
the batch (`age`, `gender_prob`) is declared `dims: [ 1 ]` with `reshape: { shape: [ ] }`, Triton's
convention for per-sample scalars.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx

from base.errors import UserError

TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64",
         onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.INT32: "TYPE_INT32"}


def graph_tensors(model_path: Path) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs): name, Triton data type and dims without the leading batch axis."""
    graph = onnx.load(str(model_path), load_external_data=False).graph

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            if t.elem_type not in TYPES:
                raise UserError(f"{model_path}: tensor {v.name!r} has ONNX type "
                                f"{onnx.TensorProto.DataType.Name(t.elem_type)}, which this exporter does not map")
            out.append({"name": v.name, "data_type": TYPES[t.elem_type], "dims": dims[1:]})
        return out

    return describe(graph.input), describe(graph.output)


def _tensor_block(kind: str, tensors: list[dict]) -> str:
    items = []
    for t in tensors:
        dims = t["dims"] or [1]
        reshape = "\n    reshape: { shape: [ ] }" if not t["dims"] else ""
        items.append(f'  {{\n    name: "{t["name"]}"\n    data_type: {t["data_type"]}\n'
                     f'    dims: [ {", ".join(str(d) for d in dims)} ]{reshape}\n  }}')
    return f"{kind} [\n" + ",\n".join(items) + "\n]"


def config_pbtxt(name: str, model_path: Path, max_batch_size: int, max_queue_delay_us: int) -> str:
    inputs, outputs = graph_tensors(model_path)
    return "\n".join([
        f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch_size}",
        _tensor_block("input", inputs), _tensor_block("output", outputs),
        "dynamic_batching {", f"  max_queue_delay_microseconds: {max_queue_delay_us}", "}",
        ""])  # no instance_group: Triton puts one instance on each GPU it has, else on the CPU


def write_repository(bundle: Path, out: Path, name: str = "agescale", max_batch_size: int = 64,
                     max_queue_delay_us: int = 2000) -> Path:
    model_dir = out / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundle / "model.onnx", model_dir / "1" / "model.onnx")
    for extra in ("preprocess.json", "labels.json", "card.md"):
        if (bundle / extra).exists():
            shutil.copyfile(bundle / extra, model_dir / extra)
    (model_dir / "config.pbtxt").write_text(config_pbtxt(name, bundle / "model.onnx", max_batch_size,
                                                         max_queue_delay_us))
    return model_dir
