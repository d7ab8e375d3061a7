#!/usr/bin/env bash
# Run a command and print its wall time and the machine's busy CPU seconds meanwhile (every process, from /proc/stat).
# /usr/bin/time counts only the processes whose parents wait for them (pytest-xdist's workers are not among them), so
# for a parallel test run it shows less than was spent.   Usage: scripts/cpu_seconds.sh make test
set -uo pipefail
busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }  # user nice system irq softirq, in ticks
ticks=$(getconf CLK_TCK)
start=$(date +%s.%N)
before=$(busy)
"$@"
rc=$?
after=$(busy)
awk -v w="$(date +%s.%N)" -v s="$start" -v b="$before" -v a="$after" -v t="$ticks" -v n="$(nproc)" 'BEGIN {
    printf "wall %.1f s, busy CPU %.1f s on %d cores (%.0f %% of them)\n", w - s, (a - b) / t, n, 100 * (a - b) / t / n / (w - s) }' >&2
exit $rc
