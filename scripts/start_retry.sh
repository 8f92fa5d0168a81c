#!/usr/bin/env bash
# Inicia o reprocessador de falhas (reenvia a cada RETRY_INTERVAL s, padrão 300). Uso: bash scripts/start_retry.sh [completo/failed_events] [opções do retry_failed.py]
exec bash "$(dirname "$0")/_launch.sh" start retry "$@"
