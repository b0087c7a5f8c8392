#!/usr/bin/env bash
# Checks the hardening of the systemd units: `systemd-analyze security --offline=true`
# must rate each unit's exposure below 3.0 (0 is fully locked down, 10 is wide open).
# Prints SKIPPED and exits 0 where systemd-analyze is not installed (Debian: systemd).
# Usage: deploy/check-units.sh [UNIT_FILE...]   (default: both units in deploy/)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

LIMIT=3.0
units=("$@")
if [ ${#units[@]} -eq 0 ]; then
    units=("$here/lienthong-broker.service" "$here/lienthong-agent.service")
fi

if ! command -v systemd-analyze >/dev/null; then
    echo "check-units: SKIPPED (no systemd-analyze; Debian's systemd package has it)"
    exit 0
fi

failed=0
for unit in "${units[@]}"; do
    # --offline reads the file itself; it says nothing about whether the unit starts.
    if ! report=$(systemd-analyze security --offline=true --no-pager "$unit" 2>&1); then
        # Non-zero also when the score is above systemd's own threshold; the score
        # line below is what counts.
        :
    fi
    score=$(printf '%s\n' "$report" | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p' | tail -1)
    if [ -z "$score" ]; then
        echo "check-units: $unit: no exposure score in the output of systemd-analyze:" >&2
        printf '%s\n' "$report" >&2
        failed=1
        continue
    fi
    if awk -v s="$score" -v l="$LIMIT" 'BEGIN { exit !(s < l) }'; then
        echo "check-units: $(basename "$unit"): exposure $score (below $LIMIT)"
    else
        echo "check-units: $unit: exposure $score, must be below $LIMIT:" >&2
        printf '%s\n' "$report" | grep -E '^✗' >&2 || true
        failed=1
    fi
done
exit "$failed"
