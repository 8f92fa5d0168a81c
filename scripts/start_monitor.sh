#!/usr/bin/env bash
# Inicia o monitor em segundo plano. Argumentos extras vão para monitor_bemsoft.py
# (ex.: bash scripts/start_monitor.sh --env-file /etc/bemsoft/.env).
set -euo pipefail
source "$(dirname "$0")/_common.sh"
start_bg monitor monitor_bemsoft.py "$@"
