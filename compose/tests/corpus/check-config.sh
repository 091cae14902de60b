#!/bin/sh
# Runs `docker-compose config -q` (v1.29) on every corpus project, in its own
# directory so that .env, env_file, build contexts and bind mounts resolve.
# Usage: compose/tests/corpus/check-config.sh [DIR...]
set -u
cd "$(dirname "$0")"
fail=0
dirs=${*:-$(ls -d */ | tr -d /)}
for d in $dirs; do
  for f in docker-compose.yml docker-compose.yaml compose.yaml compose.yml; do
    [ -f "$d/$f" ] || continue
    if out=$(cd "$d" && docker-compose -f "$f" config -q 2>&1) && [ -z "$out" ]; then
      echo "ok   $d/$f"
    else
      echo "FAIL $d/$f"; echo "$out" | sed 's/^/     /'; fail=1
    fi
  done
done
exit $fail
