#!/usr/bin/env bash
# The mirror engine against plain pread/pwrite on the same two files, in
# process (issue 3). Prints medians and ratios; see benches/engine.rs.
#   bash bench/engine.sh [--direct] [--seconds S] [--runs N] [--dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench --quiet --bench engine -- "$@"
