"""Real data as users have it, turned into exactly the feeds a graph declares: ``text:FILE`` (tokenized with the
checkpoint's tokenizer) and ``images:DIR`` (resized and normalized like the checkpoint's preprocessor).

Batches are :class:`Feeds` (a dict of graph inputs) that also carry ``valid``: a ``[batch, seq]`` boolean mask of
the positions that hold real tokens, so calibration statistics and evaluation metrics never see padding.  Decoders
with a KV cache get empty ``past`` inputs (past length 0) and ``position_ids`` when the graph declares them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx_ir as ir

from maia_onnx.errors import InvalidOptionError, UserError
from maia_onnx.extras import require

SOURCE_KEY = "maia_onnx.source"  # "hf:DIR" for models exported from a Hugging Face checkpoint
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_NP_INT = {ir.DataType.INT64: np.int64, ir.DataType.INT32: np.int32}


class Feeds(dict):
    """Graph inputs of one batch; ``valid`` marks real (non-padded) ``[batch, seq]`` positions, or is None."""

    def __init__(self, arrays, valid: np.ndarray | None = None):
        super().__init__(arrays)
        self.valid = valid


def feeds_valid(feeds) -> np.ndarray | None:
    """The ``[batch, seq]`` real-position mask of a batch (None for plain dicts and unpadded batches)."""
    return feeds.valid if isinstance(feeds, Feeds) else None


def _seq_axes(array: np.ndarray, seq: int, declared) -> list[int]:
    """Axes (after the first) of ``array`` that run over token positions: the size is ``seq`` and the graph does
    not declare that axis a fixed size (a hidden or head dim that happens to equal the sequence length)."""
    dims = list(declared) if declared is not None and len(declared) == array.ndim else [None] * array.ndim
    return [axis for axis in range(1, array.ndim) if array.shape[axis] == seq and not isinstance(dims[axis], int)]


def real_positions(array: np.ndarray, valid: np.ndarray | None, declared=None) -> np.ndarray:
    """The entries of a batch's activation at real (non-padded) token positions, as ``[n, rest...]``.

    ``valid`` is the batch's ``[batch, seq]`` mask.  The first axis is the batch (or batch x heads merged, or
    batch x seq flattened into token rows); every later axis of length ``seq`` that the graph (``declared``: the
    value's ir shape, optional) does not fix is a position axis and is restricted to real positions: the query
    and the key axis of attention scores ``[b, h, q, k]`` both.  Arrays with no such layout are returned as they are.
    """
    array = np.asarray(array)
    if valid is None or array.ndim == 0:
        return array
    batch, seq = valid.shape
    axes = _seq_axes(array, seq, declared)
    lead = array.shape[0]
    if axes and lead != batch and lead % batch == 0:
        valid = np.repeat(valid, lead // batch, axis=0)  # [batch * heads, ...]: heads vary fastest
    elif not axes:
        if lead == batch * seq and array.ndim >= 1 and lead != batch:
            return array[valid.reshape(-1)]  # token rows [batch * seq, hidden]
        return array
    elif lead != batch:
        return array
    moved = np.moveaxis(array, [0, *axes], list(range(len(axes) + 1)))
    mask = valid
    for k in range(1, len(axes)):
        mask = mask[..., None] & valid.reshape(valid.shape[0], *([1] * k), seq)
    return moved[mask]


def data_kind(spec: str | os.PathLike | None) -> tuple[str, str | None]:
    """Split a data spec into (kind, path): ``text:FILE``, ``images:DIR``, anything else is left to the caller."""
    text = str(spec) if spec is not None else ""
    for kind in ("text", "images"):
        if text.startswith(kind + ":"):
            path = text[len(kind) + 1:]
            if not path:
                raise InvalidOptionError(f"data spec {text!r} names no path: write {kind}:PATH")
            return kind, path
    return "other", text or None


def read_texts(path: str | os.PathLike) -> list[str]:
    """One sample a line (blank lines skipped), or JSONL with a ``text`` field on every line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"text data {p} not found: pass text:FILE with one sample a line (or JSONL with a 'text' field)")
    lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise UserError(f"text data {p} is empty: write one sample a line")
    if p.suffix == ".jsonl" or lines[0].lstrip().startswith("{"):
        texts = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{p}:{number}: not JSON ({exc.msg}): write one JSON object a line with a 'text' field") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f"{p}:{number}: no string 'text' field: write {{\"text\": \"...\"}} on every line")
            texts.append(record["text"])
        return texts
    return lines


def source_checkpoint(model: ir.Model) -> Path | None:
    """The Hugging Face directory a model was exported from (recorded by ``export hf:DIR``), if any."""
    recorded = model.metadata_props.get(SOURCE_KEY, "")
    return Path(recorded[3:]) if recorded.startswith("hf:") else None


def checkpoint_dir(model: ir.Model, explicit: str | os.PathLike | None, need: str, option: str) -> Path:
    """``explicit`` (the ``option`` the user passed), else the ``hf:`` directory recorded in the model at export;
    a one-line error saying how to give one when neither exists (``need``: what it is needed for)."""
    path = Path(explicit) if explicit is not None else source_checkpoint(model)
    if path is None:
        raise UserError(f"{need} needs the Hugging Face checkpoint directory the model came from: pass {option} DIR "
                        "(models exported from hf:DIR remember theirs)")
    if not path.is_dir():
        raise UserError(f"{option} {path} is not a directory: pass the Hugging Face checkpoint directory")
    return path


def tokenizer_dir(model: ir.Model, explicit: str | os.PathLike | None) -> Path:
    """The tokenizer to use: ``--tokenizer DIR``, else the ``hf:`` directory recorded in the model at export."""
    return checkpoint_dir(model, explicit, "text data (its tokenizer)", "--tokenizer")


def load_tokenizer(path: Path):
    AutoTokenizer = require("transformers", "export", "text data").AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        # decoders often ship without a pad token; the padded positions are masked out everywhere, so any id works
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)
    return tokenizer


