"""Task-level evaluation of a model against a reference on real data (``maia-onnx eval``).

Decoders (an ``input_ids`` input and a ``[batch, seq, vocab]`` ``logits`` output): perplexity of both models, its
delta, mean KL(ref || model) per token and next-token top-1 agreement.  Encoders (a ``[batch, seq, hidden]``
output and an attention mask): mask-weighted mean-pooled embedding cosine (min / mean) and nearest-neighbour
agreement across the samples.  Every model: per-output cosine, relative error and max abs error over real
positions; top-1 agreement only where it means something (logits / scores outputs, and the ``scores`` slice of
an output that concatenates different quantities, declared in the ``maia.output_slices`` metadata).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import onnx_ir as ir

from maia_onnx.accuracy import Accumulator, float_io_model
from maia_onnx.calib import declared_shapes, make_source
from maia_onnx.data import feeds_valid, real_positions
from maia_onnx.errors import UserError
from maia_onnx.io import load_model
from maia_onnx.ortutil import make_session, ort_run

OUTPUT_SLICES_KEY = "maia.output_slices"  # {"output0": {"axis": 1, "parts": {"boxes": [0, 4], "scores": [4, null]}}}
_CLASS_WORDS = ("logits", "scores", "probs", "class")


def output_slices(model: ir.Model) -> dict[str, dict[str, Any]]:
    raw = model.metadata_props.get(OUTPUT_SLICES_KEY)
    return json.loads(raw) if raw else {}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@dataclass
class _Decoder:
    """Streaming perplexity / KL / agreement over next-token predictions at real positions."""

    nll_ref: float = 0.0
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0

    def update(self, ids: np.ndarray, valid: np.ndarray | None, ref: np.ndarray, got: np.ndarray) -> None:
        pairs = np.ones(ids[:, 1:].shape, dtype=bool) if valid is None else (valid[:, :-1] & valid[:, 1:])
        if not pairs.any():
            return
        target = ids[:, 1:][pairs]
        lr = _log_softmax(ref[:, :-1][pairs])
        lg = _log_softmax(got[:, :-1][pairs])
        rows = np.arange(len(target))
        self.nll_ref -= float(lr[rows, target].sum())
        self.nll -= float(lg[rows, target].sum())
        self.kl += float((np.exp(lr) * (lr - lg)).sum())
        self.agree += int((lr.argmax(-1) == lg.argmax(-1)).sum())
        self.tokens += len(target)

    def result(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        ppl_ref, ppl = math.exp(self.nll_ref / n), math.exp(self.nll / n)
        return {"tokens": self.tokens, "perplexity_ref": ppl_ref, "perplexity": ppl, "perplexity_delta": ppl - ppl_ref,
                "kl_per_token": self.kl / n, "top1_agree": self.agree / n}


@dataclass
class _Encoder:
    """Pooled embeddings of every sample, compared once all are in (nearest neighbours need the whole set)."""

    ref: list[np.ndarray] = field(default_factory=list)
    got: list[np.ndarray] = field(default_factory=list)

    @staticmethod
    def pool(hidden: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
        weights = np.ones(hidden.shape[:2]) if valid is None else valid.astype(np.float64)
        return (hidden.astype(np.float64) * weights[..., None]).sum(1) / np.maximum(weights.sum(1, keepdims=True), 1)

    def update(self, valid: np.ndarray | None, ref: np.ndarray, got: np.ndarray) -> None:
        self.ref.append(self.pool(ref, valid))
        self.got.append(self.pool(got, valid))

    def result(self) -> dict[str, float]:
        ref, got = np.concatenate(self.ref), np.concatenate(self.got)
        unit_r = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-30)
        unit_g = got / np.maximum(np.linalg.norm(got, axis=1, keepdims=True), 1e-30)
        cos = (unit_r * unit_g).sum(1)
        out = {"samples": len(ref), "embedding_cosine_min": float(cos.min()), "embedding_cosine_mean": float(cos.mean())}
        if len(ref) >= 2:
            sim_r, sim_g = unit_r @ unit_r.T, unit_g @ unit_g.T
            np.fill_diagonal(sim_r, -np.inf)
            np.fill_diagonal(sim_g, -np.inf)
            out["neighbour_agree"] = float((sim_r.argmax(1) == sim_g.argmax(1)).mean())
        return out


def _task(model: ir.Model) -> tuple[str, str | None]:
    """("decoder", logits name) / ("encoder", hidden-state name) / ("generic", None) from the graph's I/O."""
    inputs = {v.name for v in model.graph.inputs}
    outs = {v.name: v for v in model.graph.outputs}
    if "input_ids" in inputs and "logits" in outs and outs["logits"].shape is not None and len(outs["logits"].shape) == 3:
        return "decoder", "logits"
    if "attention_mask" in inputs or "input_ids" in inputs:
        for name, value in outs.items():
            if value.shape is not None and len(value.shape) == 3 and "hidden" in name:
                return "encoder", name
    return "generic", None


