#!/usr/bin/env bash
# Put ONNX Runtime's C/C++ headers and a link to the Python wheel's shared library under DEST.
#
#   fetch_ort_headers.sh DEST PYTHON
#
# DEST/include/onnxruntime/*.h   from Debian 13's libonnxruntime-dev (Debian 12 has no such
#                                package); fetched with apt against a temporary trixie source
#                                list and state/cache dirs (no root install), unpacked with
#                                dpkg-deb -x. The C API is backward compatible: 1.21 headers
#                                drive the wheel's newer library.
# DEST/lib/libonnxruntime.so.1   symlink to the onnxruntime wheel's libonnxruntime.so.* (its
#                                SONAME), which the build links and RPATHs.
# Idempotent: does nothing when both are present.
set -euo pipefail
DEST=${1:?usage: fetch_ort_headers.sh DEST PYTHON}
PYTHON=${2:?usage: fetch_ort_headers.sh DEST PYTHON}
SUITE=${ORT_DEB_SUITE:-trixie}
MIRROR=${ORT_DEB_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$DEST/lib"
DEST=$(cd "$DEST" && pwd)

# The shared library from the onnxruntime wheel installed in the venv.
CAPI=$("$PYTHON" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))')
LIB=$(ls "$CAPI"/libonnxruntime.so.* 2>/dev/null | head -n1 || true)
if [ -z "$LIB" ]; then
  echo "fetch_ort_headers: no libonnxruntime.so.* in $CAPI (pip install onnxruntime)" >&2
  exit 1
fi
ln -sfn "$LIB" "$DEST/lib/libonnxruntime.so.1"
ln -sfn "$LIB" "$DEST/lib/libonnxruntime.so"

if [ -f "$DEST/include/onnxruntime/onnxruntime_cxx_api.h" ]; then
  exit 0
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/state/lists/partial" "$TMP/cache/archives/partial" "$TMP/deb"
touch "$TMP/state/status"
echo "deb $MIRROR $SUITE main" > "$TMP/sources.list"
APT_OPTS=(-q -o "Dir::Etc::sourcelist=$TMP/sources.list" -o "Dir::Etc::sourceparts=-"
          -o "Dir::State=$TMP/state" -o "Dir::State::status=$TMP/state/status"
          -o "Dir::Cache=$TMP/cache" -o "APT::Sandbox::User=root")
echo "fetch_ort_headers: libonnxruntime-dev from Debian $SUITE"
apt-get "${APT_OPTS[@]}" update >/dev/null
(cd "$TMP/deb" && apt-get "${APT_OPTS[@]}" download libonnxruntime-dev >/dev/null)
DEB=$(ls "$TMP"/deb/libonnxruntime-dev_*.deb)
dpkg-deb -x "$DEB" "$TMP/x"
mkdir -p "$DEST/include"
rm -rf "$DEST/include/onnxruntime"
cp -r "$TMP/x/usr/include/onnxruntime" "$DEST/include/onnxruntime"
basename "$DEB" > "$DEST/include/onnxruntime/SOURCE_DEB"
echo "fetch_ort_headers: headers in $DEST/include/onnxruntime ($(basename "$DEB"))"
