#!/usr/bin/env bash
# Off-domain evaluation text (corpus pydoc:heldout): Debian's python3.11-doc, extracted under
# $STAG_CACHE/debian (default ~/.cache/stag/debian). Needs apt-get (Debian/Ubuntu); ~8 MB download.
set -euo pipefail
dest="${STAG_CACHE:-$HOME/.cache/stag}/debian"
mkdir -p "$dest" && cd "$dest"
[ -d python3.11-doc/usr ] && { echo "already at $dest/python3.11-doc"; exit 0; }
apt-get download python3.11-doc
dpkg-deb -x python3.11-doc_*.deb python3.11-doc
rm -f python3.11-doc_*.deb
echo "extracted to $dest/python3.11-doc"
