#!/usr/bin/env bash
# The GPU check of the speed work, from binaries built on a CPU machine (burn 0.21's `cuda` needs
# neither a GPU nor the CUDA toolkit to build; the driver and NVRTC are loaded at run time):
#   1. the backend-generic tests of kv-core, kv-attention and kv-policies on burn's CUDA backend
#      (the `cuda` module `backend_tests!` adds under each crate's `cuda-tests` feature);
#   2. `kv bench --device cuda` on decode-bench at 8k and 32k tokens: real prefill, then decode,
#      for the full cache and three policies at budget 1024.
#
#   scripts/gpu-check.sh build       # here: gpu-check/bins.tar.xz (git-ignored, about 30 MB)
#   scripts/gpu-check.sh run OUT     # on the GPU machine, repo root, gpu-check/ carried: OUT/
#
# The stripped binaries come to about 190 MB (each links burn with two backends), over what a
# device call carries (64 MiB), so `build` packs them with xz and `run` unpacks them.
#
# `run` keeps going past a failing part and exits non-zero at the end if any part failed, so one
# call brings back every log. It is sized to finish in under 8 minutes on one H200.
set -uo pipefail
cd "$(dirname "$0")/.."
dir=gpu-check

case "${1:-}" in
build)
  set -e
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME:-/root}/.cache/kv-cache-target}"
  rm -rf "$dir" && mkdir -p "$dir/bin"
  cargo build --release -p kv-cli --features cuda
  cp "$CARGO_TARGET_DIR/release/kv" "$dir/bin/kv"
  for crate in kv-core kv-attention kv-policies; do
    # The library's unit-test binary, which holds the backend-generic tests.
    bin=$(cargo test -p "$crate" --lib --features cuda-tests --no-run --message-format=json 2>/dev/null |
      python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]][-1])')
    cp "$bin" "$dir/bin/tests-$crate"
  done
  strip "$dir"/bin/*
  tar -C "$dir" -cf - bin | xz -T0 -6 >"$dir/bins.tar.xz"
  rm -r "$dir/bin"
  du -sh "$dir/bins.tar.xz"
  ;;
run)
  out="${2:?usage: scripts/gpu-check.sh run OUT}"
  mkdir -p "$out"
  [ -d "$dir/bin" ] || xz -dc "$dir/bins.tar.xz" | tar -C "$dir" -xf - || { echo "no $dir/bins.tar.xz: run 'scripts/gpu-check.sh build' first and carry $dir"; exit 2; }
  failed=0
  # The device copies back at most 8 files: one test log, one bench log, the bench's 4 files.
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  for t in "$dir"/bin/tests-*; do
    echo "== $(basename "$t")" >>"$out/tests.log"
    # One test at a time: every test opens the device, and its own context is not the point.
    timeout 180 "$t" cuda:: --test-threads 1 >>"$out/tests.log" 2>&1 || { echo "$(basename "$t") failed"; failed=1; }
    grep -E "^test result" "$out/tests.log" | tail -n 1
  done
  timeout 300 "$dir/bin/kv" bench --device cuda --preset decode-bench --contexts 8192,32768 --allow-beyond-context --prefill --steps 64 \
    --policy full,h2o:budget=1024,snapkv:budget=1024,streaming:budget=1024 --out "$out/bench" >"$out/bench.log" 2>&1 ||
    { echo "kv bench failed"; tail -n 20 "$out/bench.log"; failed=1; }
  cat "$out/bench/bench.md" 2>/dev/null
  exit "$failed"
  ;;
*)
  echo "usage: scripts/gpu-check.sh build | run OUT" >&2
  exit 2
  ;;
esac
