#!/usr/bin/env bash
# Para o monitor com segurança: envia SIGTERM e espera a solicitação em andamento terminar.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
stop_bg monitor monitor_bemsoft.py
