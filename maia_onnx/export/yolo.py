"""Ultralytics detectors (ultralytics:yolov8n.yaml built from the package's own model yamls, or ultralytics:PATH.pt)
-> ModelSpec with the detection head in export mode (one [batch, 4 + classes, anchors] tensor, as Ultralytics exports it).
Nothing is downloaded: a yaml builds seeded random weights, a .pt must be a local file."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

from maia_onnx.errors import UnsupportedModelError, UserError
from maia_onnx.export.core import log
from maia_onnx.extras import require
from maia_onnx.models.registry import ModelSpec


def _build(ref: str, seed: int):
    import torch

    path = Path(ref).expanduser()
    if ref.endswith((".yaml", ".yml")):
        from ultralytics.nn.tasks import DetectionModel

        torch.manual_seed(seed)
        try:
            # a bare name (yolov8n.yaml) resolves to the yaml shipped inside the ultralytics package; the scale
            # letter (n/s/m/l/x) picks the width/depth multipliers
            return DetectionModel(str(path) if path.is_file() else ref, verbose=False)
        except FileNotFoundError as exc:
            raise UserError(f"ultralytics has no model yaml {ref!r}: use a name such as yolov8n.yaml or yolo11n.yaml, or a path to a .yaml") from exc
        except Exception as exc:
            raise UnsupportedModelError(f"ultralytics cannot build {ref!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    if ref.endswith(".pt"):
        if not path.is_file():
            raise UserError(f"ultralytics checkpoint {path} does not exist: pass a local .pt file (nothing is downloaded)")
        try:
            # Ultralytics checkpoints pickle the nn.Module itself ({"model": DetectionModel, "ema": ...})
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise UserError(f"cannot read ultralytics checkpoint {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
        model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else ckpt
        if not isinstance(model, torch.nn.Module):
            raise UserError(f"{path} holds no ultralytics model (expected a checkpoint dict with 'model'): save it with YOLO(...).save or torch.save({{'model': model}})")
        return model
    raise UserError(f"ultralytics:{ref} must name a model yaml (yolov8n.yaml) or a local checkpoint (PATH.pt)")


def build_ultralytics_spec(ref: str, seed: int = 0, dims: Mapping[str, int] | None = None,
                           progress: Callable[[str], None] | None = None):
    """ultralytics:REF -> ModelSpec: images [batch, 3, imgsz, imgsz] -> output0 [batch, 4 + classes, anchors]."""
    torch = require("torch", "export", f"exporting ultralytics:{ref}")
    require("ultralytics", "ultralytics", f"exporting ultralytics:{ref}")
    from torch.export import Dim
    from ultralytics.nn.modules.head import Detect

    dims = dict(dims or {})
    log(progress, f"building ultralytics {ref}")
    model = _build(ref, seed).float().eval()
    stride = int(max(model.stride)) if hasattr(model, "stride") else 32
    imgsz = dims.get("imgsz", dims.get("height", 64))
    if imgsz % stride:
        raise UserError(f"--dim imgsz={imgsz} must be a multiple of the model's stride {stride}")
    if hasattr(model, "fuse"):
        model = model.fuse(verbose=False)  # Conv+BN folded, as Ultralytics' own ONNX export does
    heads = [m for m in model.modules() if isinstance(m, Detect)]
    if not heads:
        raise UnsupportedModelError(f"ultralytics:{ref} has no Detect head: only detection models are supported")
    for m in heads:
        # export mode: one concatenated (boxes, class scores) tensor, anchors recomputed for every input shape
        m.export, m.format, m.dynamic = True, "onnx", True
    gen = torch.Generator().manual_seed(seed + 1)
    batch = dims.get("batch", 2)
    images = torch.rand(batch, 3, imgsz, imgsz, generator=gen)  # images are in [0, 1] after Ultralytics' preprocessing
    names = getattr(model, "names", None) or {}
    meta = {"model": f"ultralytics:{Path(ref).name}", "family": "ultralytics-detect", "imgsz": imgsz, "stride": stride,
            "num_classes": int(heads[-1].nc), "output_layout": "batch,4+classes,anchors (xywh, class scores)"}
    if isinstance(names, dict) and names:
        meta["class_names"] = [names[k] for k in sorted(names)]

    class Detector(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, images):
            out = self.model(images)
            return out[0] if isinstance(out, (tuple, list)) else out

    return ModelSpec(name=f"ultralytics:{ref}", module=Detector(model).eval(), example_inputs={"images": images},
                     input_names=["images"], output_names=["output0"], dynamic_shapes=({0: Dim("batch")},),
                     config=meta, param_prefix="model.")
