#!/usr/bin/env bash
# Run a command while N busy loops (default: one per core) keep every core busy, then stop them.
#   scripts/busy_cores.sh python -m pytest -q -p no:cacheprovider
#   BUSY=4 scripts/busy_cores.sh ...
# Exits with the command's status; the loops are stopped even when the command fails or is
# interrupted.
set -u
if [ "$#" -eq 0 ]; then
    echo "usage: scripts/busy_cores.sh COMMAND [ARGS...]" >&2
    exit 2
fi
n="${BUSY:-$(nproc)}"
pids=()
stop() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null
    done
    wait "${pids[@]}" 2>/dev/null
}
trap stop EXIT
trap 'exit 130' INT TERM
for _ in $(seq "$n"); do
    python3 -c "while True: pass" &
    pids+=("$!")
done
"$@"
