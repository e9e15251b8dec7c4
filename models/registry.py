"""Registry of built-in reference models: name + size -> ModelSpec (module, example inputs, I/O names, dynamic shapes, config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from maia_onnx.errors import InvalidOptionError, UserError


@dataclass
class ModelSpec:
    """Everything the exporter needs: an eval-mode module, inputs in forward() order and their ONNX names."""

    name: str
    module: Any  # torch.nn.Module
    example_inputs: dict  # ONNX input name -> torch tensor, in forward() argument order
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: Any = None  # torch.export dynamic_shapes for the positional arguments (None: static)
    config: dict = field(default_factory=dict)  # model metadata (family, num_layers, heads, ...), stored in ONNX metadata
    param_prefix: str = ""  # wrapper prefix stripped from initializer names (e.g. "model." around an HF model)
    by_name: bool = False  # example_inputs bind to forward() as keyword arguments (dynamic_shapes is then a dict)

    @property
    def args(self) -> tuple:
        return tuple(self.example_inputs.values())


def _build_llama(size: str, seed: int, dims: dict) -> ModelSpec:
    import torch

    from maia_onnx.models import llama

    cfg = llama.SIZES[size]
    # dims may also override config fields (num_layers=1, tie_word_embeddings=1, ...), cast to the field's type
    cfg = type(cfg)(**{**cfg.__dict__, **{k: type(cfg.__dict__[k])(v) for k, v in dims.items() if k in cfg.__dict__}})
    if size == "large":
        # skip torch's default init (slow at ~1 B parameters): allocate once, then fill with our seeded init
        with torch.device("meta"):
            module = llama.LlamaForCausalLM(cfg)
        module = module.to_empty(device="cpu").eval()
        module.reset_buffers()
        if cfg.tie_word_embeddings:
            module.lm_head.weight = module.model.embed_tokens.weight
    else:
        module = llama.LlamaForCausalLM(cfg).eval()
    llama.init_weights(module, seed)
    shape_dims = {k: dims[k] for k in ("batch", "seq", "past") if k in dims}
    return ModelSpec(
        name="llama-tiny",
        module=module,
        example_inputs=llama.example_inputs(cfg, seed=seed, **shape_dims),
        input_names=llama.input_names(cfg),
        output_names=llama.output_names(cfg),
        dynamic_shapes=llama.dynamic_shapes(cfg),
        config={**cfg.as_dict(), "size": size, "kv_cache_layout": "batch,kv_heads,past,head_dim"},
    )


def _build_batch_model(name: str, family, module_class, size: str, seed: int, dims: dict) -> ModelSpec:
    """A model without a KV cache (unet / yolo): the ``family`` module's SIZES, init_weights, inputs and names."""
    cfg = family.SIZES[size]
    module = module_class(cfg).eval()
    family.init_weights(module, seed)
    return ModelSpec(
        name=name,
        module=module,
        example_inputs=family.example_inputs(cfg, seed=seed, batch=dims.get("batch", 2)),
        input_names=family.INPUT_NAMES,
        output_names=family.OUTPUT_NAMES,
        dynamic_shapes=family.dynamic_shapes(),
        config={**cfg.as_dict(), "size": size},
    )


def _build_unet(size: str, seed: int, dims: dict) -> ModelSpec:
    from maia_onnx.models import unet

    return _build_batch_model("unet-tiny", unet, unet.UNet, size, seed, dims)


def _build_yolo(size: str, seed: int, dims: dict) -> ModelSpec:
    from maia_onnx.models import yolo

    return _build_batch_model("yolo-tiny", yolo, yolo.YoloTiny, size, seed, dims)


BUILDERS: dict[str, Callable[[str, int, dict], ModelSpec]] = {
    "llama-tiny": _build_llama,
    "unet-tiny": _build_unet,
    "yolo-tiny": _build_yolo,
}

# "llama-large" == llama-tiny at size="large"
ALIASES = {"llama": ("llama-tiny", None), "llama-large": ("llama-tiny", "large"), "unet": ("unet-tiny", None), "yolo": ("yolo-tiny", None)}

SIZE_NAMES = ("tiny", "large")


def names() -> list[str]:
    return list(BUILDERS)


def resolve_name(name: str, size: str | None = None) -> tuple[str, str]:
    """(canonical name, size) for a built-in name or alias; UserError listing the choices otherwise."""
    if name in ALIASES:
        canonical, alias_size = ALIASES[name]
        size = size or alias_size
        name = canonical
    if name not in BUILDERS:
        raise UserError(
            f"unknown built-in model {name!r}: choose one of {', '.join(BUILDERS)} "
            "(or pass package.module:factory or hf:DIR)"
        )
    size = size or "tiny"
    if size not in SIZE_NAMES:
        raise InvalidOptionError(f"unknown size {size!r} for {name}: choose one of {', '.join(SIZE_NAMES)}")
    return name, size


def build(name: str, size: str | None = None, seed: int = 0, dims: dict | None = None) -> ModelSpec:
    """Build a built-in model with seeded random weights (no downloads).

    ``dims`` overrides example-input sizes (batch, seq, past for llama; batch for unet/yolo) and,
    for llama, config fields (e.g. num_layers) for quick experiments.
    """
    import torch

    name, size = resolve_name(name, size)
    with torch.no_grad():
        spec = BUILDERS[name](size, seed, dict(dims or {}))
    spec.config.setdefault("model", name)
    return spec
