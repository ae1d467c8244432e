#!/usr/bin/env bash
# Install Triton's perf_analyzer (the PyPI "perf-analyzer" wheel) on Debian 12 without touching
# the system.
#
# The wheel's binary is built against glibc 2.38 and GCC 13+'s libstdc++ (GLIBCXX_3.4.32); Debian
# 12 has glibc 2.36 and GCC 12's libstdc++. So this script:
#   1. downloads the wheel with pip (--platform manylinux_2_38_x86_64, since pip on this box
#      would otherwise pick the empty 0.1.0 placeholder) and unpacks the binary;
#   2. fetches Debian 13 (trixie) libc6, libstdc++6 and libgcc-s1 .debs with apt-get download,
#      using a private apt configuration (its own sources.list, lists, cache and an empty dpkg
#      status) so the system's apt state is never read for sources or written;
#   3. unpacks them (dpkg-deb -x) into a private sysroot;
#   4. writes build/perf-analyzer/bin/perf_analyzer, a wrapper that runs the binary through
#      trixie's loader: ld-linux-x86-64.so.2 --library-path <trixie libs> perf_analyzer "$@".
#      libz / libssl / libcrypto come from the system (the loader's default path) and work with
#      the newer glibc.
#
# Idempotent: each step is skipped when its output is already there. Prefix and versions:
#   PERF_ANALYZER_PREFIX   (default: <repo>/build/perf-analyzer)
#   PERF_ANALYZER_VERSION  (default: 2.60.0)
#   DEBIAN_MIRROR          (default: http://deb.debian.org/debian)
#   DEBIAN_SUITE           (default: trixie)
# Usage: bash bench/perf_analyzer/install.sh [--force]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PREFIX="${PERF_ANALYZER_PREFIX:-$ROOT/build/perf-analyzer}"
VERSION="${PERF_ANALYZER_VERSION:-2.60.0}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE="${DEBIAN_SUITE:-trixie}"
KEYRING="/usr/share/keyrings/debian-archive-keyring.gpg"
DEBS=(libc6 libstdc++6 libgcc-s1)

if [[ "${1:-}" == "--force" ]]; then
  rm -rf "$PREFIX"
fi

WHEEL_DIR="$PREFIX/wheel"
DIST="$PREFIX/dist"          # the unpacked wheel
SYSROOT="$PREFIX/sysroot"    # the unpacked trixie .debs
APT_DIR="$PREFIX/apt"
DEB_DIR="$PREFIX/debs"
BIN="$PREFIX/bin"
REAL="$DIST/perf_analyzer/bin/perf_analyzer"
LIBDIR="$SYSROOT/usr/lib/x86_64-linux-gnu"
LOADER="$LIBDIR/ld-linux-x86-64.so.2"
WRAPPER="$BIN/perf_analyzer"

say() { printf 'perf-analyzer: %s\n' "$*"; }

if [[ "$(uname -m)" != "x86_64" ]]; then
  echo "perf-analyzer: only x86_64 is handled (got $(uname -m))" >&2
  exit 1
fi

mkdir -p "$WHEEL_DIR" "$DIST" "$SYSROOT" "$APT_DIR" "$DEB_DIR" "$BIN"

# --- 1. the wheel ------------------------------------------------------------------------------
PIP=(python3 -m pip)
if [[ -x "$ROOT/.venv/bin/python" ]]; then
  PIP=("$ROOT/.venv/bin/python" -m pip)
fi
if [[ ! -x "$REAL" ]]; then
  whl=$(ls "$WHEEL_DIR"/perf_analyzer-"$VERSION"-*manylinux*_x86_64.whl 2>/dev/null | head -1 || true)
  if [[ -z "$whl" ]]; then
    say "downloading the perf-analyzer $VERSION wheel (pip)"
    "${PIP[@]}" download -q --no-deps --only-binary=:all: \
      --platform manylinux_2_38_x86_64 --python-version 3 \
      "perf-analyzer==$VERSION" -d "$WHEEL_DIR" 2> >(grep -v "^WARNING: Location" >&2)
    whl=$(ls "$WHEEL_DIR"/perf_analyzer-"$VERSION"-*manylinux*_x86_64.whl | head -1)
  fi
  say "unpacking $(basename "$whl")"
  rm -rf "$DIST" && mkdir -p "$DIST"
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
    "$whl" "$DIST"
  chmod +x "$REAL"
