#!/usr/bin/env bash
echo "$1" > /etc/crontab-root
exec cron -f
