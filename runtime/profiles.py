"""Device and interconnect profiles as data: load the JSON files beside this module or a user's own file.

A figure in a profile file is either a plain number or ``{"value": N, "source": "...", "estimate": bool}``;
the loader keeps the value and remembers the source and whether it is an estimate.

Lookup order for a name: an existing file path, then each directory in ``$MAIA_ONNX_PROFILE_PATH``
(``os.pathsep``-separated; ``devices/`` and ``interconnects/`` subfolders or the folder itself), then the
built-in ``runtime/devices`` / ``runtime/interconnects``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maia_onnx.errors import UserError

_HERE = Path(__file__).resolve().parent
BUILTIN_DIRS = {"device": _HERE / "devices", "interconnect": _HERE / "interconnects"}
_SUBDIR = {"device": "devices", "interconnect": "interconnects"}

# Canonical compute-dtype names; ONNX element types map onto these (see canonical_dtype).
DTYPE_BYTES = {
    "fp64": 8, "fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "uint8": 1,
    "mx9": 9 / 8, "mx6": 6 / 8, "mxfp8": 1, "mxint8": 1, "fp6": 0.75, "fp4": 0.5, "mxfp4": 0.5, "int4": 0.5,
}


class ProfileError(UserError):
    """A device or interconnect profile is missing or malformed."""


@dataclass
class Figure:
    value: float
    source: str = ""
    estimate: bool = False


def _figure(raw: Any, where: str) -> Figure:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return Figure(float(raw))
    if isinstance(raw, dict) and isinstance(raw.get("value"), (int, float)):
        return Figure(float(raw["value"]), str(raw.get("source", "")), bool(raw.get("estimate", False)))
    raise ProfileError(f"{where}: expected a number or {{\"value\": N, \"source\": ...}}, got {raw!r}; fix the profile file")


@dataclass
class DeviceProfile:
    """Peak rates and memory of one accelerator; all values in SI units (bytes, bytes/s, ops/s)."""

    name: str
    description: str
    memory_capacity: float
    memory_bandwidth: float
    peak_flops: dict[str, float]
    vector_flops: float
    sram_bytes: float = 0.0
    host_bandwidth: float = 0.0
    tdp_w: float = 0.0
    compute_dtype_map: dict[str, str] = field(default_factory=dict)
    default_interconnect: str | None = None
    sources: dict[str, str] = field(default_factory=dict)
    estimates: list[str] = field(default_factory=list)
    path: str = ""

    def compute_dtype(self, dtype: str) -> str:
        """The precision the device actually runs a ``dtype`` matmul in (compute_dtype_map first, then as is)."""
        seen = set()
        while dtype in self.compute_dtype_map and dtype not in seen:
            seen.add(dtype)
            dtype = self.compute_dtype_map[dtype]
        return dtype

    def peak(self, dtype: str) -> float:
        """Peak dense tensor ops/s for a matmul stored/computed in ``dtype``."""
        resolved = self.compute_dtype(dtype)
        if resolved in self.peak_flops:
            return self.peak_flops[resolved]
        # Unknown precision: fall back to the slowest tensor rate rather than inventing one.
        return min(self.peak_flops.values())

    def to_dict(self) -> dict:
        return {
            "name": self.name, "description": self.description, "memory_capacity": self.memory_capacity,
            "memory_bandwidth": self.memory_bandwidth, "peak_flops": dict(self.peak_flops),
            "vector_flops": self.vector_flops, "sram_bytes": self.sram_bytes, "path": self.path,
            "estimates": list(self.estimates),
        }


@dataclass
class InterconnectProfile:
    """A link for collectives: per-direction bandwidth (bytes/s) and per-message latency alpha (s)."""

    name: str
    description: str
    bandwidth: float
    alpha: float
    sources: dict[str, str] = field(default_factory=dict)
    estimates: list[str] = field(default_factory=list)
    path: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "bandwidth": self.bandwidth,
                "alpha": self.alpha, "path": self.path, "estimates": list(self.estimates)}


def _search_dirs(kind: str) -> list[Path]:
    dirs = []
    for entry in os.environ.get("MAIA_ONNX_PROFILE_PATH", "").split(os.pathsep):
        if entry:
            dirs += [Path(entry) / _SUBDIR[kind], Path(entry)]
    dirs.append(BUILTIN_DIRS[kind])
    return dirs


def _available(kind: str) -> list[str]:
    names = set()
    for d in _search_dirs(kind):
        if d.is_dir():
            for f in d.glob("*.json"):
                try:
                    if json.loads(f.read_text()).get("kind", kind) == kind:
                        names.add(f.stem)
                except (OSError, ValueError):
                    continue
    return sorted(names)


def list_devices() -> list[str]:
    return _available("device")


def list_interconnects() -> list[str]:
    return _available("interconnect")


def _resolve(name_or_path: str | os.PathLike, kind: str) -> Path:
    text = str(name_or_path)
    path = Path(text)
    if path.is_file():
        return path
    if text.endswith(".json") or os.sep in text:
        raise ProfileError(f"{kind} profile file not found: {text} (check the path)")
    for d in _search_dirs(kind):
        candidate = d / f"{text}.json"
        if candidate.is_file():
            return candidate
    known = ", ".join(_available(kind))
    raise ProfileError(f"unknown {kind} profile {text!r}: use one of {known} or a path to a JSON profile file")


def _read(path: Path, kind: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ProfileError(f"{kind} profile {path} is not valid JSON ({exc}); fix the file") from exc
    if not isinstance(data, dict):
        raise ProfileError(f"{kind} profile {path} must hold a JSON object")
    if data.get("kind", kind) != kind:
        raise ProfileError(f"{path} is a {data.get('kind')!r} profile, expected a {kind} profile")
    return data


def _take(data: dict, key: str, path: Path, sources: dict, estimates: list, required: bool = True, default=0.0) -> float:
    if key not in data:
        if required:
            raise ProfileError(f"profile {path} lacks {key!r}: add it (a number or {{\"value\": N, \"source\": ...}})")
        return default
    fig = _figure(data[key], f"{path}: {key}")
    if fig.value < 0 or (required and fig.value == 0):
        raise ProfileError(f"profile {path}: {key} must be positive, got {fig.value}")
    if fig.source:
        sources[key] = fig.source
    if fig.estimate:
        estimates.append(key)
    return fig.value


def load_device(name_or_path: str | os.PathLike) -> DeviceProfile:
    """Load a device profile by built-in name (maia100, maia200, h100-sxm), user path or profile-path name."""
    path = _resolve(name_or_path, "device")
    data = _read(path, "device")
    sources: dict[str, str] = {}
    estimates: list[str] = []
    raw_peaks = data.get("peak_flops")
    if not isinstance(raw_peaks, dict) or not raw_peaks:
        raise ProfileError(f"device profile {path} needs 'peak_flops': {{dtype: ops/s, ...}} with at least one entry")
    peaks = {}
    for dtype, raw in raw_peaks.items():
        fig = _figure(raw, f"{path}: peak_flops.{dtype}")
        if fig.value <= 0:
            raise ProfileError(f"device profile {path}: peak_flops.{dtype} must be positive")
        peaks[dtype] = fig.value
        if fig.source:
            sources[f"peak_flops.{dtype}"] = fig.source
        if fig.estimate:
            estimates.append(f"peak_flops.{dtype}")
    dmap = {k: v for k, v in (data.get("compute_dtype_map") or {}).items() if not k.startswith("_")}
    return DeviceProfile(
        name=str(data.get("name", path.stem)),
        description=str(data.get("description", "")),
        memory_capacity=_take(data, "memory_capacity_bytes", path, sources, estimates),
        memory_bandwidth=_take(data, "memory_bandwidth_bytes_per_s", path, sources, estimates),
        peak_flops=peaks,
        vector_flops=_take(data, "vector_flops", path, sources, estimates, required=False,
                           default=min(peaks.values()) / 8),
        sram_bytes=_take(data, "sram_bytes", path, sources, estimates, required=False),
        host_bandwidth=_take(data, "host_bandwidth_bytes_per_s", path, sources, estimates, required=False),
        tdp_w=_take(data, "tdp_w", path, sources, estimates, required=False),
        compute_dtype_map=dmap,
        default_interconnect=data.get("default_interconnect"),
        sources=sources,
        estimates=estimates,
        path=str(path),
    )


def load_interconnect(name_or_path: str | os.PathLike) -> InterconnectProfile:
    """Load an interconnect profile (nvlink4, pcie5, maia-eth, maia200-eth, loopback, or a user file)."""
    path = _resolve(name_or_path, "interconnect")
    data = _read(path, "interconnect")
    sources: dict[str, str] = {}
    estimates: list[str] = []
    return InterconnectProfile(
        name=str(data.get("name", path.stem)),
        description=str(data.get("description", "")),
        bandwidth=_take(data, "bandwidth_bytes_per_s", path, sources, estimates),
        alpha=_take(data, "alpha_s", path, sources, estimates, required=False),
        sources=sources,
        estimates=estimates,
        path=str(path),
    )
