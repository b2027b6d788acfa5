#!/usr/bin/env bash
# Time a pytest run and measure the peak size of its temporary files.
#
#   tests/measure_tier.sh                  # the default (fast) tier: python3 -m pytest -q tests
#   tests/measure_tier.sh --all            # the whole suite
#   tests/measure_tier.sh -m slow --all    # the slow tier only
#
# The arguments are passed to `python3 -m pytest -q tests`. The run gets a fresh, empty TMPDIR (pytest's
# tmp_path folders and the tools' own temporary files go there); a background loop samples `du -sb` of it
# every 0.5 s and the largest sample is printed at the end, with the wall time. Exits with pytest's status.
set -uo pipefail
cd "$(dirname "$0")/.."

scratch=$(mktemp -d)
peak_file=$(mktemp)
echo 0 > "$peak_file"
trap 'rm -rf "$scratch" "$peak_file"' EXIT  # also when interrupted
(
    peak=0
    while [ -d "$scratch" ]; do
        size=$(du -sb "$scratch" 2>/dev/null | cut -f1)
        if [ -n "$size" ] && [ "$size" -gt "$peak" ]; then
            peak=$size
            echo "$peak" > "$peak_file"
        fi
        sleep 0.5
    done
) &
poller=$!

start=$(date +%s.%N)
TMPDIR="$scratch" python3 -m pytest -q tests "$@"
status=$?
end=$(date +%s.%N)

rm -rf "$scratch"  # the poller stops when the folder is gone
wait "$poller"
peak=$(cat "$peak_file")
awk -v s="$start" -v e="$end" -v p="$peak" 'BEGIN {
    printf "measure_tier: wall %.1f s, peak temporary files %.2f GiB (%.0f bytes)\n", e - s, p / 2^30, p }'
exit "$status"
