"""Batch conversion jobs: a job file of step chains, run in parallel with a crash-safe content-addressed cache.

Job file (YAML or JSON; schema in docs/batch.md)::

    version: 1
    cache_dir: .maia-cache          # optional (default: <job file dir>/.maia-batch-cache)
    output_dir: batch-out           # optional (default: <job file dir>/batch-out)
    defaults: {quantize: {format: fp8-e4m3}}   # per-step options merged under each job's own
    jobs:
      - name: llama-fp8-tp2
        model: llama-tiny           # built-in / package.module:factory / hf:DIR (needs export) or a .onnx file
        steps: [export, {quantize: {format: fp8-e4m3}}, {partition: {tp: 2}}, verify]

Cache: every step's output lives in ``<cache>/objects/<key>/`` where the key hashes the step name, its
options, the *content* hash of its input artifact and the tool version. A step is built in
``<cache>/tmp/`` and renamed into place only after its ``meta.json`` (with the artifact's own content
hash) is written, so a kill at any moment never exposes a half-written artifact; a re-run skips steps
whose object exists and still matches its recorded content hash.

Backends: local worker processes (``-j N``; a crashing job fails alone) or Ray tasks (``batch_ray``).
Both run :func:`run_job` and report progress through ``<output>/<job>/status.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from maia_onnx.errors import MaiaOnnxError, UserError

STEPS = ("export", "quantize", "partition", "compile", "verify")
MODEL_STEPS = ("quantize", "partition", "compile")  # need a model file as input
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
META = "meta.json"
STATUS = "status.json"
RESULT = "result.json"
REPORT = "report.json"
SIDE_REPORTS = ("quantize_report.json",)  # informational files beside an artifact, not part of its content


class JobFileError(UserError):
    """The job file is missing, unreadable or does not follow the schema."""


class StepFailed(MaiaOnnxError):
    """A step raised: the job stops there, the others go on."""


def tool_version() -> str:
    from maia_onnx import __version__

    return f"maia-onnx {__version__}"


# ---------------------------------------------------------------------------------------------- schema


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


def _step_parameters(step: str) -> set[str] | None:
    """Option names a step accepts: the keyword parameters of the Python API it calls."""
    try:
        if step == "export":
            from maia_onnx.export import export_model as fn
        elif step == "quantize":
            from maia_onnx.quantize import quantize_model as fn
        elif step == "compile":
            from maia_onnx.runtime.compile import compile_model as fn
        elif step == "partition":
            return {"tp", "pp", "balance"}
        else:
            return {"min_cosine", "seed", "dims", "device"}
    except ImportError:
        return None  # that engineer's API is not installed here: options are checked when the step runs
    internal = {"ref", "out_path", "model_or_path", "model", "output", "progress", "show_progress", "report_path",
                "check"}
    return {p for p in inspect.signature(fn).parameters if p not in internal}


def _where(path: Path, where: str) -> str:
    return f"{path.name}: {where}"


def _parse_step(raw: Any, path: Path, where: str, defaults: dict) -> Step:
    if isinstance(raw, str):
        name, options = raw, {}
    elif isinstance(raw, dict) and len(raw) == 1:
        name, options = next(iter(raw.items()))
        options = {} if options is None else options
    else:
        raise JobFileError(f"{_where(path, where)}: a step is a name or a one-key mapping like {{quantize: {{format: fp8-e4m3}}}}")
    if name not in STEPS:
        raise JobFileError(f"{_where(path, where)}: unknown step {name!r} (use one of {', '.join(STEPS)})")
    if not isinstance(options, dict):
        raise JobFileError(f"{_where(path, where)}: options of step {name!r} must be a mapping, got {type(options).__name__}")
    merged = {**(defaults.get(name) or {}), **options}
    allowed = _step_parameters(name)
    if allowed is not None:
        unknown = sorted(set(merged) - allowed)
        if unknown:
            raise JobFileError(f"{_where(path, where)}: step {name!r} has no option {unknown[0]!r} "
                               f"(options: {', '.join(sorted(allowed))})")
    return Step(name, merged)


def _is_model_file(model: str) -> bool:
    return model.endswith(".onnx")


def parse_job_file(path: str | os.PathLike, cache_dir: str | None = None, output_dir: str | None = None) -> JobFile:
    """Read and validate a YAML/JSON job file; every error names the file, the job/step and the fix."""
    path = Path(path)
    if not path.is_file():
        raise JobFileError(f"job file not found: {path} (check the path)")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise JobFileError(f"{path.name}: cannot parse ({type(exc).__name__}: {str(exc).splitlines()[0]}); fix the syntax") from exc
    if not isinstance(data, dict):
        raise JobFileError(f"{path.name}: the top level must be a mapping with a 'jobs' list")
    unknown = sorted(set(data) - {"version", "defaults", "jobs", "cache_dir", "output_dir"})
    if unknown:
        raise JobFileError(f"{path.name}: unknown top-level key {unknown[0]!r} (keys: version, defaults, jobs, cache_dir, output_dir)")
    if data.get("version", 1) != 1:
        raise JobFileError(f"{path.name}: version {data.get('version')!r} is not supported (use version: 1)")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict) or any(k not in STEPS or not isinstance(v, dict) for k, v in defaults.items()):
        raise JobFileError(f"{path.name}: defaults must map step names ({', '.join(STEPS)}) to option mappings")
    jobs_raw = data.get("jobs")
    if not isinstance(jobs_raw, list) or not jobs_raw:
        raise JobFileError(f"{path.name}: 'jobs' must be a non-empty list")
    jobs, names = [], set()
    for i, raw in enumerate(jobs_raw):
        where = f"jobs[{i}]"
        if not isinstance(raw, dict):
            raise JobFileError(f"{_where(path, where)}: a job is a mapping with name, model and steps")
        extra = sorted(set(raw) - {"name", "model", "steps"})
        if extra:
            raise JobFileError(f"{_where(path, where)}: unknown key {extra[0]!r} (a job has name, model, steps)")
        name = raw.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise JobFileError(f"{_where(path, where)}: 'name' must be letters, digits, '_', '.', '-' (got {name!r})")
        if name in names:
            raise JobFileError(f"{_where(path, where)}: duplicate job name {name!r}: names must be unique")
        names.add(name)
        where = f"job {name!r}"
        model = raw.get("model")
        if not isinstance(model, str) or not model:
            raise JobFileError(f"{_where(path, where)}: 'model' is required (built-in name, module:factory, hf:DIR or a .onnx file)")
        if _is_model_file(model) and not os.path.isabs(model):
            model = str((path.parent / model).resolve())
        steps_raw = raw.get("steps")
        if not isinstance(steps_raw, list) or not steps_raw:
            raise JobFileError(f"{_where(path, where)}: 'steps' must be a non-empty list (e.g. [export, quantize, verify])")
        steps = [_parse_step(s, path, f"{where} steps[{k}]", defaults) for k, s in enumerate(steps_raw)]
        _check_chain(model, steps, path, where)
        jobs.append(Job(name, model, steps))
    base = path.parent
    cache = Path(cache_dir or data.get("cache_dir") or base / ".maia-batch-cache")
    out = Path(output_dir or data.get("output_dir") or base / "batch-out")
    return JobFile(path, jobs, cache if cache.is_absolute() else base / cache, out if out.is_absolute() else base / out)


def _check_chain(model: str, steps: list[Step], path: Path, where: str) -> None:
    names = [s.name for s in steps]
    if _is_model_file(model):
        if "export" in names:
            raise JobFileError(f"{_where(path, where)}: model {Path(model).name} is already ONNX: drop the export step")
    elif names[0] != "export":
        raise JobFileError(f"{_where(path, where)}: model {model!r} is not a .onnx file: the first step must be export")
    if names.count("export") > 1 or ("export" in names and names.index("export") != 0):
        raise JobFileError(f"{_where(path, where)}: export can only be the first step")
    kind = "model"
    for step in names:
        if step in MODEL_STEPS and kind != "model":
            raise JobFileError(f"{_where(path, where)}: {step} needs a model file but follows {kind!r} output "
                               f"(order: export -> quantize -> compile|partition -> verify)")
        if step == "partition":
            kind = "partition"
        elif step == "compile":
            kind = "compiled model"


# ---------------------------------------------------------------------------------------------- hashing


def _sha_bytes(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def tree_hash(path: Path, exclude: Sequence[str] = (META,)) -> str:
    """Content hash of a file or directory tree: relative names + file contents, names sorted."""
    from maia_onnx.io import sha256_file

    path = Path(path)
    if path.is_file():
        return _sha_bytes(b"file", sha256_file(path).encode())
    entries = []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel in exclude:
            continue
        entries.append(rel.encode() + b"\0" + sha256_file(f).encode())
    return _sha_bytes(b"tree", *entries)


def object_hash(directory: Path) -> str:
    """Content of a cache object: the artifact with its external data / side files, not meta or reports
    (reports carry timings, so they differ between two otherwise identical builds)."""
    return tree_hash(directory, exclude=(META, *SIDE_REPORTS))


def source_hash(model: str) -> str:
    """Content hash of a job's starting point: the .onnx (+ external data), an HF directory, or model code."""
    from maia_onnx.io import model_content_hash

    if _is_model_file(model):
        if not Path(model).is_file():
            raise UserError(f"model file not found: {model} (check the job's model path)")
        try:
            return _sha_bytes(b"onnx", model_content_hash(model).encode())
        except Exception:  # unreadable ONNX: hash the bytes; the first step reports the real problem
            return _sha_bytes(b"file", tree_hash(Path(model)).encode())
    if model.startswith("hf:"):
        directory = Path(model[3:])
        if not directory.is_dir():
            raise UserError(f"HF directory not found: {directory} (check the job's model: hf:DIR)")
        return _sha_bytes(b"hf", tree_hash(directory, exclude=()).encode())
    # built-in name or package.module:factory: the code that defines the model is its content
    files: list[Path] = []
    module_name = model.split(":", 1)[0] if ":" in model else None
    if module_name:
        import importlib.util

        spec = importlib.util.find_spec(module_name)
        if spec is not None and spec.origin:
            files.append(Path(spec.origin))
    else:
        models_dir = Path(__file__).resolve().parent.parent / "models"
        try:
            import maia_onnx.models as models_pkg

            models_dir = Path(models_pkg.__file__).resolve().parent
        except ImportError:
            pass
        files += sorted(models_dir.glob("*.py"))
    return _sha_bytes(b"code", model.encode(), *[f.read_bytes() for f in files if f.is_file()])


