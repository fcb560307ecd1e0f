#!/usr/bin/env bash
# GPU check: build the tiny bundles for this GPU's target, finish their TensorRT engines, check the engines against
# ONNX Runtime on the CPU (same inputs: the bundles' golden data), time both, print a short table. < 8 minutes.
#
# UNVERIFIED: written against NVIDIA's documentation; no machine medc was developed on has an NVIDIA GPU or
# TensorRT, so this script has never run. Please report what it prints.
#
# Needs: an NVIDIA GPU (nvidia-smi; on Jetson pass the target explicitly), medc installed with its build extra
# (`pip install -e ".[dev]"`), TensorRT's Python bindings (x86: `pip install tensorrt-cu12`; Jetson: JetPack's
# python3-libnvinfer) and cuda-python (`pip install cuda-python`).
#
# Usage: benchmarks/gpu_check.sh [TARGET] [OUT_DIR]
#   TARGET   a `medc targets` name; default: the TensorRT target matching nvidia-smi's compute capability
#   OUT_DIR  where the bundles go (default: a temporary directory, removed at the end)
set -euo pipefail

TARGET="${1:-}"
OUT="${2:-}"
if [ -z "$OUT" ]; then
  OUT="$(mktemp -d -t medc-gpu-check.XXXXXX)"
  trap 'rm -rf "$OUT"' EXIT
fi
STEP_LIMIT=150  # seconds per build step; the whole check stays under 8 minutes

if [ -z "$TARGET" ]; then
  if ! command -v nvidia-smi >/dev/null; then
    echo "nvidia-smi not found: pass the target, e.g. benchmarks/gpu_check.sh jetson-orin-nano-8gb" >&2
    exit 2
  fi
  CC="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' ')"
  TARGET="$(python - "$CC" <<'EOF'
import sys
from medc.targets import TARGETS
cc = sys.argv[1]
# Prefer data-center profiles on a discrete GPU (several share a compute capability: h100/h200 are both 9.0).
fits = sorted((t.platform != "datacenter", t.name) for t in TARGETS.values()
              if t.engine == "tensorrt" and t.compute_capability == cc)
print(fits[0][1] if fits else "")
EOF
)"
  if [ -z "$TARGET" ]; then
    echo "no medc target has compute capability $CC; pass one explicitly (medc targets)" >&2
    exit 2
  fi
fi
echo "medc GPU check: target $TARGET, bundles in $OUT" >&2

# --optimizer none: standard ONNX ops only (TensorRT's parser cannot import ONNX Runtime's fused com.microsoft ops).
# --precision fp16: every TensorRT target has it, and it keeps the encoders out of ONNX Runtime's int8 fusions.
for model in medsiglip-tiny medgemma-tiny; do
  timeout "$STEP_LIMIT" medc build "$model" --target "$TARGET" --precision fp16 --optimizer none -o "$OUT/$model" --force
  timeout "$STEP_LIMIT" medc engines "$OUT/$model" --target "$TARGET"   # the engines, built in place
done

timeout 120 python - "$OUT/medsiglip-tiny" "$OUT/medgemma-tiny" <<'EOF'
import sys, time
import numpy as np
from medc.runtime.bundle import open_bundle
from medc.runtime.session import OrtSession
from medc.runtime.trt_session import TrtSession
from medc.runtime.verify import closeness, evaluate, golden_cases
from medc.specs import Tolerance

def timed(fn, feeds, repeat=20):
    fn(feeds)  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter(); fn(feeds); times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))

rows, ok = [], True
for path in sys.argv[1:]:
    bundle = open_bundle(path)
    m, golden = bundle.manifest, dict(np.load(bundle.path / bundle.manifest.golden))
    rec = m.tensorrt
    for name, engine in rec["engines"].items():
        comp = m.components[name]
        cases = golden_cases(golden, name)
        feeds = next(iter(cases.values()))["in"]
        with OrtSession(bundle.file(comp.file), ["CPUExecutionProvider"]) as cpu, \
             TrtSession(bundle.file(engine["file"]), rec["profiles"][name], manifest=m, component=name) as trt:
            gate = evaluate(trt.run, cases, Tolerance(**comp.fidelity["tolerance"]))
            a, b = cpu.run(feeds), trt.run(feeds)
            parity = [closeness(a[k], b[k]) for k in a]
            rows.append((m.model["name"], name, comp.precision, min(c.cosine for c in parity),
                         max(c.max_abs for c in parity), gate["passed"], timed(cpu.run, feeds), timed(trt.run, feeds)))
            ok &= gate["passed"]

print(f"\nTensorRT {m.tensorrt['built_with']['tensorrt_version']} on {m.tensorrt['built_with']['gpu']} "
      f"(target {m.target}), first golden case of each component")
print(f"{'model':<16} {'component':<16} {'prec':<5} {'cos vs ORT':>10} {'max abs':>9} {'gate':>5} "
      f"{'ORT CPU ms':>10} {'TRT ms':>8} {'speedup':>8}")
for r in rows:
    print(f"{r[0]:<16} {r[1]:<16} {r[2]:<5} {r[3]:>10.6f} {r[4]:>9.2e} {'PASS' if r[5] else 'FAIL':>5} "
          f"{r[6]:>10.2f} {r[7]:>8.2f} {r[6] / r[7]:>7.1f}x")
sys.exit(0 if ok else 1)
EOF
