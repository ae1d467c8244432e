#!/usr/bin/env bash
# mypy cannot follow scikit-build-core's editable redirect, and the parts live in top-level
# folders that install as carrara.<part>. This lays out the installed package shape as a tree
# of symlinks under build/mypy/carrara, which pyproject's [tool.mypy] checks.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/mypy/carrara
rm -rf build/mypy
mkdir -p "$tree"
for entry in python/carrara/*; do
  name=$(basename "$entry")
  [ "$name" = "__pycache__" ] && continue
  ln -s "../../../$entry" "$tree/$name"
done
for part in feature_cache training registry gateway monitoring; do
  ln -s "../../../$part" "$tree/$part"
done
