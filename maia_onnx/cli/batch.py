"""`maia-onnx batch`: run a job file of conversions in parallel (local processes or Ray), resumable.

The work lives in maia_onnx.batch; this module draws its progress events (bars on a terminal, plain lines
otherwise) and prints the plan and the report.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

import click
from tqdm import tqdm

from maia_onnx import batch
from maia_onnx.cli.options import echo_json, json_option
from maia_onnx.errors import MaiaOnnxError
from maia_onnx.report import format_table


class Progress:
    """One bar per running job plus an overall bar on a terminal; plain lines such as
    ``[4/10] llama-fp8: running verify`` otherwise. Fed by the runner's :class:`maia_onnx.batch.JobUpdate` events."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done: dict[str, int] = {}
        self.bars: dict[str, Any] = {}
        self.overall = None
        self.free_positions = list(range(1, 64))
        self.ncols = None
        if self.tty:
            tqdm.monitor_interval = 0
            # a pty that reports 0 columns (e.g. under `script`) would make tqdm print empty bars
            try:
                columns = os.get_terminal_size(self.stream.fileno()).columns
            except (OSError, ValueError, AttributeError):
                columns = 0
            self.ncols = 100 if columns <= 0 else None

    def update(self, event: batch.JobUpdate) -> None:
        delta = event.finished - self.done.get(event.job, 0)
        self.done[event.job] = event.finished
        if not self.tty:
            what = f"running {event.running}" if event.running else event.status
            self.stream.write(f"[{sum(self.done.values())}/{event.batch_total}] {event.job}: {what}\n")
            self.stream.flush()
            return
        if self.overall is None:
            self.overall = tqdm(total=event.batch_total, desc="all jobs", position=0, file=self.stream, leave=True,
                                ncols=self.ncols)
        if event.job not in self.bars and event.status == "running":
            self.bars[event.job] = tqdm(total=event.total, desc=event.job[:28], position=self.free_positions.pop(0),
                                        file=self.stream, leave=False, ncols=self.ncols)
        bar = self.bars.get(event.job)
        if bar is not None:
            bar.update(event.finished - bar.n)
            bar.set_postfix_str(event.running or event.status)
        if delta:
            self.overall.update(delta)
        if event.status in ("ok", "failed") and event.job in self.bars:
            bar = self.bars.pop(event.job)
            self.free_positions.insert(0, bar.pos if isinstance(bar.pos, int) else 1)
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        if self.overall is not None:
            self.overall.close()


@click.command("batch")
@click.argument("job_file", type=click.Path())
@click.option("-j", "--jobs", "workers", default=1, show_default=True, type=int, help="Jobs to run in parallel.")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--address", default=None, help="Ray cluster address (default: start a local Ray instance).")
@click.option("--cache-dir", default=None, type=click.Path(), help="Content-addressed cache (default: from the job file).")
@click.option("--output-dir", default=None, type=click.Path(), help="Per-job links, logs and report.json (default: from the job file).")
@click.option("--job", "only", multiple=True, help="Run only this job (repeatable).")
@click.option("--dry-run", is_flag=True, help="Print the plan (steps, cached or to run) and exit.")
@click.option("--no-verify-cache", is_flag=True, help="Trust cached objects without re-hashing their content.")
@click.option("--no-progress", is_flag=True, help="No progress bars / lines on stderr.")
@json_option
def command(job_file, workers, backend, address, cache_dir, output_dir, only, dry_run, no_verify_cache, no_progress, as_json):
    """Run the jobs of JOB_FILE (YAML or JSON; see docs/batch.md). Exit code 1 when a job failed."""
    if dry_run:
        print_plan(batch.dry_run(job_file, cache_dir, output_dir), as_json)
        return
    progress = None if no_progress or as_json else Progress()
    try:
        report = batch.run_batch(job_file, workers=workers, backend=backend, address=address, cache_dir=cache_dir,
                                 output_dir=output_dir, verify_cache=not no_verify_cache, only=only,
                                 on_update=progress.update if progress else None)
    finally:
        if progress is not None:
            progress.close()
    print_report(report, as_json)
    if report.failed:
        raise MaiaOnnxError(f"{len(report.failed)} of {len(report.jobs)} jobs failed: "
                            + ", ".join(f"{j['name']} ({j.get('error')})" for j in report.failed)[:400]
                            + f"; logs in {report.output_dir}/<job>/log.txt")


def print_plan(plan: dict, as_json: bool) -> None:
    if as_json:
        echo_json(plan)
        return
    rows = [{"job": j["name"], "step": s["step"], "state": s["state"], "key": (s["key"] or "?")[:12]}
            for j in plan["jobs"] for s in j["steps"]]
    click.echo(format_table(rows, ["job", "step", "state", "key"], title=f"plan (cache {plan['cache_dir']})"))


def print_report(report: batch.BatchReport, as_json: bool) -> None:
    data = report.to_dict()
    if as_json:
        echo_json(data)
        return
    rows = []
    for j in report.jobs:
        steps = j.get("steps", [])
        metric = next((s["metrics"]["min_cosine"] for s in reversed(steps)
                       if (s.get("metrics") or {}).get("min_cosine") is not None), None)
        rows.append({"job": j["name"], "status": j.get("status"), "time_s": round(j.get("duration_s") or 0, 2),
                     "steps": " ".join(f"{s['step']}:{s.get('status')}" for s in steps),
                     "min_cosine": "" if metric is None else metric, "error": j.get("error") or ""})
    click.echo(format_table(rows, ["job", "status", "time_s", "steps", "min_cosine", "error"],
                            title=f"batch: {data['ok']} ok, {data['failed']} failed in {data['duration_s']:.1f}s "
                                  f"({report.backend}, -j {report.workers}); report {report.output_dir}/report.json"))
