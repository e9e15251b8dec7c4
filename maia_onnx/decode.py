"""Greedy decoding over an ONNX decoder with a KV cache in ORT, and FP32-vs-candidate decode comparison.

Works for any decoder with ``input_ids`` [batch, seq] and ``past_key_values.{i}.key/value`` inputs /
``logits`` + ``present.{i}.key/value`` outputs (positions = past + arange(seq)); cache tensors may be
float or FP8 (an FP8 cache stays an ORT value between steps, never converted).

- ``greedy_decode(model, prompt, steps)``: prefill the prompt, then ``steps - 1`` single-token steps;
  returns the generated tokens and the per-step logits of the position that produced each token.
- ``compare_decode(reference, candidate, prompt, steps)``: runs the reference free, runs the candidate
  both teacher-forced on the reference's tokens (per-step logits cosine / max abs / argmax agreement on
  the same context) and free-running (token agreement, first divergence).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from maia_onnx.formats.fp8 import quantize_fp8
from maia_onnx.ortutil import compare, make_session

_ONNX_TYPE = {
    "tensor(float)": (np.float32, 1),
    "tensor(float16)": (np.float16, 10),
    "tensor(float8e4m3fn)": (np.uint8, 17),
    "tensor(float8e5m2)": (np.uint8, 19),
}


class DecoderSession:
    """An ORT session plus the cache plumbing of one decoder model."""

    def __init__(self, model: ir.Model | str | os.PathLike):
        self.session = make_session(model)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        if "input_ids" not in self.inputs or "logits" not in self.output_names:
            raise ValueError("decoder needs an 'input_ids' input and a 'logits' output")

    def cache_bytes_per_token(self) -> int:
        """Bytes one token adds to the cache (all layers, K and V, batch 1)."""
        total = 0
        for name in self.past_names:
            info = self.inputs[name]
            per = int(np.prod([d for i, d in enumerate(info.shape) if i not in (0, 2)]))
            total += per * (1 if "float8" in info.type else np.dtype(_ONNX_TYPE.get(info.type, (np.float32, 1))[0]).itemsize)
        return total

    def empty_cache(self, batch: int) -> dict[str, Any]:
        cache = {}
        for name in self.past_names:
            info = self.inputs[name]
            dims = [batch if i == 0 else (0 if i == 2 else d) for i, d in enumerate(info.shape)]
            if not all(isinstance(d, int) for d in dims):
                raise ValueError(f"cannot size an empty cache for {name} with shape {info.shape}")
            np_type, onnx_type = _ONNX_TYPE[info.type]
            cache[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.zeros(dims, np_type), onnx_type)
        return cache

    def step(self, input_ids: np.ndarray, cache: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """Run one forward; returns (logits of the last position [batch, vocab], next cache)."""
        feeds = dict(cache)
        feeds["input_ids"] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64))
        outs = dict(zip(self.output_names, self.session.run_with_ort_values(self.output_names, feeds)))
        logits = outs["logits"].numpy()[:, -1, :].astype(np.float32)
        next_cache = {name: outs[name.replace("past_key_values.", "present.")] for name in self.past_names}
        return logits, next_cache


@dataclass
class DecodeResult:
    tokens: np.ndarray  # [batch, steps]
    logits: np.ndarray  # [steps, batch, vocab]


def greedy_decode(model, prompt: np.ndarray, steps: int = 32, forced: np.ndarray | None = None) -> DecodeResult:
    """Greedy decode ``steps`` tokens after ``prompt`` [batch, seq]; ``forced`` [batch, steps] feeds given tokens instead."""
    dec = model if isinstance(model, DecoderSession) else DecoderSession(model)
    prompt = np.asarray(prompt, dtype=np.int64)
    cache = dec.empty_cache(prompt.shape[0])
    logits, cache = dec.step(prompt, cache)
    tokens, all_logits = [], []
    for t in range(steps):
        all_logits.append(logits)
        tok = logits.argmax(axis=-1)
        tokens.append(tok)
        if t == steps - 1:
            break
        feed = forced[:, t] if forced is not None else tok
        logits, cache = dec.step(feed[:, None], cache)
    return DecodeResult(np.stack(tokens, axis=1), np.stack(all_logits))


@dataclass
class DecodeComparison:
    steps: list[dict[str, Any]] = field(default_factory=list)  # per step: cosine, max_abs, agree, tokens
    token_agreement: float = 0.0  # teacher-forced argmax agreement
    free_running_agreement: float = 0.0  # fraction of identical tokens when each model decodes itself
    first_divergence: int | None = None  # first free-running step whose token differs (None: never)
    min_cosine: float = 1.0
    mean_cosine: float = 1.0
    cache_bytes_per_token: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "token_agreement": self.token_agreement,
            "free_running_agreement": self.free_running_agreement,
            "first_divergence": self.first_divergence,
            "min_cosine": self.min_cosine,
            "mean_cosine": self.mean_cosine,
            "cache_bytes_per_token": self.cache_bytes_per_token,
            "steps": self.steps,
        }


def compare_decode(reference, candidate, prompt: np.ndarray, steps: int = 32) -> DecodeComparison:
    """Greedy-decode with both models; per-step logits cosine (teacher-forced) and token agreement."""
    ref_dec = reference if isinstance(reference, DecoderSession) else DecoderSession(reference)
    cand_dec = candidate if isinstance(candidate, DecoderSession) else DecoderSession(candidate)
    ref = greedy_decode(ref_dec, prompt, steps)
    forced = greedy_decode(cand_dec, prompt, steps, forced=ref.tokens)
    free = greedy_decode(cand_dec, prompt, steps)
    result = DecodeComparison()
    for t in range(steps):
        m = compare(ref.logits[t], forced.logits[t])
        ref_tok = ref.tokens[:, t]
        got_tok = forced.logits[t].argmax(axis=-1)
        result.steps.append(
            {
                "step": t,
                "cosine": m["cosine"],
                "max_abs": m["max_abs"],
                "ref_token": ref_tok.tolist(),
                "token": got_tok.tolist(),
                "agree": bool(np.all(ref_tok == got_tok)),
            }
        )
    cos = [s["cosine"] for s in result.steps]
    result.min_cosine, result.mean_cosine = float(min(cos)), float(np.mean(cos))
    result.token_agreement = float(np.mean([s["agree"] for s in result.steps]))
    same = np.all(ref.tokens == free.tokens, axis=0)
    result.free_running_agreement = float(np.mean(ref.tokens == free.tokens))
    result.first_divergence = None if same.all() else int(np.argmin(same))
    result.cache_bytes_per_token = {"reference": ref_dec.cache_bytes_per_token(), "candidate": cand_dec.cache_bytes_per_token()}
    return result


def decode_report(reference, candidate, prompt: np.ndarray | None = None, steps: int = 32, seed: int = 0, prompt_len: int = 8) -> dict[str, Any]:
    """``compare_decode`` as a JSON-ready dict (for quantize / run reports); a seeded random prompt by default.

    The prompt's token range comes from the model's ``maia_onnx.config`` metadata (``vocab_size``) or the
    logits width.
    """
    ref_dec = reference if isinstance(reference, DecoderSession) else DecoderSession(reference)
    if prompt is None:
        vocab = None
        model = reference if isinstance(reference, ir.Model) else None
        if model is not None and "maia_onnx.config" in model.metadata_props:
            vocab = json.loads(model.metadata_props["maia_onnx.config"]).get("vocab_size")
        if not vocab:
            out = next(o for o in ref_dec.session.get_outputs() if o.name == "logits")
            vocab = out.shape[-1] if isinstance(out.shape[-1], int) else 2
        prompt = np.random.default_rng(seed).integers(0, int(vocab), (1, prompt_len))
    result = compare_decode(ref_dec, candidate, prompt, steps)
    report = result.as_dict()
    report["prompt"] = np.asarray(prompt).tolist()
    report["steps_count"] = steps
    return report


def step_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-step table rows (step, cosine, max_abs, tokens, agree) for ``maia_onnx.report.print_table``."""
    return [
        {
            "step": s["step"],
            "cosine": round(s["cosine"], 6),
            "max_abs": round(s["max_abs"], 4),
            "fp32_token": ",".join(map(str, s["ref_token"])),
            "token": ",".join(map(str, s["token"])),
            "agree": "yes" if s["agree"] else "NO",
        }
        for s in report["steps"]
    ]


