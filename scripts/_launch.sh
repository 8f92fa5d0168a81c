# Used by the start/stop .sh wrappers (Linux/macOS): finds the project's python and runs the
# launcher, python -m bemsoft_monitor.service, with every argument passed on intact.
# PYTHON chooses the interpreter; otherwise .venv/bin/python, else python3.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3
fi
exec "$py" -m bemsoft_monitor.service "$@"
