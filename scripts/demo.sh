#!/usr/bin/env bash
# End-to-end main job on the built-in default model (llama-tiny):
# export -> inspect -> quantize FP8 (+ FP8 KV cache) -> eval vs FP32 -> partition TP2 x PP2 (self-verified) -> run the
# shards -> compile for Maia (EPContext, self-verified) -> run the compiled model -> analyze TP/PP what-if.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/_venv.sh
. scripts/_venv.sh
setup_venv "export,plot"

OUT="${DEMO_OUT:-demo_out}"
MODEL="${DEMO_MODEL:-llama-tiny}"
mkdir -p "$OUT"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/9 export $MODEL (torch dynamo exporter, parity vs PyTorch)"
maia-onnx export "$MODEL" -o "$OUT/model.onnx"

step "2/9 inspect"
maia-onnx inspect "$OUT/model.onnx"

step "3/9 quantize: FP8 E4M3 per-channel weights, calibrated activations, FP8 KV cache"
maia-onnx quantize "$OUT/model.onnx" -o "$OUT/model_fp8.onnx" --format fp8-e4m3 --calib random \
    --kv-cache fp8-e4m3 --report "$OUT/quant_report.json"

step "4/9 eval: perplexity, KL, next-token agreement of the FP8 model vs FP32 (random token ids: the model has no tokenizer)"
maia-onnx eval "$OUT/model_fp8.onnx" --ref "$OUT/model.onnx" --data random --samples 8

step "5/9 partition TP2 x PP2 (the shards are checked against the unsharded model before the directory appears)"
maia-onnx partition "$OUT/model_fp8.onnx" -o "$OUT/tp2pp2" --tp 2 --pp 2

step "6/9 run the 4 shards in-process vs the unsharded FP8 model"
maia-onnx run "$OUT/tp2pp2" --random --compare-to "$OUT/model_fp8.onnx"

step "7/9 compile for maia100 (EPContext)"
maia-onnx compile "$OUT/model_fp8.onnx" -o "$OUT/model_fp8_ctx.onnx" --device maia100

step "8/9 run the compiled model in the Maia shim session (emulated device numerics) vs plain ORT, with placement"
maia-onnx run "$OUT/model_fp8_ctx.onnx" --random --compare-to "$OUT/model_fp8.onnx" --report

step "9/9 analyze: roofline + TP/PP what-if on NVLink4 vs PCIe5 vs Maia Ethernet"
maia-onnx analyze "$OUT/model_fp8.onnx" --device maia100 --interconnect nvlink4,pcie5,maia-eth --top 5

printf '\nDemo artifacts in %s/\n' "$OUT"
