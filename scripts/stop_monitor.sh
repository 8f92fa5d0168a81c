#!/usr/bin/env bash
# Para o monitor com segurança: pede a parada e espera a solicitação em andamento terminar.
exec bash "$(dirname "$0")/_launch.sh" stop monitor
