#!/usr/bin/env bash
# Para o reprocessador de falhas (espera o arquivo em andamento terminar).
exec bash "$(dirname "$0")/_launch.sh" stop retry