def _feed_inputs(model: ir.Model) -> list[ir.Value]:
    inits = set(model.graph.initializers)
    return [v for v in model.graph.inputs if v.name not in inits]


def _is_past(name: str) -> bool:
    return "past" in name or "cache" in name


@dataclass
class TextSource:
    """Tokenized text; iterate with ``batches(model)``.  Same protocol as ``calib.CalibrationSource``."""

    path: Path
    tokenizer_path: Path | None = None
    seq_len: int = 128
    batch_size: int = 1
    num_samples: int | None = None
    sample_range: tuple[int, int | None] = (0, None)
    kind: str = field(default="text", init=False)
    _texts: list[str] | None = field(default=None, init=False, repr=False)

    @property
    def description(self) -> str:
        return f"text:{self.path}"

    def texts(self) -> list[str]:
        if self._texts is None:
            self._texts = read_texts(self.path)
        start, stop = self.sample_range
        chosen = self._texts[start:stop]
        return chosen[: self.num_samples] if self.num_samples is not None else chosen

    def total_samples(self) -> int:
        return len(self.texts())

    def count(self) -> int:
        return -(-self.total_samples() // self.batch_size)

    def with_range(self, sample_range: tuple[int, int | None]) -> "TextSource":
        clone = replace(self, sample_range=sample_range, num_samples=None)
        clone._texts = self._texts
        return clone

    def batches(self, model: ir.Model) -> Iterator[Feeds]:
        tokenizer = load_tokenizer(tokenizer_dir(model, self.tokenizer_path))
        texts = self.texts()
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            encoded = tokenizer(chunk, truncation=True, max_length=self.seq_len, padding="longest", return_tensors="np")
            yield text_feeds(model, {k: np.asarray(v) for k, v in encoded.items()})


def text_feeds(model: ir.Model, encoded: dict[str, np.ndarray]) -> Feeds:
    """Graph feeds from tokenizer output: ids, masks and token types it made, positions and an empty KV cache it did not."""
    ids = encoded["input_ids"]
    batch, seq = ids.shape
    mask = encoded.get("attention_mask")
    valid = np.ones((batch, seq), dtype=bool) if mask is None else mask.astype(bool)
    feeds: dict[str, np.ndarray] = {}
    for value in _feed_inputs(model):
        name, dtype = value.name, value.dtype
        np_int = _NP_INT.get(dtype)
        if name in encoded:
            feeds[name] = encoded[name].astype(np_int or encoded[name].dtype)
        elif name == "position_ids":
            positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
            feeds[name] = positions.astype(np_int or np.int64)
        elif name == "attention_mask":
            feeds[name] = valid.astype(np_int or np.int64)
        elif name == "token_type_ids":
            feeds[name] = np.zeros((batch, seq), dtype=np_int or np.int64)
        elif _is_past(name):
            shape = []
            for axis, dim in enumerate(value.shape or ()):
                if isinstance(dim, int):
                    shape.append(dim)
                else:
                    shape.append(batch if axis == 0 else 0)  # the only symbolic non-batch dim of a cache is its length
            feeds[name] = np.zeros(shape, dtype=np.float32 if dtype == ir.DataType.FLOAT else ir.DataType(dtype).numpy())
        else:
            raise UserError(f"graph input {name!r} cannot be built from text: feed it from an .npz file instead "
                            f"(text data builds input_ids, attention_mask, token_type_ids, position_ids and empty past inputs)")
    return Feeds(feeds, valid)


@dataclass
class ImageSource:
    """Images from a directory, resized and normalized for a ``pixel_values`` (or single NCHW) input."""

    path: Path
    preprocessor_path: Path | None = None
    size: tuple[int, int] | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    rescale: float | None = None
    batch_size: int = 1
    num_samples: int | None = None
    sample_range: tuple[int, int | None] = (0, None)
    kind: str = field(default="images", init=False)

    @property
    def description(self) -> str:
        return f"images:{self.path}"

    def files(self) -> list[Path]:
        if not self.path.is_dir():
            raise UserError(f"image directory {self.path} not found: pass images:DIR with image files")
        files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"image directory {self.path} has no images ({', '.join(IMAGE_SUFFIXES)})")
        start, stop = self.sample_range
        files = files[start:stop]
        return files[: self.num_samples] if self.num_samples is not None else files

    def total_samples(self) -> int:
        return len(self.files())

    def count(self) -> int:
        return -(-self.total_samples() // self.batch_size)

    def with_range(self, sample_range: tuple[int, int | None]) -> "ImageSource":
        return replace(self, sample_range=sample_range, num_samples=None)

    def _preprocessing(self, model: ir.Model, value: ir.Value) -> tuple[tuple[int, int], np.ndarray, np.ndarray, float]:
        config: dict = {}
        pre = self.preprocessor_path
        if pre is None:
            pre = source_checkpoint(model)
        if pre is not None and (Path(pre) / "preprocessor_config.json").is_file():
            config = json.loads((Path(pre) / "preprocessor_config.json").read_text())
        shape = value.shape
        size = self.size
        if size is None and shape is not None and len(shape) == 4 and isinstance(shape[2], int) and isinstance(shape[3], int):
            size = (shape[2], shape[3])
        if size is None and "size" in config:
            s = config["size"]
            size = (s["height"], s["width"]) if isinstance(s, dict) and "height" in s else (int(s.get("shortest_edge", 224)),) * 2 if isinstance(s, dict) else (int(s), int(s))
        if size is None:
            raise UserError(f"input {value.name} has symbolic height/width: pass --image-size H,W")
        mean = np.asarray(self.mean if self.mean is not None else config.get("image_mean", [0.0, 0.0, 0.0]), np.float32)
        std = np.asarray(self.std if self.std is not None else config.get("image_std", [1.0, 1.0, 1.0]), np.float32)
        rescale = self.rescale if self.rescale is not None else float(config.get("rescale_factor", 1 / 255))
        return size, mean, std, rescale

    def batches(self, model: ir.Model) -> Iterator[Feeds]:
        Image = require("PIL.Image", "plot", "image data")
        inputs = [v for v in _feed_inputs(model) if v.shape is not None and len(v.shape) == 4]
        if len(inputs) != 1:
            raise UserError(f"image data needs exactly one 4-D (NCHW) graph input, the model has {len(inputs)}: "
                            "feed it from an .npz file instead")
        value = inputs[0]
        (height, width), mean, std, rescale = self._preprocessing(model, value)
        files = self.files()
        for start in range(0, len(files), self.batch_size):
            images = []
            for f in files[start:start + self.batch_size]:
                with Image.open(f) as img:
                    arr = np.asarray(img.convert("RGB").resize((width, height), Image.BILINEAR), dtype=np.float32)
                images.append(((arr * rescale - mean) / std).transpose(2, 0, 1))
            yield Feeds({value.name: np.stack(images).astype(np.float32)})


def make_data_source(spec: str, *, tokenizer: str | os.PathLike | None = None, seq_len: int = 128, batch_size: int = 1,
                     num_samples: int | None = None, image_size: tuple[int, int] | None = None) -> TextSource | ImageSource:
    """A text or image source from ``text:FILE`` / ``images:DIR``."""
    kind, path = data_kind(spec)
    if batch_size < 1:
        raise InvalidOptionError(f"batch size must be >= 1, got {batch_size}")
    if seq_len < 2:
        raise InvalidOptionError(f"--seq-len must be >= 2, got {seq_len}")
    if kind == "text":
        source = TextSource(Path(path), Path(tokenizer) if tokenizer else None, seq_len, batch_size, num_samples)
        source.texts()  # a missing or malformed file is reported now, not after the model is loaded
        return source
    if kind == "images":
        source = ImageSource(Path(path), Path(tokenizer) if tokenizer else None, image_size, batch_size=batch_size,
                             num_samples=num_samples)
        source.files()
        return source
    raise InvalidOptionError(f"data spec {spec!r} is neither text:FILE nor images:DIR")
