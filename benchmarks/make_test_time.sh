#!/usr/bin/env bash
# Benchmark: wall time of the whole CI job (`.ci/run` = `make test` with a fresh world cache,
# installs included) in a fresh clone of the committed tree. Budget: 30 minutes on 2 cores.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$src" "$work/clone"
cd "$work/clone"
start=$(date +%s)
bash .ci/run
end=$(date +%s)
echo "make test (via .ci/run, fresh clone, fresh world cache): $((end - start)) s = $(( (end - start) * 100 / 1800 ))% of the 30 min budget"
