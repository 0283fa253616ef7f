#!/usr/bin/env bash
# The README's first command: fetch the real-model assets where that is possible, then run the
# tour. Where nothing can be downloaded the tour still runs, with the tiny models only, and its
# report says why the real-model section was skipped. Extra arguments go to `kv tour`.
set -u
cd "$(dirname "$0")/.."
if ! scripts/fetch-assets.sh; then
  echo "tour: the real-model assets could not be fetched; running the tour with the tiny models only" >&2
fi
exec cargo run --release -p kv-cli -- tour "$@"
