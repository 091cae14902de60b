#!/usr/bin/env bash
set -eu
until curl -s -u "elastic:${ELASTIC_PASSWORD}" http://elasticsearch:9200/ >/dev/null; do sleep 5; done
echo ready
