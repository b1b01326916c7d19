#!/usr/bin/env bash
# Runs the whole test suite; "no tests collected" (pytest exit code 5) is a failure, not a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
# Write bytecode caches even where the environment says not to: the suite starts a few hundred service processes,
# each importing the mesh's modules, and pytest rewrites some 200 test modules; with the caches written once, each
# later start and each collection skips compiling them (about 0.6 s of CPU per service process here).
unset PYTHONDONTWRITEBYTECODE
.venv/bin/python -m pytest "$@"
code=$?
if [ "$code" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$code"
