#!/usr/bin/env bash
# Para o reprocessador de falhas (espera o arquivo em andamento terminar).
set -euo pipefail
source "$(dirname "$0")/_common.sh"
stop_bg retry retry_failed.py
