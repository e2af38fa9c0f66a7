#!/bin/sh
# Install the Debian data packages that mergelab's benchmark tasks read (see docs/bench.md).
# As root: apt-get install them (skipped when already present). Otherwise: say what to install.
set -e
PKGS="fortunes fortunes-min fortunes-de fortunes-es fortunes-it fortunes-pl fortunes-cs dict-foldoc dict-gcide wordnet-base"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -z "$missing" ]; then
    echo "install_data: all benchmark data packages are installed"
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "install_data: installing$missing"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing >/dev/null || {
        apt-get update >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing >/dev/null
    }
    echo "install_data: done"
else
    echo "install_data: the benchmark needs these Debian packages:$missing" >&2
    echo "install_data: run as root:  apt-get install -y$missing" >&2
    exit 1
fi
