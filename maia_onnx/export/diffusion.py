"""diffusers directories (hf:DIR with model_index.json, or one component's config.json with ``_class_name``) -> one
ONNX graph per component: UNet2DConditionModel (sample, timestep, encoder_hidden_states), AutoencoderKL (decoder
and encoder) and the transformers text encoder(s)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

from maia_onnx.errors import UnsupportedModelError, UserError
from maia_onnx.export.parts import export_parts
from maia_onnx.export.core import ExportResult, export_spec, log
from maia_onnx.extras import require
from maia_onnx.hf import build_hf_spec
from maia_onnx.models.registry import ModelSpec

_TEXT_ENCODERS = {"CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel"}
_SUPPORTED = ("UNet2DConditionModel", "AutoencoderKL")


def _load(cls_name: str, path: Path):
    diffusers = require("diffusers", "diffusers", f"exporting the diffusers {cls_name} in {path}")
    from diffusers.models.attention_processor import AttnProcessor

    if not (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
        raise UserError(f"no weights (*.safetensors or *.bin) in {path}: save the component with save_pretrained")
    try:
        model = getattr(diffusers, cls_name).from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise UnsupportedModelError(f"diffusers cannot load {cls_name} from {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    model = model.float().eval()
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor(AttnProcessor())  # explicit MatMul/Softmax attention (no fused SDPA op)
    return model


def unet_spec(unet, name: str, seed: int = 0, dims: Mapping[str, int] | None = None):
    """UNet2DConditionModel -> spec: sample [batch, C, H, W], timestep [batch] (float), encoder_hidden_states [batch, seq, D]."""
    import torch
    from torch.export import Dim

    dims = dict(dims or {})
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    batch, height, width, seq = dims.get("batch", 2), dims.get("height", size), dims.get("width", size), dims.get("seq", 7)

    class UNetSample(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    gen = torch.Generator().manual_seed(seed + 1)
    inputs = {
        "sample": torch.randn(batch, int(cfg.in_channels), height, width, generator=gen),
        "timestep": torch.rand(batch, generator=gen) * 999.0,
        "encoder_hidden_states": torch.randn(batch, seq, int(cfg.cross_attention_dim), generator=gen),
    }
    d_batch, d_seq = Dim("batch"), Dim("seq")
    meta = {"family": "unet2d-condition", "model": name, "in_channels": int(cfg.in_channels), "height": height,
            "width": width, "cross_attention_dim": int(cfg.cross_attention_dim), "diffusers_class": "UNet2DConditionModel"}
    return ModelSpec(name=name, module=UNetSample(unet).eval(), example_inputs=inputs, input_names=list(inputs),
                     output_names=["out_sample"], dynamic_shapes=({0: d_batch}, {0: d_batch}, {0: d_batch, 1: d_seq}),
                     config=meta, param_prefix="model.")


def vae_specs(vae, name: str, seed: int = 0, dims: Mapping[str, int] | None = None) -> dict:
    """AutoencoderKL -> {"decoder": latent_sample -> sample, "encoder": sample -> latent_mean, latent_logvar} specs.

    The encoder returns the latent distribution's mean and log-variance (not a random sample), so it is deterministic;
    neither graph applies the pipeline's scaling_factor (kept in the metadata).
    """
    import torch
    from torch.export import Dim

    dims = dict(dims or {})
    cfg = vae.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    height, width, batch = dims.get("height", size), dims.get("width", size), dims.get("batch", 2)
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if height % factor or width % factor:
        raise UserError(f"--dim height/width must be multiples of the VAE's downscale factor {factor} (got {height}x{width})")

    class VaeDecoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, latent_sample):
            return self.model.decode(latent_sample, return_dict=False)[0]

    class VaeEncoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, sample):
            dist = self.model.encode(sample, return_dict=False)[0]
            return dist.mean, dist.logvar

    gen = torch.Generator().manual_seed(seed + 1)
    meta = {"family": "autoencoder-kl", "model": name, "latent_channels": int(cfg.latent_channels), "height": height,
            "width": width, "downscale": factor, "scaling_factor": float(getattr(cfg, "scaling_factor", 1.0)),
            "diffusers_class": "AutoencoderKL"}
    d_batch = Dim("batch")
    latent = torch.randn(batch, int(cfg.latent_channels), height // factor, width // factor, generator=gen)
    image = torch.randn(batch, int(cfg.in_channels), height, width, generator=gen)
    return {
        "decoder": ModelSpec(name=f"{name}:decoder", module=VaeDecoder(vae).eval(), example_inputs={"latent_sample": latent},
                             input_names=["latent_sample"], output_names=["sample"], dynamic_shapes=({0: d_batch},),
                             config={**meta, "graph": "vae_decoder"}, param_prefix="model."),
        "encoder": ModelSpec(name=f"{name}:encoder", module=VaeEncoder(vae).eval(), example_inputs={"sample": image},
                             input_names=["sample"], output_names=["latent_mean", "latent_logvar"],
                             dynamic_shapes=({0: d_batch},), config={**meta, "graph": "vae_encoder"}, param_prefix="model."),
    }


def _component_parts(cls_name: str, path: Path, prefix: str, seed: int, dims) -> list[tuple[str, Callable]]:
    """(file name, spec builder) for one diffusers component directory; builders load lazily, one component at a time."""
    if cls_name == "UNet2DConditionModel":
        return [(f"{prefix}.onnx", lambda: unet_spec(_load(cls_name, path), f"{path.name}", seed, dims))]
    if cls_name == "AutoencoderKL":
        loaded: dict = {}

        def spec(which):
            if "specs" not in loaded:
                loaded["specs"] = vae_specs(_load(cls_name, path), path.name, seed, dims)
            return loaded["specs"].pop(which)  # drop our reference: the exporter releases each graph's module

        return [(f"{prefix}_decoder.onnx", lambda: spec("decoder")), (f"{prefix}_encoder.onnx", lambda: spec("encoder"))]
    if cls_name in _TEXT_ENCODERS:
        return [(f"{prefix}.onnx", lambda: build_hf_spec(str(path), seed=seed, dims={"batch": (dims or {}).get("batch", 2)}))]
    raise UnsupportedModelError(
        f"diffusers component {cls_name} in {path} is not supported: export supports {', '.join(_SUPPORTED)} and "
        f"{', '.join(sorted(_TEXT_ENCODERS))} (or wrap the component in a package.module:factory)"
    )


def export_diffusers(path: Path, out_path, pipeline: bool, raw: dict, seed: int = 0, dims: Mapping[str, int] | None = None,
                     progress: Callable[[str], None] | None = None, **options) -> ExportResult:
    """A pipeline directory -> out_path/<component>.onnx for each supported component (vae -> vae_decoder/vae_encoder);
    a UNet component -> one file; an AutoencoderKL component -> out_path/vae_decoder.onnx + vae_encoder.onnx."""

    require("diffusers", "diffusers", f"exporting the diffusers directory {path}")
    if not pipeline:
        cls_name = raw["_class_name"]
        if cls_name == "UNet2DConditionModel":
            log(progress, f"loading diffusers UNet2DConditionModel from {path}")
            spec = unet_spec(_load(cls_name, path), f"hf:{path.name}", seed, dims)
            return export_spec(spec, out_path, source=f"hf:{path}", progress=progress, release_module=True, **options)
        return export_parts(f"hf:{path}", _component_parts(cls_name, path, "vae" if cls_name == "AutoencoderKL" else path.name, seed, dims),
                            out_path, progress=progress, release_modules=True, **options)
    parts: list = []
    skipped = []
    for component, entry in raw.items():
        if component.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or not entry[1]:
            continue
        cls_name = entry[1]
        if cls_name not in _SUPPORTED and cls_name not in _TEXT_ENCODERS:
            skipped.append(component)  # tokenizers, schedulers, feature extractors: not neural networks to export
            continue
        sub = path / component
        if not (sub / "config.json").is_file():
            raise UserError(f"model_index.json lists {component} ({cls_name}) but {sub}/config.json is missing: the pipeline directory is incomplete")
        parts += _component_parts(cls_name, sub, component, seed, dims)
    if not parts:
        raise UnsupportedModelError(f"the pipeline in {path} has no exportable component ({', '.join(_SUPPORTED)} or a text encoder)")
    log(progress, f"diffusers pipeline {raw.get('_class_name', '?')}: exporting {', '.join(f for f, _ in parts)}"
        + (f" (not exported: {', '.join(skipped)})" if skipped else ""))
    result = export_parts(f"hf:{path}", parts, out_path, progress=progress, release_modules=True, **options)
    result.config.update(pipeline=raw.get("_class_name"), not_exported=skipped)
    return result
