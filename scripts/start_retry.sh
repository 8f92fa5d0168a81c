#!/usr/bin/env bash
# Inicia o reprocessador de falhas em segundo plano: reenvia os arquivos de FAILED_DIR
# (ou da pasta informada) a cada RETRY_INTERVAL segundos (padrão 300).
# Uso: bash scripts/start_retry.sh [completo/failed_events] [outras opções do retry_failed.py]
set -euo pipefail
source "$(dirname "$0")/_common.sh"
args=()
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then args+=(--dir "$1"); shift; fi
start_bg retry retry_failed.py "${args[@]}" --send --watch "${RETRY_INTERVAL:-300}" "$@"
