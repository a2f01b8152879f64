#!/usr/bin/env bash
# On the GPU machine, from the repo root, at the start of each of two calls (carry DIR/call1, then
# DIR/call2 within ~30 s, while the machine is warm):
#
#   bash bench/install_kernels.sh .kernel-carry/callN [SITE]
#
# Keeps this call's carried pieces in /tmp/kernel-carry (an ignored folder not named in the next
# call's carry is removed there, /tmp is not). Once every piece listed in PARTS is there, joins
# the split wheel, checks its SHA-256 and installs all wheels into SITE (default /tmp/site) with
# one pip call. Python then needs site.addsitedir(SITE), not just PYTHONPATH: the DSL finds its
# packages through a .pth file (the bench scripts take --site SITE).
set -euo pipefail

SRC=${1:?usage: install_kernels.sh CARRIED_DIR [SITE]}
SITE=${2:-/tmp/site}
STASH=/tmp/kernel-carry

if [ -f "$SITE/.kernels-installed" ]; then
  echo "kernel packages already installed in $SITE"
  exit 0
fi
mkdir -p "$STASH"
cp "$SRC"/* "$STASH/"
missing=0
while read -r part; do
  [ -f "$STASH/$part" ] || { echo "waiting for $part (carry the other call folder next)"; missing=1; }
done < "$STASH/PARTS"
[ "$missing" -eq 0 ] || exit 0

wheel=$(head -n1 "$STASH/PARTS"); wheel=${wheel%.part*}
( cd "$STASH" && xargs cat < PARTS > "$wheel" && sha256sum -c --quiet SHA256SUMS )
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$STASH"/*.whl
touch "$SITE/.kernels-installed"
echo "kernel packages installed in $SITE:"
ls "$SITE" | grep -E '\.dist-info$' | sed 's/\.dist-info$//; s/^/  /'
