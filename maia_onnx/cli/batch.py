"""`maia-onnx batch`: run a job file of conversions in parallel (local processes or Ray), resumable."""

from __future__ import annotations

import click

from maia_onnx.cli.options import echo_json, json_option


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
    from maia_onnx import batch
    from maia_onnx.errors import MaiaOnnxError
    from maia_onnx.report import format_table

    if dry_run:
        plan = batch.dry_run(job_file, cache_dir, output_dir)
        if as_json:
            echo_json(plan)
            return
        rows = [{"job": j["name"], "step": s["step"], "state": s["state"], "key": (s["key"] or "?")[:12]}
                for j in plan["jobs"] for s in j["steps"]]
        click.echo(format_table(rows, ["job", "step", "state", "key"], title=f"plan (cache {plan['cache_dir']})"))
        return
    report = batch.run_batch(job_file, workers=workers, backend=backend, address=address, cache_dir=cache_dir,
                             output_dir=output_dir, show_progress=not no_progress and not as_json,
                             verify_cache=not no_verify_cache, only=only)
    data = report.to_dict()
    if as_json:
        echo_json(data)
    else:
        rows = []
        for j in report.jobs:
            steps = " ".join(f"{s['step']}:{s.get('status')}" for s in j.get("steps", []))
            metric = next((s.get("metrics", {}).get("min_cosine") for s in reversed(j.get("steps", []))
                           if isinstance(s.get("metrics"), dict) and s["metrics"].get("min_cosine") is not None), None)
            rows.append({"job": j["name"], "status": j.get("status"), "time_s": round(j.get("duration_s") or 0, 2),
                         "steps": steps, "min_cosine": "" if metric is None else metric, "error": j.get("error") or ""})
        click.echo(format_table(rows, ["job", "status", "time_s", "steps", "min_cosine", "error"],
                                title=f"batch: {data['ok']} ok, {data['failed']} failed in {data['duration_s']:.1f}s "
                                      f"({backend}, -j {workers}); report {report.output_dir}/report.json"))
    if report.failed:
        raise MaiaOnnxError(f"{len(report.failed)} of {len(report.jobs)} jobs failed: "
                            + ", ".join(f"{j['name']} ({j.get('error')})" for j in report.failed)[:400]
                            + f"; logs in {report.output_dir}/<job>/log.txt")
