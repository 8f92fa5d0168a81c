#!/usr/bin/env bash
# Inicia o monitor em segundo plano; argumentos extras vão para monitor_bemsoft.py.
exec bash "$(dirname "$0")/_launch.sh" start monitor "$@"
