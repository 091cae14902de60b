#!/usr/bin/env bash
set -eo pipefail
case "$1" in
  worker) exec celery --app=superset.tasks.celery_app:app worker -O fair -l INFO ;;
  beat) exec celery --app=superset.tasks.celery_app:app beat --pidfile /tmp/celerybeat.pid -l INFO ;;
  app-gunicorn) exec /usr/bin/run-server.sh ;;
esac
