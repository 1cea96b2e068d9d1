#!/usr/bin/env bash
# Resync throughput against dd copying the same bytes between the same files
# (issue 5, item 7: target >= 0.9x). See benches/resync.rs.
#   bash bench/resync.sh [--mib N] [--runs N] [--dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench --quiet --bench resync -- "$@"
