#!/usr/bin/env bash
# Debian text packages for the corpora of stagcli/corpora.py (DEBIAN), extracted under
# $STAG_CACHE/debian (default ~/.cache/stag/debian). Needs apt-get (Debian/Ubuntu).
#   scripts/fetch_offdomain.sh                  # python3.11-doc: pydoc:heldout, ~8 MB download
#   scripts/fetch_offdomain.sh fortunes         # fortunes:heldout, ~1 MB
#   scripts/fetch_offdomain.sh linux-doc-6.1    # linuxdoc:train / linuxdoc:heldout, ~37 MB
set -euo pipefail
dest="${STAG_CACHE:-$HOME/.cache/stag}/debian"
mkdir -p "$dest" && cd "$dest"
for package in "${@:-python3.11-doc}"; do
  if [ -d "$package/usr" ]; then echo "already at $dest/$package"; continue; fi
  apt-get download "$package"
  dpkg-deb -x "${package}"_*.deb "$package"
  rm -f "${package}"_*.deb
  echo "extracted to $dest/$package"
done