def ort_feeds(model: ir.Model, session, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """OrtValues for ``feeds``; float arrays fed to FP8 inputs (an FP8 KV cache) are quantised first with the
    scale of the DequantizeLinear that reads the input, so FP32 feeds work on both models."""
    types = {i.name: i.type for i in session.get_inputs()}
    graph_inputs = {v.name: v for v in model.graph.inputs}
    out = {}
    for name, array in feeds.items():
        t = types.get(name)
        if t in ("tensor(float8e4m3fn)", "tensor(float8e5m2)") and np.asarray(array).dtype.kind == "f":
            fmt = "e4m3fn" if t == "tensor(float8e4m3fn)" else "e5m2"
            dq = next((u.node for u in graph_inputs[name].uses() if u.node.op_type == "DequantizeLinear" and u.idx == 0), None)
            scale_value = dq.inputs[1] if dq is not None else None
            if scale_value is None or scale_value.const_value is None:
                raise ValueError(f"cannot quantise the float feed for FP8 input {name}: no DequantizeLinear with a constant scale reads it")
            scale = scale_value.const_value.numpy()
            axis = dq.attributes.get_int("axis", 1) if np.ndim(scale) else None
            q = quantize_fp8(np.asarray(array, np.float32), scale, fmt, axis=axis)
            out[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(q.view(np.uint8), 17 if fmt == "e4m3fn" else 19)
        else:
            out[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
    return out
