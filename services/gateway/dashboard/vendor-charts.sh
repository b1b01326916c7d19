#!/usr/bin/env bash
# `make vendor-charts`: fetch the chart library named in VENDORED.md from the npm registry again, check the
# tarball's and every file's sha256 against the table there, and copy the files into assets/vendor/.
set -euo pipefail
cd "$(dirname "$0")"
command -v npm >/dev/null || { echo "vendor-charts: npm is needed (Debian: apt-get install npm)" >&2; exit 1; }

# The table's rows: package | version | file | vendored as | sha256
rows=$(awk -F'|' 'NF >= 7 && $6 ~ /^ *[0-9a-f]{64} *$/ {
  for (i = 2; i <= 6; i++) { gsub(/^ +| +$/, "", $i) } print $2 "\t" $3 "\t" $4 "\t" $5 "\t" $6 }' VENDORED.md)
[ -n "$rows" ] || { echo "vendor-charts: no sha256 rows in VENDORED.md" >&2; exit 1; }
IFS=$'\t' read -r package version _ < <(head -n1 <<<"$rows")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$package@$version" >/dev/null)
tarball="$work/$package-$version.tgz"
tar -xzf "$tarball" -C "$work"

check() {  # check FILE SHA256 WHAT
  local actual
  actual=$(sha256sum "$1" | cut -d' ' -f1)
  if [ "$actual" != "$2" ]; then
    echo "vendor-charts: $3: sha256 $actual, VENDORED.md says $2" >&2
    exit 1
  fi
}

while IFS=$'\t' read -r _ _ file dest sum; do
  if [ "$file" = "$package-$version.tgz" ]; then
    check "$tarball" "$sum" "$file"
  fi
done <<<"$rows"
while IFS=$'\t' read -r _ _ file dest sum; do
  [ "$file" = "$package-$version.tgz" ] && continue
  check "$work/$file" "$sum" "$file"
  mkdir -p "$(dirname "$dest")"
  cp "$work/$file" "$dest"
  check "$dest" "$sum" "$dest"
done <<<"$rows"
echo "vendor-charts: $package@$version fetched, sha256 checked, files in $(pwd)/assets/vendor/"
