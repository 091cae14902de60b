#!/bin/sh
# Runs `docker-compose config -q` (v1.29) on every corpus project, in its own
# directory so that .env, env_file, build contexts and bind mounts resolve.
# A project fails when docker-compose refuses it or warns of an unset variable;
# other warnings (such as "configs ... will be ignored" outside swarm) are shown.
# Usage: compose/tests/corpus/check-config.sh [DIR...]
set -u
cd "$(dirname "$0")"
fail=0
dirs=${*:-$(ls -d */ | tr -d /)}
for d in $dirs; do
  for f in docker-compose.yml docker-compose.yaml compose.yaml compose.yml; do
    [ -f "$d/$f" ] || continue
    if out=$(cd "$d" && docker-compose -f "$f" config -q 2>&1) && ! echo "$out" | grep -q "is not set"; then
      if [ -z "$out" ]; then echo "ok   $d/$f"; else echo "warn $d/$f"; echo "$out" | sed 's/^/     /'; fi
    else
      echo "FAIL $d/$f"; echo "$out" | sed 's/^/     /'; fail=1
    fi
  done
done
exit $fail
