#!/usr/bin/env bash
# `reflex` for this example, from this directory: the Reflex of ../../.venv-reflex, with the
# pinned Node 22 (node_modules/.bin, installed by scripts/bootstrap; Reflex 0.10 wants Node >=
# 22.22) first on the PATH, and npm instead of bun (which Reflex would download from outside
# the package registries). Arguments go to reflex: `run`, `run --env prod`, `export`, …
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export PATH="$here/node_modules/.bin:$here/../../.venv-reflex/bin:$PATH"
export REFLEX_USE_NPM=1
cd "$here"
exec reflex "$@"