fi

# --- 2 + 3. trixie's libc6 / libstdc++6 / libgcc-s1 into a private sysroot --------------------
if [[ ! -e "$LOADER" || ! -e "$LIBDIR/libstdc++.so.6" || ! -e "$LIBDIR/libgcc_s.so.1" ]]; then
  mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial" "$APT_DIR/state" \
    "$APT_DIR/sources.list.d" "$APT_DIR/preferences.d" "$APT_DIR/apt.conf.d"
  : >"$APT_DIR/status"
  cat >"$APT_DIR/sources.list" <<EOF
deb [signed-by=$KEYRING] $MIRROR $SUITE main
EOF
  APT_OPTS=(
    -o "Dir::Etc::SourceList=$APT_DIR/sources.list"
    -o "Dir::Etc::SourceParts=$APT_DIR/sources.list.d"
    -o "Dir::Etc::Preferences=$APT_DIR/preferences"
    -o "Dir::Etc::PreferencesParts=$APT_DIR/preferences.d"
    -o "Dir::State=$APT_DIR/state"
    -o "Dir::State::Lists=$APT_DIR/lists"
    -o "Dir::State::status=$APT_DIR/status"
    -o "Dir::Cache=$APT_DIR/cache"
    -o "APT::Architecture=amd64"
    -o "APT::Architectures=amd64"
    -o "Acquire::Languages=none"
    -o "APT::Sandbox::User=root"
    -o "Debug::NoLocking=1"
  )
  if ! ls "$APT_DIR"/lists/*_dists_"${SUITE}"_*Packages* >/dev/null 2>&1; then
    say "apt-get update (private: $APT_DIR, $MIRROR $SUITE)"
    apt-get -q "${APT_OPTS[@]}" update >"$APT_DIR/update.log" 2>&1 || {
      cat "$APT_DIR/update.log" >&2
      exit 1
    }
  fi
  say "apt-get download ${DEBS[*]} ($SUITE)"
  (cd "$DEB_DIR" && rm -f ./*.deb && apt-get -q "${APT_OPTS[@]}" download "${DEBS[@]}" >/dev/null)
  rm -rf "$SYSROOT" && mkdir -p "$SYSROOT"
  for deb in "$DEB_DIR"/*.deb; do
    say "unpacking $(basename "$deb")"
    dpkg-deb -x "$deb" "$SYSROOT"
  done
fi
test -e "$LOADER" || { echo "perf-analyzer: no loader at $LOADER" >&2; exit 1; }

# --- 4. the wrapper ---------------------------------------------------------------------------
cat >"$WRAPPER" <<EOF
#!/bin/sh
# perf_analyzer $VERSION (PyPI wheel) run through Debian $SUITE's glibc loader; written by
# bench/perf_analyzer/install.sh. The system's libz / libssl / libcrypto are found on the loader's
# default path. The binary itself rejects --help (it prints its usage when run without -m), so a
# lone --help / -h prints that usage and exits 0; everything else goes through unchanged.
if [ "\$#" -eq 1 ] && { [ "\$1" = "--help" ] || [ "\$1" = "-h" ]; }; then
  "$LOADER" --library-path "$LIBDIR" "$REAL" 2>&1 | grep -v '^Error: Failed to parse -m'
  exit 0
fi
exec "$LOADER" --library-path "$LIBDIR" "$REAL" "\$@"
EOF
chmod +x "$WRAPPER"

# Check it runs: the usage lists its options, and --version answers.
if ! out=$("$WRAPPER" --help 2>&1) || ! grep -q -- "--concurrency-range" <<<"$out" \
  || ! "$WRAPPER" --version >/dev/null 2>&1; then
  echo "perf-analyzer: '$WRAPPER --help' failed:" >&2
  echo "$out" | tail -20 >&2
  exit 1
fi
glibc=$("$LOADER" --version 2>/dev/null | head -1 || true)
say "perf_analyzer $VERSION: $REAL"
say "glibc / libstdc++ ($SUITE): $LIBDIR (${glibc:-?})"
say "wrapper: $WRAPPER"
