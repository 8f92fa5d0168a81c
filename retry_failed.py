#!/usr/bin/env python3
"""Reprocessa falhas salvas em FAILED_DIR. Thin entry point over bemsoft_monitor.replay_cli.

    python retry_failed.py [--dir PASTA | --file ARQUIVO] [--send] [--move-ok PASTA]
                           [--limit N] [--verbose] [--env-file .env] [--watch SEGUNDOS]
"""
import sys

if __name__ == "__main__":
    from bemsoft_monitor.cli import without_separators
    from bemsoft_monitor.replay_cli import main

    sys.exit(main(without_separators(sys.argv[1:])))