def evaluate_models(model: ir.Model, reference: ir.Model, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """Run both models on the same batches; the report is {"task", "task_metrics", "outputs", "summary"}."""
    candidate = float_io_model(model)
    ref_sess, sess = make_session(reference), make_session(candidate)
    ref_names = [o.name for o in ref_sess.get_outputs()]
    names = {o.name for o in sess.get_outputs()}
    missing = [n for n in ref_names if n not in names]
    if missing:
        raise UserError(f"the model lacks the reference's outputs {', '.join(missing)}: compare a model with the model it was made from")
    task, key = _task(reference)
    slices = output_slices(reference) or output_slices(model)
    per_output: dict[str, Accumulator] = {}
    decoder, encoder = _Decoder(), _Encoder()
    declared = declared_shapes(reference, ref_names)
    n_batches = 0
    for feeds in batches:
        valid = feeds_valid(feeds)
        plain = dict(feeds)
        ref_vals = dict(zip(ref_names, ort_run(ref_sess, ref_names, plain)))
        got_vals = dict(zip(ref_names, ort_run(sess, ref_names, plain)))
        for name in ref_names:
            r, g = np.asarray(ref_vals[name]), np.asarray(got_vals[name])
            if not np.issubdtype(r.dtype, np.floating):
                continue
            parts = slices.get(name, {}).get("parts")
            if parts:
                axis = int(slices[name].get("axis", -1))
                for part, (lo, hi) in parts.items():
                    index = [slice(None)] * r.ndim
                    index[axis] = slice(lo, hi)
                    rs, gs = np.moveaxis(r[tuple(index)], axis, -1), np.moveaxis(g[tuple(index)], axis, -1)
                    per_output.setdefault(f"{name}[{part}]", Accumulator()).update(rs, gs, top1=part in ("scores", "classes"))
                continue
            top1 = any(w in name for w in _CLASS_WORDS)
            per_output.setdefault(name, Accumulator()).update(
                real_positions(r, valid, declared.get(name)), real_positions(g, valid, declared.get(name)), top1=top1)
        if task == "decoder":
            decoder.update(np.asarray(plain["input_ids"]), valid, ref_vals[key], got_vals[key])
        elif task == "encoder":
            encoder.update(valid, ref_vals[key], got_vals[key])
        n_batches += 1
    if n_batches == 0:
        raise UserError("evaluation data yielded no samples: give a file with at least one sample")
    outputs = {name: {"cosine": a.cosine, "rel_err": a.rel_err, "max_abs_err": a.max_abs, "top1_agree": a.top1}
               for name, a in per_output.items()}
    task_metrics = decoder.result() if task == "decoder" else encoder.result() if task == "encoder" else {}
    summary = {"batches": n_batches, "min_output_cosine": min((o["cosine"] for o in outputs.values()), default=1.0),
               "max_output_rel_err": max((o["rel_err"] for o in outputs.values()), default=0.0)}
    return {"task": task, "task_metrics": task_metrics, "outputs": outputs, "summary": summary}


def data_source(spec: str, *, tokenizer=None, seq_len: int = 128, batch_size: int = 1, num_samples: int | None = None,
                image_size: tuple[int, int] | None = None, dims: Mapping[str, int] | None = None):
    """``text:FILE`` / ``images:DIR`` (maia_onnx.data) or ``.npz`` / a directory of them / ``random`` (maia_onnx.calib)."""
    return make_source(spec, num_samples=num_samples, batch_size=batch_size, dims=dims, tokenizer=tokenizer,
                       seq_len=seq_len, image_size=image_size)


def evaluate_files(model_path, reference_path, data: str, **source_options) -> dict[str, Any]:
    """``maia-onnx eval``: load both models (weights stay lazy until ORT reads them) and evaluate on ``data``."""
    model, reference = load_model(model_path), load_model(reference_path)
    source = data_source(data, **source_options)
    report = evaluate_models(model, reference, source.batches(reference))
    report.update(model=str(model_path), reference=str(reference_path), data=source.description)
    return report
