#!/usr/bin/env bash
# Render the pipeline's DVC plots offline and save a screenshot as results/plots.png.
# Needs Debian's chromium and npm (for local vega builds); run after `make run`.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${XDG_CACHE_HOME:-$HOME/.cache}/nirvana-vega"
[ -f "$cache/node_modules/vega-embed/build/vega-embed.min.js" ] ||
  npm install --prefix "$cache" --no-audit --no-fund vega@5 vega-lite@5 vega-embed@6
out=$(mktemp -d)
.venv/bin/dvc plots show --html-template data/plots_template.html -o "$out"
cp "$cache"/node_modules/{vega,vega-lite,vega-embed}/build/*.min.js "$out"
mkdir -p results
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$out/profile" --allow-file-access-from-files --virtual-time-budget=15000 \
  --hide-scrollbars --window-size=1000,760 --screenshot="$PWD/results/plots.png" "file://$out/index.html"
echo "wrote results/plots.png"
