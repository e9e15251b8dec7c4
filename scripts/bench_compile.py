"""Benchmark: compile quality per model, before and after (device partitions, device-node fraction, fused ops).

"Before" places the model with the capability code of ``--before-rev`` (default: the last commit before the
compile-quality work) and no folding or fusion; "after" is today's ``compile_model`` with its self-check. Models:
the built-in llama-tiny, unet-tiny, yolo-tiny and tiny seeded Hugging Face decoders (models/zoo.py, plus Mistral),
each FP32 and FP8 (``maia-onnx quantize`` defaults, synthesized calibration).

    python scripts/bench_compile.py [--models llama-tiny,hf-llama,...] [--before-rev aabed68]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = ["llama-tiny", "unet-tiny", "yolo-tiny"]
HF = ["hf-llama", "hf-qwen2", "hf-phi3", "hf-gemma2", "hf-gpt2", "hf-mistral"]
DIMS = {"batch": 1, "seq": 8, "past": 4}


def _before_capability(rev: str):
    """runtime/capability.py (and its table) as of ``rev``, imported under its own module name."""
    directory = Path(tempfile.mkdtemp())
    for name in ("capability.py", "capability_table.json"):
        source = subprocess.run(["git", "show", f"{rev}:runtime/{name}"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
        (directory / name).write_text(source)
    path = directory / "capability.py"
    spec = importlib.util.spec_from_file_location("maia_capability_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class body runs
    spec.loader.exec_module(module)
    return module


def _export(name: str, work: Path) -> Path:
    from maia_onnx.export import export_builtin, export_model

    out = work / f"{name}.onnx"
    if name in BUILTIN:
        export_builtin(name, out)
        return out
    arch = name.removeprefix("hf-")
    ckpt = work / f"{arch}_ckpt"
    if arch == "mistral":
        import torch
        import transformers

        torch.manual_seed(0)
        transformers.MistralForCausalLM(transformers.MistralConfig(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(ckpt)
    else:
        from maia_onnx.models.zoo import write_checkpoint

        write_checkpoint(arch, ckpt)
    export_model(f"hf:{ckpt}", out)
    return out


def _quantize(path: Path) -> Path:
    from maia_onnx.quantize import quantize_model

    out = path.with_name(path.stem + "-fp8.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_model(path, out, format="fp8-e4m3", show_progress=False, evaluate=False)
    return out


def _fraction(summary: dict) -> float:
    return summary["nodes_device"] / max(1, summary["nodes_device"] + summary["nodes_cpu"])


def _flop_fraction(summary: dict) -> float:
    return summary["flops_device"] / max(1e-30, summary["flops_device"] + summary["flops_cpu"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(BUILTIN + HF))
    parser.add_argument("--before-rev", default="aabed68", help="git revision whose placement is 'before'")
    args = parser.parse_args()

    import onnx_ir as ir

    from maia_onnx.runtime.compile import compile_model

    before_cap = _before_capability(args.before_rev)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            fp32 = _export(name, work)
            for precision, path in (("fp32", fp32), ("fp8", _quantize(fp32))):
                before = before_cap.get_capability(ir.load(path), "maia100", dims=DIMS).summary()
                t0 = time.perf_counter()
                result = compile_model(path, work / f"{path.stem}-ctx.onnx", dims=DIMS)
                seconds = time.perf_counter() - t0
                after = result.summary()
                fused = {s.rule: s.applied for s in result.fusions.rules if s.applied}
                refused = sum(sum(s.refused.values()) for s in result.fusions.rules)
                rows.append((name, precision, before["partitions"], after["partitions"], _fraction(before), _fraction(after),
                             before["nodes_device"] + before["nodes_cpu"], after["nodes_device"] + after["nodes_cpu"],
                             ", ".join(f"{k} {v}" for k, v in fused.items()) or "-", refused,
                             after["verify_max_rel"], seconds, _flop_fraction(after)))
                print(f"{name} {precision}: {rows[-1]}", file=sys.stderr)
    print("| model | precision | partitions before | after | device-node fraction before | after | device-FLOP fraction after "
          "| nodes before | after | fused (applied) | refused | verify max rel | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.3f} | {r[5]:.3f} | {r[12]:.4f} | {r[6]} | {r[7]} | {r[8]} "
              f"| {r[9]} | {r[10]:.1e} | {r[11]:.1f} |")


if __name__ == "__main__":
    main()
