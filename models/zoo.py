"""Tiny seeded checkpoints of the architectures users bring from the Hugging Face Hub: dense and MoE decoders,
encoders (text and vision), encoder-decoders, diffusers components and a pipeline, written with ``save_pretrained``.

The test matrix (tests/zoo.py) and ``scripts/model_matrix.py`` (docs/model_support.md) build from this one list, so
both speak of the same models.  Needs the ``export`` extra (torch, transformers) and, for the diffusers entries,
the ``diffusers`` extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

VOCAB = 128


def _hf_decoder(cls: str, cfg_cls: str, **cfg):
    def build(directory: Path) -> None:
        import transformers

        config = getattr(transformers, cfg_cls)(**cfg)
        getattr(transformers, cls)(config).save_pretrained(directory)

    return build


_DENSE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def _t5(directory: Path) -> None:
    import transformers

    transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1)).save_pretrained(directory)


def _bart(directory: Path) -> None:
    import transformers

    transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
    )).save_pretrained(directory)


def _whisper(directory: Path) -> None:
    import transformers

    transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=None, begin_suppress_tokens=None)).save_pretrained(directory)


def _vit(directory: Path) -> None:
    import transformers

    transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
        patch_size=8, num_channels=3)).save_pretrained(directory)


def _bert(directory: Path) -> None:
    import transformers

    transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64)).save_pretrained(directory)


def _unet(directory: Path) -> None:
    import diffusers

    diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4).save_pretrained(directory)


def _vae(directory: Path) -> None:
    import diffusers

    diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
        sample_size=16).save_pretrained(directory)


def _pipeline(directory: Path) -> None:
    """A Stable-Diffusion-shaped pipeline directory: model_index.json + unet/, vae/, text_encoder/ (no tokenizer needed)."""
    import json

    import transformers

    _unet(directory / "unet")
    _vae(directory / "vae")
    transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, bos_token_id=1, eos_token_id=2)).save_pretrained(directory / "text_encoder")
    (directory / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": [None, None], "scheduler": [None, None]}))


# name -> (builder, extra module needed or None)
CHECKPOINTS: dict[str, tuple[Callable[[Path], None], str | None]] = {
    "llama": (_hf_decoder("LlamaForCausalLM", "LlamaConfig", **_DENSE), None),
    "qwen2": (_hf_decoder("Qwen2ForCausalLM", "Qwen2Config", **_DENSE), None),
    "qwen3_moe": (_hf_decoder("Qwen3MoeForCausalLM", "Qwen3MoeConfig", **{**_DENSE, "head_dim": 8, "moe_intermediate_size": 16,
                                                                          "num_experts": 4, "num_experts_per_tok": 2,
                                                                          "decoder_sparse_step": 1, "mlp_only_layers": []}), None),
    "qwen2_moe": (_hf_decoder("Qwen2MoeForCausalLM", "Qwen2MoeConfig", **_DENSE, moe_intermediate_size=16,
                              shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                              decoder_sparse_step=1, mlp_only_layers=[]), None),
    "mixtral": (_hf_decoder("MixtralForCausalLM", "MixtralConfig", **_DENSE, num_local_experts=4, num_experts_per_tok=2), None),
    "phi3": (_hf_decoder("Phi3ForCausalLM", "Phi3Config", **_DENSE, pad_token_id=0, bos_token_id=1, eos_token_id=2), None),
    "falcon": (_hf_decoder("FalconForCausalLM", "FalconConfig", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, bos_token_id=1, eos_token_id=2), None),
    "gemma2": (_hf_decoder("Gemma2ForCausalLM", "Gemma2Config", **_DENSE, head_dim=8, sliding_window=16), None),
    "gpt2": (_hf_decoder("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                         bos_token_id=0, eos_token_id=0), None),
    "bert": (_bert, None),
    "vit": (_vit, None),
    "t5": (_t5, None),
    "bart": (_bart, None),
    "whisper": (_whisper, None),
    "unet": (_unet, "diffusers"),
    "vae": (_vae, "diffusers"),
    "sd_pipeline": (_pipeline, "diffusers"),
}

# multi-graph exports go to a directory; the rest to one .onnx file
MULTI_GRAPH = {"t5", "bart", "whisper", "vae", "sd_pipeline"}


def write_checkpoint(name: str, directory: Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint ``name`` (a key of CHECKPOINTS) into ``directory`` (created), seeded."""
    import torch

    builder, _ = CHECKPOINTS[name]
    torch.manual_seed(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    builder(directory)
    return directory
