#!/usr/bin/env bash
# What the write-intent bitmap costs (random 4 KiB writes at QD 32 with and
# without it) and saves (recovery after SIGKILL against a full resync), in
# process, O_DIRECT (issue 5, item 7). Prints medians and ratios; see
# benches/bitmap.rs.
#   bash bench/bitmap.sh [--seconds S] [--runs N] [--dir DIR] [--dirty PCT] [--part a|b]
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench --quiet --bench bitmap -- "$@"
