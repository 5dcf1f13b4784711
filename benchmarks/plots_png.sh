#!/usr/bin/env bash
# Render DVC plots offline and save a screenshot: all of dvc.yaml's plots as results/plots.png, or one plot
# and its window size (`bash benchmarks/plots_png.sh recovery_curve results/recovery_curve.png 600,420`).
# Needs Debian's chromium; run after `make run`. The page is plain `dvc plots show`'s: .dvc/config points it at
# data/plots_template.html, which carries vega, vega-lite and vega-embed inline.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-}
png=${2:-results/plots.png}
size=${3:-1000,760}
out=$(mktemp -d)
.venv/bin/dvc plots show -o "$out" $target
mkdir -p "$(dirname "$png")"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --host-resolver-rules="MAP * ~NOTFOUND" --user-data-dir="$out/profile" --virtual-time-budget=15000 \
  --hide-scrollbars --window-size=$size --screenshot="$PWD/$png" "file://$out/index.html"
echo "wrote $png"