def step_key(step: Step, input_hash: str, extra: Mapping[str, Any] | None = None) -> str:
    """Cache key: step name + options + input content hash + tool version (never names or paths alone)."""
    payload = {"step": step.name, "options": step.options, "input": input_hash, "tool": tool_version(),
               "extra": dict(extra or {})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- cache


class Cache:
    """``objects/<key>/`` (complete, with meta.json) and ``tmp/`` (in progress; never read)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"

    def ensure(self) -> None:
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.objects / key[:2] / key

    def lookup(self, key: str, verify: bool = True) -> dict | None:
        """The meta of a complete object whose content still matches, else None (a corrupt one is removed)."""
        obj = self.path(key)
        meta_path = obj / META
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = None
        if meta is None or "artifact" not in meta or not (obj / meta["artifact"]).exists() or (
                verify and object_hash(obj) != meta.get("content_hash")):
            self._discard(obj)
            return None
        return meta

    def _discard(self, obj: Path) -> None:
        trash = self.tmp / f"trash-{obj.name}-{os.getpid()}-{time.time_ns()}"
        with contextlib.suppress(OSError):
            os.replace(obj, trash)
            shutil.rmtree(trash, ignore_errors=True)

    @contextlib.contextmanager
    def building(self, key: str):
        """A fresh temp dir under tmp/; :meth:`commit` moves it into objects/ atomically."""
        self.ensure()
        work = Path(tempfile.mkdtemp(prefix=f"{key[:16]}.{os.getpid()}.", dir=self.tmp))
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def commit(self, key: str, work: Path, meta: dict) -> dict:
        meta = {**meta, "key": key, "content_hash": object_hash(work)}
        with open(work / META, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        _fsync_tree(work)
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(work, final)  # atomic; fails if another worker committed the same key first
        except OSError:
            existing = self.lookup(key)
            if existing is None:
                raise
            return existing
        with contextlib.suppress(OSError):
            fd = os.open(final.parent, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        return meta

    @contextlib.contextmanager
    def key_lock(self, key: str):
        """Exclusive per-key lock (flock: released by the kernel even on SIGKILL) so two jobs needing the
        same step build it once: the second waits and then finds it cached."""
        import fcntl

        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{key}.lock", "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def clean_stale(self) -> int:
        """Remove temp dirs left by processes that no longer run (a killed earlier batch)."""
        removed = 0
        if not self.tmp.is_dir():
            return 0
        for entry in self.tmp.iterdir():
            match = re.match(r"^[0-9a-f]{16}\.(\d+)\.", entry.name)
            pid = int(match.group(1)) if match else None
            if pid is None or not _pid_alive(pid):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with contextlib.suppress(OSError):
                fd = os.open(f, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)


# ---------------------------------------------------------------------------------------------- steps


def _artifact(meta: dict, cache: Cache) -> Path:
    return cache.path(meta["key"]) / meta["artifact"]


def _run_export(model: str, options: dict, work: Path, ctx: dict) -> tuple[str, dict]:
    from maia_onnx.export import export_model

    result = export_model(model, work / "model.onnx", **options)
    parity = getattr(result, "parity", None) or {}
    cos = [v.get("cosine") for v in parity.values() if isinstance(v, dict) and v.get("cosine") is not None]
    return "model.onnx", {"parity_min_cosine": min(cos) if cos else None,
                          "parity_max_abs": max((v.get("max_abs", 0) for v in parity.values() if isinstance(v, dict)), default=None)}


def _run_quantize(source: Path, options: dict, work: Path, ctx: dict) -> tuple[str, dict]:
    from maia_onnx.quantize import quantize_model

    result = quantize_model(source, work / "model.onnx", show_progress=False, **options)
    report = result.report or {}
    metrics = {}
    for key in ("min_cosine", "cosine", "accuracy", "size_ratio", "bytes_ratio"):
        if key in report and isinstance(report[key], (int, float)):
            metrics[key] = report[key]
    acc = report.get("accuracy") if isinstance(report.get("accuracy"), dict) else None
    if acc:
        for key in ("min_cosine", "cosine", "max_abs"):
            if isinstance(acc.get(key), (int, float)):
                metrics[key] = acc[key]
    (work / "quantize_report.json").write_text(json.dumps(_plain(report), indent=2, sort_keys=True, default=str))
    return "model.onnx", metrics


def _run_partition(source: Path, options: dict, work: Path, ctx: dict) -> tuple[str, dict]:
    from maia_onnx.io import load_model
    from maia_onnx.passes.pipeline_parallel import partition_model

    model = load_model(source)
    # the manifest records the source by content hash, not by its (cache) path, so artifacts are location-free
    partition_model(model, work / "partition", tp=int(options.get("tp", 1)), pp=int(options.get("pp", 1)),
                    balance=options.get("balance", "flops"), source_path=None, source_hash=ctx["input_hash"])
    return "partition", {"tp": int(options.get("tp", 1)), "pp": int(options.get("pp", 1))}


def _run_compile(source: Path, options: dict, work: Path, ctx: dict) -> tuple[str, dict]:
    from maia_onnx.runtime.compile import compile_model

    result = compile_model(source, work / "model.onnx", **options)
    summary = result.summary() if hasattr(result, "summary") else {}
    metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return "model.onnx", metrics


def _verify_dims(model) -> dict:
    dims = {"batch": 1, "seq": 8, "past": 4}
    for value in model.graph.inputs:
        for d in value.shape or ():
            if not isinstance(d, int):
                dims.setdefault(str(d), 2)
    return dims


def _run_verify(source: Path, options: dict, work: Path, ctx: dict) -> tuple[str, dict]:
    import numpy as np

    from maia_onnx.io import load_model
    from maia_onnx.ortutil import compare_outputs, make_inputs, run_model

    reference_path = Path(ctx["reference"])
    reference = load_model(reference_path)
    dims = {**_verify_dims(reference), **(options.get("dims") or {})}
    feeds = make_inputs(reference, seed=int(options.get("seed", 0)), dims=dims)
    expected = run_model(reference_path, feeds)
    if source.is_dir():
        from maia_onnx.runtime.executor import run_partition

        actual = run_partition(source, feeds)
    else:
        model = load_model(source)
        if any(n.op_type == "EPContext" for n in model.graph):
            from maia_onnx.runtime.session import session_for

            sess = session_for(source, providers=["MaiaExecutionProvider", "CPUExecutionProvider"],
                               device=options.get("device", "maia100"))
            names = [o.name for o in sess.get_outputs()]
            actual = dict(zip(names, sess.run(names, feeds)))
        else:
            actual = run_model(source, feeds)
    per_output = compare_outputs(expected, {k: np.asarray(v, dtype=np.float32) if np.asarray(v).dtype.kind == "f" else v
                                            for k, v in actual.items()})
    cosines = [v["cosine"] for v in per_output.values() if v.get("cosine") is not None]
    min_cos = min(cosines) if cosines else None
    metrics = {"min_cosine": min_cos, "max_abs": max((v["max_abs"] for v in per_output.values()), default=None),
               "outputs": per_output}
    (work / "verify.json").write_text(json.dumps(_plain(metrics), indent=2, sort_keys=True))
    threshold = float(options.get("min_cosine", 0.99))
    if min_cos is None or min_cos < threshold:
        raise StepFailed(f"verify: min cosine {min_cos} against the reference is below {threshold} "
                         f"(outputs: {', '.join(per_output)})")
    return "verify.json", {"min_cosine": min_cos, "max_abs": metrics["max_abs"]}


RUNNERS: dict[str, Callable] = {"export": _run_export, "quantize": _run_quantize, "partition": _run_partition,
                                "compile": _run_compile, "verify": _run_verify}


def _plain(obj):
    from maia_onnx.report import to_jsonable

    return to_jsonable(obj)


# ---------------------------------------------------------------------------------------------- one job


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(_plain(data), f, indent=2, sort_keys=True)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _link(job_dir: Path, index: int, step: str, target: Path) -> str:
    """``<output>/<job>/<i>-<step>`` -> the cached artifact (a relative symlink, swapped in atomically)."""
    link = job_dir / f"{index}-{step}"
    tmp = job_dir / f".{link.name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(os.path.relpath(target, job_dir), tmp)
    os.replace(tmp, link)
    return str(link)


def _limit_threads(threads: int | None) -> None:
    if not threads:
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if "torch" in sys.modules:  # otherwise torch reads OMP_NUM_THREADS when the export step imports it
        sys.modules["torch"].set_num_threads(threads)


def plan_job(job: Job, cache: Cache, verify: bool = True) -> list[dict]:
    """Keys and cache state of each step, as far as they can be known without running anything."""
    rows = []
    try:
        input_hash = source_hash(job.model)
    except UserError as exc:
        return [{"step": s.name, "key": None, "state": f"error: {exc}"} for s in job.steps]
    reference_hash = input_hash if _is_model_file(job.model) else None
    for step in job.steps:
        if input_hash is None:
            rows.append({"step": step.name, "key": None, "state": "will run (after upstream)"})
            continue
        extra = {"reference": reference_hash} if step.name == "verify" else None
        key = step_key(step, input_hash, extra)
        meta = cache.lookup(key, verify=verify)
        rows.append({"step": step.name, "key": key, "state": "cached" if meta else "will run",
                     "artifact": str(_artifact(meta, cache)) if meta else None})
        input_hash = meta["content_hash"] if meta else None
        if step.name == "export" and meta:
            reference_hash = meta["content_hash"]
    return rows


def run_job(job_data: dict, cache_root: str, output_root: str, threads: int | None = None,
            verify_cache: bool = True) -> dict:
    """Run one job's steps in order (in this process); never raises: failures land in the result."""
    job = Job.from_dict(job_data)
    _limit_threads(threads)
    cache = Cache(cache_root)
    cache.ensure()
    job_dir = Path(output_root) / job.name
    job_dir.mkdir(parents=True, exist_ok=True)
    log_path = job_dir / "log.txt"
    started = time.time()
    result: dict[str, Any] = {"name": job.name, "model": job.model, "status": "running", "error": None,
                              "log": str(log_path), "steps": [], "started": started}

    def status(state: str | None = None) -> None:
        if state:
            result["status"] = state
        result["duration_s"] = time.time() - started
        _write_json_atomic(job_dir / STATUS, result)

    with open(log_path, "a") as log:
        def say(msg: str) -> None:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
            log.flush()

        say(f"job {job.name}: model {job.model}, steps {[s.name for s in job.steps]}, pid {os.getpid()}")
        result["steps"] = [{"step": s.name, "status": "pending", "options": s.options} for s in job.steps]
        status("running")
        try:
            input_hash = source_hash(job.model)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            say(traceback.format_exc())
            result["error"] = f"{type(exc).__name__}: {_first_line(exc)}"
            for s in result["steps"]:
                s["status"] = "skipped"
            status("failed")
            return result
        source = Path(job.model) if _is_model_file(job.model) else None
        reference = source
        reference_hash = input_hash if source else None
        for index, step in enumerate(job.steps):
            row = result["steps"][index]
            extra = {"reference": reference_hash} if step.name == "verify" else None
            key = step_key(step, input_hash, extra)
            row.update({"key": key, "status": "running"})
            status()
            t0 = time.time()
            with cache.key_lock(key):
                meta, row_status = _cached_or_built(cache, key, step, index, job, input_hash, source, reference,
                                                    verify_cache, log, say, row, result, t0)
            if row_status == "failed":
                status("failed")
                return result
            artifact_path = _artifact(meta, cache)
            row["artifact"] = str(artifact_path)
            row["link"] = _link(job_dir, index, step.name, artifact_path)
            if step.name != "verify":
                source, input_hash = artifact_path, meta["content_hash"]
            if step.name == "export":
                reference, reference_hash = artifact_path, meta["content_hash"]
            status()
        status("ok")
        say(f"job {job.name}: ok in {result['duration_s']:.2f}s")
    return result


def _cached_or_built(cache, key, step, index, job, input_hash, source, reference, verify_cache, log, say, row,
                     result, t0):
    """Under the key's lock: reuse a verified object or build and commit it. Returns (meta, row status)."""
    meta = cache.lookup(key, verify=verify_cache)
    if meta is not None:
        row.update({"status": "cached", "duration_s": time.time() - t0, "metrics": meta.get("metrics", {}),
                    "build_s": meta.get("duration_s")})
        say(f"step {index} {step.name}: cached ({key[:12]})")
    else:
        say(f"step {index} {step.name}: running with {step.options} ({key[:12]})")
        try:
            with cache.building(key) as work:
                ctx = {"input_hash": input_hash, "reference": str(reference) if reference else None}
                arg = job.model if step.name == "export" else source
                with _capture(log):
                    artifact, metrics = RUNNERS[step.name](arg, dict(step.options), work, ctx)
                meta = cache.commit(key, work, {
                    "step": step.name, "options": step.options, "input_hash": input_hash,
                    "tool": tool_version(), "artifact": artifact, "metrics": _plain(metrics),
                    "duration_s": time.time() - t0, "job": job.name,
                })
        except Exception as exc:  # noqa: BLE001 - one failing job must not stop the batch
            say(traceback.format_exc())
            row.update({"status": "failed", "duration_s": time.time() - t0})
            result["error"] = f"{step.name}: {type(exc).__name__}: {_first_line(exc)}"
            for later in result["steps"][index + 1:]:
                later["status"] = "skipped"
            return None, "failed"
        row.update({"status": "done", "duration_s": time.time() - t0, "metrics": meta.get("metrics", {})})
        say(f"step {index} {step.name}: done in {row['duration_s']:.2f}s")
    return meta, row["status"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _capture(log):
    """Send the step's own stdout/stderr chatter to the job log (the terminal shows the progress bars)."""
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield


# ---------------------------------------------------------------------------------------------- local backend


def _worker_main(job_data: dict, cache_root: str, output_root: str, threads: int | None, verify_cache: bool) -> None:
    _die_with_parent()
    try:
        result = run_job(job_data, cache_root, output_root, threads, verify_cache)
    except BaseException as exc:  # noqa: BLE001 - last resort: still leave a result
        result = {"name": job_data["name"], "status": "failed", "error": f"{type(exc).__name__}: {_first_line(exc)}",
                  "steps": []}
    _write_json_atomic(Path(output_root) / job_data["name"] / RESULT, result)


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when the batch process dies, so a killed run leaves no orphans."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Progress:
    """One bar per running job plus an overall bar on a terminal; plain lines otherwise."""

    def __init__(self, jobs: Sequence[Job], enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total = sum(len(j.steps) for j in jobs)
        self.done_steps: dict[str, int] = {}
        self.seen: dict[str, tuple] = {}
        self.bars: dict[str, Any] = {}
        self.overall = None
        self.ncols = None
        if self.tty:
            from tqdm import tqdm

            tqdm.monitor_interval = 0
            # a pty that reports 0 columns (e.g. under `script`) would make tqdm print empty bars
            try:
                columns = os.get_terminal_size(self.stream.fileno()).columns
            except (OSError, ValueError, AttributeError):
                columns = 0
            if columns <= 0:
                self.ncols = 100
            self.overall = tqdm(total=self.total, desc="all jobs", position=0, file=self.stream, leave=True,
                                ncols=self.ncols)
        self.free_positions = list(range(1, 64))

    def update(self, name: str, state: dict | None, steps: int) -> None:
        if not self.enabled or state is None:
            return
        finished = sum(1 for s in state.get("steps", []) if s.get("status") in ("done", "cached", "failed", "skipped"))
        running = [s["step"] for s in state.get("steps", []) if s.get("status") == "running"]
        signature = (finished, tuple(running), state.get("status"))
        if self.seen.get(name) == signature:
            return
        self.seen[name] = signature
        delta = finished - self.done_steps.get(name, 0)
        self.done_steps[name] = finished
        if self.tty:
            from tqdm import tqdm

            if name not in self.bars and state.get("status") == "running":
                pos = self.free_positions.pop(0)
                self.bars[name] = tqdm(total=steps, desc=name[:28], position=pos, file=self.stream, leave=False,
                                       ncols=self.ncols)
            bar = self.bars.get(name)
            if bar is not None:
                bar.update(finished - bar.n)
                bar.set_postfix_str(running[0] if running else state.get("status", ""))
            if delta and self.overall is not None:
                self.overall.update(delta)
            if state.get("status") in ("ok", "failed") and name in self.bars:
                bar = self.bars.pop(name)
                self.free_positions.insert(0, bar.pos if isinstance(bar.pos, int) else 1)
                bar.close()
        else:
            total_done = sum(self.done_steps.values())
            what = f"running {running[0]}" if running else state.get("status", "")
            self.stream.write(f"[{total_done}/{self.total}] {name}: {what}\n")
            self.stream.flush()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        if self.overall is not None:
            self.overall.close()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_local(jobs: Sequence[Job], cache_root: Path, output_root: Path, workers: int = 1,
              progress: Progress | None = None, verify_cache: bool = True) -> list[dict]:
    """Each job in its own worker process, at most ``workers`` at a time; results in job order."""
    import multiprocessing as mp
    from multiprocessing import connection as mp_connection

    # forkserver: workers start from a clean process (no torch/ORT thread pools inherited through fork)
    ctx = mp.get_context("forkserver" if sys.platform.startswith("linux") else "spawn")
    if sys.platform.startswith("linux"):
        # imported once in the server, inherited by every worker (saves ~1 s of imports per job)
        ctx.set_forkserver_preload(["maia_onnx.batch", "numpy", "onnx", "onnx_ir", "onnxruntime", "maia_onnx.io",
                                    "maia_onnx.ortutil"])
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cpus // max(1, workers))
    pending = list(jobs)
    running: dict[str, Any] = {}
    results: dict[str, dict] = {}
    steps_of = {j.name: len(j.steps) for j in jobs}
    for job in jobs:  # a stale result from an earlier run must not be mistaken for this one's
        with contextlib.suppress(FileNotFoundError):
            os.unlink(output_root / job.name / RESULT)
    try:
        while pending or running:
            while pending and len(running) < max(1, workers):
                job = pending.pop(0)
                proc = ctx.Process(target=_worker_main, name=f"maia-batch-{job.name}",
                                   args=(job.to_dict(), str(cache_root), str(output_root), threads, verify_cache))
                proc.start()
                running[job.name] = proc
            # wake as soon as a worker exits (to start the next job at once), else every 0.2 s for progress
            mp_connection.wait([proc.sentinel for proc in running.values()], timeout=0.2)
            for name, proc in list(running.items()):
                if progress:
                    progress.update(name, _read_json(output_root / name / STATUS), steps_of[name])
                if proc.exitcode is None:
                    continue
                proc.join()
                result = _read_json(output_root / name / RESULT)
                if result is None:
                    state = _read_json(output_root / name / STATUS) or {"name": name, "steps": []}
                    result = {**state, "status": "failed",
                              "error": f"worker died (exit code {proc.exitcode}) during "
                                       f"{next((s['step'] for s in state.get('steps', []) if s.get('status') == 'running'), 'setup')}"}
                    for s in result.get("steps", []):
                        if s.get("status") in ("running", "pending"):
                            s["status"] = "failed" if s.get("status") == "running" else "skipped"
                results[name] = result
                del running[name]
                if progress:
                    progress.update(name, result, steps_of[name])
    finally:
        for proc in running.values():  # interrupted: stop our own workers
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [results[j.name] for j in jobs]


# ---------------------------------------------------------------------------------------------- driver


@dataclass
class BatchReport:
    jobs: list[dict]
    duration_s: float
    backend: str
    workers: int
    cache_dir: str
    output_dir: str

    @property
    def failed(self) -> list[dict]:
        return [j for j in self.jobs if j.get("status") != "ok"]

    def to_dict(self) -> dict:
        return {"jobs": self.jobs, "duration_s": self.duration_s, "backend": self.backend, "workers": self.workers,
                "cache_dir": self.cache_dir, "output_dir": self.output_dir,
                "ok": len(self.jobs) - len(self.failed), "failed": len(self.failed)}


def run_batch(job_file: str | os.PathLike, workers: int = 1, backend: str = "local", address: str | None = None,
              cache_dir: str | None = None, output_dir: str | None = None, show_progress: bool = True,
              verify_cache: bool = True, only: Sequence[str] | None = None) -> BatchReport:
    """Parse the job file, run every job (failures are isolated) and write ``<output>/report.json``."""
    spec = parse_job_file(job_file, cache_dir, output_dir)
    jobs = [j for j in spec.jobs if not only or j.name in only]
    if only and len(jobs) != len(set(only)):
        missing = sorted(set(only) - {j.name for j in jobs})
        raise UserError(f"--job {missing[0]!r} is not in {spec.path.name} (jobs: {', '.join(j.name for j in spec.jobs)})")
    if workers < 1:
        raise UserError(f"-j {workers} is invalid: use 1 or more workers")
    cache = Cache(spec.cache_dir)
    cache.ensure()
    cache.clean_stale()
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(jobs, enabled=show_progress)
    t0 = time.time()
    try:
        if backend == "local":
            results = run_local(jobs, spec.cache_dir, spec.output_dir, workers, progress, verify_cache)
        elif backend == "ray":
            from maia_onnx.batch_ray import run_ray

            results = run_ray(jobs, spec.cache_dir, spec.output_dir, workers, progress, address, verify_cache)
        else:
            raise UserError(f"unknown backend {backend!r}: use local or ray")
    finally:
        progress.close()
    report = BatchReport(results, time.time() - t0, backend, workers, str(spec.cache_dir), str(spec.output_dir))
    _write_json_atomic(spec.output_dir / REPORT, report.to_dict())
    return report


def dry_run(job_file: str | os.PathLike, cache_dir: str | None = None, output_dir: str | None = None) -> dict:
    """The plan: each job's steps with their cache keys and whether they are cached or will run."""
    spec = parse_job_file(job_file, cache_dir, output_dir)
    cache = Cache(spec.cache_dir)
    return {"cache_dir": str(spec.cache_dir), "output_dir": str(spec.output_dir),
            "jobs": [{"name": j.name, "model": j.model, "steps": plan_job(j, cache)} for j in spec.jobs]}
