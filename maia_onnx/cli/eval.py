"""`maia-onnx eval MODEL --ref REF.onnx --data text:FILE|images:DIR|x.npz`: task metrics of a model against its reference."""

from __future__ import annotations

import click

from maia_onnx.cli.options import echo_json, json_option, model_argument
from maia_onnx.evaluate import evaluate_files
from maia_onnx.report import format_table


def _size(text):
    if text is None:
        return None
    try:
        h, w = (int(x) for x in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not H,W (e.g. 224,224)") from None
    return h, w


@click.command("eval", help="Evaluate MODEL against REF on real data: perplexity/KL/top-1 for decoders, pooled-embedding "
                            "cosine and neighbour agreement for encoders, per-output cosine and error for every model.")
@model_argument()
@click.option("--ref", "reference", required=True, type=click.Path(dir_okay=False), help="Reference model (e.g. the FP32 export).")
@click.option("--data", required=True, help="text:FILE (one sample a line, or JSONL with 'text'), images:DIR, x.npz, a directory of .npz, or random.")
@click.option("--tokenizer", type=click.Path(file_okay=False), default=None, help="Tokenizer directory (default: the hf: directory recorded at export).")
@click.option("--seq-len", type=int, default=128, show_default=True, help="Truncate text samples to this many tokens.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Samples per batch (padding is masked out of every metric).")
@click.option("--samples", "num_samples", type=int, default=None, help="Use only the first N samples.")
@click.option("--image-size", default=None, help="H,W for images when the model's input has symbolic height/width.")
@json_option
def command(model, reference, data, tokenizer, seq_len, batch_size, num_samples, image_size, as_json):
    report = evaluate_files(model, reference, data, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size,
                            num_samples=num_samples, image_size=_size(image_size))
    if as_json:
        echo_json(report)
        return
    click.echo(f"{report['model']} vs {report['reference']} on {report['data']} ({report['task']})")
    if report["task_metrics"]:
        rows = [{"metric": k, "value": v} for k, v in report["task_metrics"].items()]
        click.echo(format_table(rows, ["metric", "value"], title="Task metrics"))
    rows = [{"output": name, **values} for name, values in report["outputs"].items()]
    click.echo(format_table(rows, ["output", "cosine", "rel_err", "max_abs_err", "top1_agree"], title="Outputs"))
