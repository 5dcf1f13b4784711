#!/usr/bin/env bash
# Rebuild data/plots_template.html: the page `dvc plots show` fills (.dvc/config sets plots.html_template), with
# vega, vega-lite and vega-embed inlined so that it draws without a network. Needs npm, once, to fetch them.
set -euo pipefail
cd "$(dirname "$0")"
packages=(vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/nirvana-vega"
npm install --prefix "$cache" --no-audit --no-fund --save-exact "${packages[@]}" >&2
builds=()
for package in "${packages[@]}"; do
  name=${package%@*}
  build="$cache/node_modules/$name/build/$name.min.js"
  # A closing script tag or a comment opener would end the script early; DVC replaces {scripts}, {plot_divs}, {refresh_tag}.
  if grep -qiE '</script|<!--|\{(scripts|plot_divs|refresh_tag)\}' "$build"; then
    echo "plots_template.sh: $build cannot be inlined as it is" >&2
    exit 1
  fi
  builds+=("$build")
done
{
  cat <<EOF
<!DOCTYPE html>
<html>
<head>
  <meta charset="utf-8">
  <title>nirvana plots</title>
  <!-- ${packages[*]} (BSD-3-Clause, licence at the end), inlined by
       data/plots_template.sh so that the page draws offline. There is no scripts placeholder here on purpose:
       DVC would fill it with script tags that load the same libraries from a CDN. -->
EOF
  for build in "${builds[@]}"; do
    printf '<script>\n'
    cat "$build"
    printf '\n</script>\n'
  done
  cat <<EOF
</head>
<body>
  {plot_divs}
</body>
</html>
<!-- vega, vega-lite and vega-embed: $(cat "$cache/node_modules/vega-lite/LICENSE")
vega's build also bundles d3 modules (ISC licence, Copyright Mike Bostock). -->
EOF
} > plots_template.html
echo "wrote data/plots_template.html" >&2
