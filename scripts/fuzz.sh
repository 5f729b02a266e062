#!/usr/bin/env bash
# The full fuzz run of tests/fuzz (hostile inputs, see docs/fuzzing.md): MMX_FUZZ=full selects the
# hypothesis profile with many random examples per test (the default, in CI, is a small
# derandomized slice). Extra arguments go to pytest, e.g.  scripts/fuzz.sh -k attention
set -euo pipefail
cd "$(dirname "$0")/.."
export MMX_FUZZ=full
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest tests/fuzz -p no:cacheprovider -q "$@"
