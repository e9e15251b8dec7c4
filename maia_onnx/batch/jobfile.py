"""The batch job file: schema, parsing and validation (every error is one line naming the file, job/step and fix).

    version: 1
    cache_dir: .maia-cache          # optional (default: <job file dir>/.maia-batch-cache)
    output_dir: batch-out           # optional (default: <job file dir>/batch-out)
    defaults: {quantize: {format: fp8-e4m3}}   # per-step options merged under each job's own
    jobs:
      - name: llama-fp8-tp2
        model: llama-tiny           # built-in / package.module:factory / hf:DIR (needs export) or a .onnx file
        steps: [export, {quantize: {format: fp8-e4m3}}, {partition: {tp: 2}}, verify]
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from maia_onnx.batch.steps import STEPS
from maia_onnx.errors import UserError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
TOP_LEVEL_KEYS = ("version", "defaults", "jobs", "cache_dir", "output_dir")
JOB_KEYS = ("name", "model", "steps")
STEP_ORDER = "export -> quantize -> compile|partition -> verify"


class JobFileError(UserError):
    """The job file is missing, unreadable or does not follow the schema."""


@dataclass
class Step:
    name: str
    options: dict = field(default_factory=dict)


@dataclass
class Job:
    name: str
    model: str
    steps: list[Step]

    def to_dict(self) -> dict:
        return {"name": self.name, "model": self.model, "steps": [{"name": s.name, "options": s.options} for s in self.steps]}

    @staticmethod
    def from_dict(data: dict) -> "Job":
        return Job(data["name"], data["model"], [Step(s["name"], dict(s["options"])) for s in data["steps"]])


@dataclass
class JobFile:
    path: Path
    jobs: list[Job]
    cache_dir: Path
    output_dir: Path


def is_model_file(model: str) -> bool:
    """A job's model is an ONNX file (no export step) rather than a model reference."""
    return model.endswith(".onnx")


def parse_job_file(path: str | os.PathLike, cache_dir: str | None = None, output_dir: str | None = None) -> JobFile:
    """Read and validate a YAML/JSON job file; every error names the file, the job/step and the fix."""
    path = Path(path)
    data = _load(path)
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise JobFileError(f"{path.name}: unknown top-level key {unknown[0]!r} (keys: {', '.join(TOP_LEVEL_KEYS)})")
    if data.get("version", 1) != 1:
        raise JobFileError(f"{path.name}: version {data.get('version')!r} is not supported (use version: 1)")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict) or any(k not in STEPS or not isinstance(v, dict) for k, v in defaults.items()):
        raise JobFileError(f"{path.name}: defaults must map step names ({', '.join(STEPS)}) to option mappings")
    jobs_raw = data.get("jobs")
    if not isinstance(jobs_raw, list) or not jobs_raw:
        raise JobFileError(f"{path.name}: 'jobs' must be a non-empty list")
    jobs: list[Job] = []
    for i, raw in enumerate(jobs_raw):
        job = _parse_job(raw, path, f"jobs[{i}]", defaults)
        if any(j.name == job.name for j in jobs):
            raise JobFileError(f"{path.name}: jobs[{i}]: duplicate job name {job.name!r}: names must be unique")
        jobs.append(job)
    base = path.parent
    cache = Path(cache_dir or data.get("cache_dir") or base / ".maia-batch-cache")
    out = Path(output_dir or data.get("output_dir") or base / "batch-out")
    return JobFile(path, jobs, cache if cache.is_absolute() else base / cache, out if out.is_absolute() else base / out)


def _load(path: Path) -> dict:
    if not path.is_file():
        raise JobFileError(f"job file not found: {path} (check the path)")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise JobFileError(f"{path.name}: cannot parse ({type(exc).__name__}: {str(exc).splitlines()[0]}); fix the syntax") from exc
    if not isinstance(data, dict):
        raise JobFileError(f"{path.name}: the top level must be a mapping with a 'jobs' list")
    return data


def _parse_job(raw: Any, path: Path, where: str, defaults: dict) -> Job:
    if not isinstance(raw, dict):
        raise JobFileError(f"{path.name}: {where}: a job is a mapping with name, model and steps")
    extra = sorted(set(raw) - set(JOB_KEYS))
    if extra:
        raise JobFileError(f"{path.name}: {where}: unknown key {extra[0]!r} (a job has name, model, steps)")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise JobFileError(f"{path.name}: {where}: 'name' must be letters, digits, '_', '.', '-' (got {name!r})")
    where = f"job {name!r}"
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise JobFileError(f"{path.name}: {where}: 'model' is required (built-in name, module:factory, hf:DIR or a .onnx file)")
    if is_model_file(model) and not os.path.isabs(model):
        model = str((path.parent / model).resolve())
    steps_raw = raw.get("steps")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise JobFileError(f"{path.name}: {where}: 'steps' must be a non-empty list (e.g. [export, quantize, verify])")
    steps = [_parse_step(s, path, f"{where} steps[{k}]", defaults) for k, s in enumerate(steps_raw)]
    _check_chain(model, steps, path, where)
    return Job(name, model, steps)


def _parse_step(raw: Any, path: Path, where: str, defaults: dict) -> Step:
    if isinstance(raw, str):
        name, options = raw, {}
    elif isinstance(raw, dict) and len(raw) == 1:
        name, options = next(iter(raw.items()))
        options = {} if options is None else options
    else:
        raise JobFileError(f"{path.name}: {where}: a step is a name or a one-key mapping like {{quantize: {{format: fp8-e4m3}}}}")
    if name not in STEPS:
        raise JobFileError(f"{path.name}: {where}: unknown step {name!r} (use one of {', '.join(STEPS)})")
    if not isinstance(options, dict):
        raise JobFileError(f"{path.name}: {where}: options of step {name!r} must be a mapping, got {type(options).__name__}")
    merged = {**(defaults.get(name) or {}), **options}
    allowed = STEPS[name].options
    unknown = sorted(set(merged) - allowed)
    if unknown:
        raise JobFileError(f"{path.name}: {where}: step {name!r} has no option {unknown[0]!r} "
                           f"(options: {', '.join(sorted(allowed))})")
    if STEPS[name].check is not None:
        try:
            STEPS[name].check(merged)
        except UserError as exc:
            raise JobFileError(f"{path.name}: {where}: step {name!r}: {exc}") from exc
    return Step(name, merged)


def _check_chain(model: str, steps: list[Step], path: Path, where: str) -> None:
    names = [s.name for s in steps]
    if is_model_file(model):
        if "export" in names:
            raise JobFileError(f"{path.name}: {where}: model {Path(model).name} is already ONNX: drop the export step")
    elif names[0] != "export":
        raise JobFileError(f"{path.name}: {where}: model {model!r} is not a .onnx file: the first step must be export")
    if names.count("export") > 1 or ("export" in names and names.index("export") != 0):
        raise JobFileError(f"{path.name}: {where}: export can only be the first step")
    kind = "model"
    for name in names:
        if STEPS[name].needs_model and kind != "model":
            raise JobFileError(f"{path.name}: {where}: {name} needs a model file but follows {kind!r} output "
                               f"(order: {STEP_ORDER})")
        if STEPS[name].produces != "report":  # verify leaves the artifact it checked as the chain's output
            kind = STEPS[name].produces
