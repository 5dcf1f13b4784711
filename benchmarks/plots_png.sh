#!/usr/bin/env bash
# Render the pipeline's DVC plots offline and save a screenshot as results/plots.png.
# Needs Debian's chromium; run after `make run`. The page is plain `dvc plots show`'s: .dvc/config points it at
# data/plots_template.html, which carries vega, vega-lite and vega-embed inline.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
.venv/bin/dvc plots show -o "$out"
mkdir -p results
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --host-resolver-rules="MAP * ~NOTFOUND" --user-data-dir="$out/profile" --virtual-time-budget=15000 \
  --hide-scrollbars --window-size=1000,760 --screenshot="$PWD/results/plots.png" "file://$out/index.html"
echo "wrote results/plots.png"
