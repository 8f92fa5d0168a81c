# Shared by the start/stop scripts (sourced, not run). Linux/macOS.
# pid files: completo/run/<nome>.pid   logs: completo/logs/<nome>.out
# (MONITOR_RUN_DIR / MONITOR_LOG_DIR mudam essas pastas; PYTHON escolhe o interpretador.)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${MONITOR_RUN_DIR:-$ROOT/completo/run}"
LOG_DIR="${MONITOR_LOG_DIR:-$ROOT/completo/logs}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="$(command -v python3 || command -v python)"; fi
fi
mkdir -p "$RUN_DIR" "$LOG_DIR"

# running NAME SCRIPT -> prints the pid and returns 0 when NAME's process is alive and is SCRIPT
running() {
  local pidfile="$RUN_DIR/$1.pid" pid
  [ -f "$pidfile" ] || return 1
  pid="$(cat "$pidfile" 2>/dev/null)"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  if [ -r "/proc/$pid/cmdline" ] && ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$2"; then
    return 1  # the pid was reused by another program
  fi
  echo "$pid"
}

# start_bg NAME SCRIPT [args...]: starts python SCRIPT in the background, refusing a second start
start_bg() {
  local name="$1" script="$2" pid
  shift 2
  if pid="$(running "$name" "$script")"; then
    echo "$name já está rodando (pid $pid). Use scripts/stop_$name.sh para parar." >&2
    return 1
  fi
  rm -f "$RUN_DIR/$name.stop"
  cd "$ROOT"
  nohup "$PYTHON" "$ROOT/$script" --stop-file "$RUN_DIR/$name.stop" "$@" >>"$LOG_DIR/$name.out" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$RUN_DIR/$name.pid"
  sleep "${START_CHECK_SECONDS:-2}"
  if ! kill -0 "$pid" 2>/dev/null; then
    rm -f "$RUN_DIR/$name.pid"
    echo "$name terminou logo ao iniciar. Últimas linhas de $LOG_DIR/$name.out:" >&2
    tail -n 20 "$LOG_DIR/$name.out" >&2
    return 1
  fi
  echo "$name iniciado (pid $pid). Log: $LOG_DIR/$name.out"
}

# stop_bg NAME SCRIPT: asks for a graceful stop (SIGTERM) and waits for the process to exit
stop_bg() {
  local name="$1" script="$2" pid waited=0 limit="${STOP_TIMEOUT:-120}"
  if ! pid="$(running "$name" "$script")"; then
    rm -f "$RUN_DIR/$name.pid"
    echo "$name não está rodando."
    return 0
  fi
  echo "Parando $name (pid $pid): termina o trabalho em andamento antes de sair..."
  kill -TERM "$pid"
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$waited" -ge "$limit" ]; then
      echo "$name não terminou em $limit s. Verifique $LOG_DIR/$name.out (forçar: kill -9 $pid)." >&2
      return 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
  rm -f "$RUN_DIR/$name.pid" "$RUN_DIR/$name.stop"
  echo "$name parado."
}
