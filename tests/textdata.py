"""Tiny Hugging Face checkpoints with a real (word-level) tokenizer and a few sentences, for real-data tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a model is exported quantized and sharded",
    "every step is checked against a reference run",
    "fp8 stores one byte a value on disk",
    "the dog sleeps",
    "tensor parallel splits heads across ranks",
]


def save_tokenizer(directory: Path) -> int:
    """A word-level tokenizer over SENTENCES saved in ``directory``; returns the vocabulary size."""
    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    fast.save_pretrained(directory)
    return len(vocab)


def tiny_llama(directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    vocab = save_tokenizer(directory)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)).save_pretrained(directory)
    return directory


def tiny_bert(directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    vocab = save_tokenizer(directory)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64)).save_pretrained(directory)
    return directory


def write_text(path: Path) -> Path:
    path.write_text("\n".join(SENTENCES) + "\n")
    return path
