#!/usr/bin/env python3
"""Teste de resistência (soak): inserções contínuas no banco legado enquanto o monitor roda em
laço, com 1% de falhas transitórias (500/502/503/504) na API.

Uma thread insere solicitações num ritmo fixo (--rate por segundo, 1 a 3 itens cada) durante
--minutes; o RSS do monitor é amostrado a cada --sample-seconds. No fim as inserções param,
espera-se a fila esvaziar e confere-se: nenhum item perdido, nenhum em dobro, checkpoint no
último item, nenhum arquivo de falha, memória estável (crescimento depois do aquecimento
abaixo de --max-rss-growth-mb).

Uso: python -m reliability.soak [--minutes 30] [--rate 5] [--fault-rate 0.01]
Sai com código 1 em qualquer violação.
"""
from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
import threading
import time

import sqlalchemy as sa

from bemsoft_monitor.testing.sampledata import add_items, add_order, add_patient

from .common import (LAB, FakeApiProcess, MonitorProcess, PgDatabase, checkpoint,
                    failure_files, format_table, pg_unreachable, read_text, temp_dir, verify,
                    wait_until, write_env)

CODES = ("GLI", "HEMO", "TSH", "URINA1", "CREA", "UREIA")


class Writer(threading.Thread):
    """Inserts one solicitation (patient, order, 1-3 items) per 1/rate s, each in its own
    transaction, until stopped or `seconds` have passed."""

    def __init__(self, url: str, rate: float, seconds: float, seed_value: int):
        super().__init__(daemon=True, name="soak-writer")
        self.engine = sa.create_engine(url)
        self.rate, self.seconds = rate, seconds
        self.rng = random.Random(seed_value)
        self.stop = threading.Event()
        self.ids: list[int] = []
        self.orders = 0
        self.error: Exception | None = None
        self.late = 0.0   # worst delay behind schedule (s)

    def run(self) -> None:
        started = time.monotonic()
        try:
            n = 0
            while not self.stop.is_set() and time.monotonic() - started < self.seconds:
                due = started + n / self.rate
                wait = due - time.monotonic()
                if wait > 0 and self.stop.wait(wait):
                    break
                self.late = max(self.late, -wait)
                self._insert(n + 1)
                n += 1
        except Exception as err:  # reported at the end
            self.error = err
        finally:
            self.engine.dispose()

    def _insert(self, cod: int) -> None:
        now = dt.datetime.now().replace(microsecond=0)
        items = [{"CodConvExames": code, "DescExames": f"EXAME {code}", "Origem": "SOAK"}
                 for code in self.rng.sample(CODES, self.rng.randint(1, 3))]
        with self.engine.begin() as conn:
            add_patient(conn, cod, f"Paciente Soak {cod}", cpf=f"{cod:011d}",
                        datanasc=dt.datetime(1975, 5, 17), sexo="Feminino" if cod % 2 else "Masculino")
            add_order(conn, cod, cod, dtaentrada=dt.datetime.combine(now.date(), dt.time()),
                      hora=now.strftime("%H:%M:%S"))
            ids = add_items(conn, cod, items, terceirizado=LAB, entered_at=now)
        self.ids += ids
        self.orders += 1


def run_soak(minutes: float = 30.0, rate: float = 5.0, fault_rate: float = 0.01,
             concurrency: int = 4, sample_seconds: float = 10.0, drain_timeout: float = 300.0,
             max_rss_growth_mb: float = 15.0, seed_value: int = 23, log=print) -> dict:
    seconds = minutes * 60
    work = temp_dir("soak-")
    result = {"problems": [], "samples": [], "work": str(work)}
    problems = result["problems"]
    with PgDatabase() as url, FakeApiProcess(fault_rate=fault_rate, seed=seed_value) as api:
        env = write_env(work, url, api.url, BEMSOFT_CONCURRENCY=concurrency)
        monitor = MonitorProcess(env)            # loop mode
        engine = sa.create_engine(url)
        try:
            if not wait_until(lambda: "Monitor iniciado" in read_text(monitor.log_file), 30):
                problems.append("o monitor não iniciou em 30 s")
            writer = Writer(url, rate, seconds, seed_value)
            started = time.monotonic()
            writer.start()
            next_sample = started
            while writer.is_alive() and monitor.alive():
                if time.monotonic() >= next_sample:
                    sample = _sample(monitor, api, engine, url, started)
                    result["samples"].append(sample)
                    log(f"  {sample['t']:6.0f} s: RSS {sample['rss_mb']:.1f} MB, inseridas "
                        f"{writer.orders}, itens guardados {sample['stored']}, "
                        f"itens na fila {sample['backlog']}"
                        f", POSTs {sample['posts_by_status']}")
                    next_sample += sample_seconds
                writer.join(min(1.0, max(0.05, next_sample - time.monotonic())))
            writer.stop.set()
            writer.join(30)
            inserted_at = time.monotonic()
            if writer.error:
                problems.append(f"erro do gerador de inserções: {writer.error!r}")
            if not monitor.alive():
                problems.append(f"o monitor morreu durante o soak (código {monitor.proc.poll()})")
            last_id = max(writer.ids) if writer.ids else 0
            drained = wait_until(lambda: (checkpoint(url) or 0) >= last_id, drain_timeout, 0.2)
            drain_s = time.monotonic() - inserted_at
            if not drained:
                problems.append(f"a fila não esvaziou em {drain_timeout:.0f} s depois das inserções")
            result["samples"].append(_sample(monitor, api, engine, url, started))
            code = monitor.stop(60)
            if code != 0:
                problems.append(f"o monitor saiu com código {code} ao receber SIGTERM")
        finally:
            engine.dispose()
            if monitor.alive():
                monitor.kill9()

        report = verify(api, url, writer.ids, work / "failed")
        files = failure_files(work / "failed")
        output = read_text(monitor.output)
        rss = [s["rss_mb"] for s in result["samples"] if s["rss_mb"] > 0]
        warm = rss[len(rss) // 3] if rss else 0.0
        result.update({
            "minutes": minutes, "rate": rate, "fault_rate": fault_rate, "concurrency": concurrency,
            "orders": writer.orders, "items": len(writer.ids), "stored": report["stored"],
            "missing": len(report["missing"]), "duplicates": len(report["duplicates"]),
            "checkpoint": report["checkpoint"], "last_id": report["last_id"],
            "failure_files": len(files), "posts_by_status": report["posts_by_status"],
            "insert_seconds": round(inserted_at - started, 1), "drain_seconds": round(drain_s, 1),
            "writer_late_s": round(writer.late, 2),
            "rss_first": rss[0] if rss else 0.0, "rss_max": max(rss) if rss else 0.0,
            "rss_last": rss[-1] if rss else 0.0, "rss_after_warmup": warm,
            "max_backlog": max((s["backlog"] for s in result["samples"]), default=0),
            "tracebacks": output.count("Traceback"),
            "error_lines": sum(1 for line in output.splitlines() if " ERROR " in line),
        })
        total = inserted_at - started + drain_s
        result["orders_per_s"] = round(writer.orders / max(total, 1e-9), 2)
        result["items_per_s"] = round(report["stored"] / max(total, 1e-9), 2)
        problems += report["problems"]
        if files:
            problems.append(f"{len(files)} arquivos de falha (esperado 0): "
                            f"{[f['reason'][:80] for f in files[:3]]}")
        if result["tracebacks"]:
            problems.append(f"{result['tracebacks']} tracebacks no log do monitor")
        growth = result["rss_last"] - warm
        result["rss_growth_after_warmup"] = round(growth, 1)
        if growth > max_rss_growth_mb:
            problems.append(f"RSS cresceu {growth:.1f} MB depois do aquecimento "
                            f"({warm:.1f} -> {result['rss_last']:.1f} MB; limite {max_rss_growth_mb} MB)")
    result["ok"] = not problems
    return result


def _sample(monitor: MonitorProcess, api: FakeApiProcess, engine, url: str, started: float) -> dict:
    state = api.state()
    cp = checkpoint(url) or 0
    with engine.connect() as conn:
        backlog = conn.execute(sa.text('SELECT count(*) FROM "ItemSol" WHERE "CodItemSol" > :c'),
                               {"c": cp}).scalar()
    return {"t": time.monotonic() - started, "rss_mb": monitor.rss_mb(), "checkpoint": cp,
            "backlog": int(backlog), "stored": state["stored_tests_total"],
            "posts_by_status": state["posts_by_status"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Soak: inserções contínuas + 1% de falhas transitórias.")
    parser.add_argument("--minutes", type=float, default=30.0, help="duração das inserções (padrão 30)")
    parser.add_argument("--rate", type=float, default=5.0,
                        help="solicitações inseridas por segundo (padrão 5)")
    parser.add_argument("--fault-rate", type=float, default=0.01,
                        help="fração de POSTs com 5xx (padrão 0.01)")
    parser.add_argument("--concurrency", type=int, default=4, help="BEMSOFT_CONCURRENCY (padrão 4)")
    parser.add_argument("--sample-seconds", type=float, default=10.0, help="intervalo das amostras de RSS")
    parser.add_argument("--drain-timeout", type=float, default=300.0,
                        help="espera máxima pelo fim da fila (s)")
    parser.add_argument("--max-rss-growth-mb", type=float, default=15.0,
                        help="crescimento de RSS aceito depois do aquecimento (MB)")
    parser.add_argument("--seed", type=int, default=23)
    args = parser.parse_args(argv)
    if pg_unreachable():
        return 2
    print(f"Soak: {args.minutes:g} min, {args.rate:g} solicitações/s, {args.fault_rate:.0%} de falhas "
          f"transitórias, concorrência {args.concurrency}, monitor em laço", flush=True)
    r = run_soak(args.minutes, args.rate, args.fault_rate, args.concurrency, args.sample_seconds,
                 args.drain_timeout, args.max_rss_growth_mb, args.seed,
                 log=lambda m: print(m, flush=True))
    print()
    posts = ", ".join(f"{k}:{v}" for k, v in sorted(r.get("posts_by_status", {}).items()))
    rows = [
        ["solicitações inseridas", r.get("orders")], ["itens inseridos", r.get("items")],
        ["itens guardados pela API", r.get("stored")], ["perdidos", r.get("missing")],
        ["em dobro", r.get("duplicates")], ["arquivos de falha", r.get("failure_files")],
        ["checkpoint / último item", f"{r.get('checkpoint')}/{r.get('last_id')}"],
        ["POSTs por status", posts],
        ["inserções (s)", r.get("insert_seconds")], ["esvaziar a fila depois (s)", r.get("drain_seconds")],
        ["atraso máx. do gerador (s)", r.get("writer_late_s")],
        ["maior fila amostrada (itens)", r.get("max_backlog")],
        ["vazão (solicitações/s)", r.get("orders_per_s")], ["vazão (itens/s)", r.get("items_per_s")],
        ["RSS primeira amostra (MB)", f"{r.get('rss_first', 0):.1f}"],
        ["RSS máximo (MB)", f"{r.get('rss_max', 0):.1f}"],
        ["RSS última amostra (MB)", f"{r.get('rss_last', 0):.1f}"],
        ["RSS após aquecimento -> fim (MB)",
         f"{r.get('rss_after_warmup', 0):.1f} -> {r.get('rss_last', 0):.1f} "
         f"({r.get('rss_growth_after_warmup', 0):+.1f})"],
        ["amostras de RSS", len(r["samples"])], ["linhas ERROR no log", r.get("error_lines")],
    ]
    print(format_table(["medida", "valor"], rows))
    print("RSS (MB) por amostra: " + ", ".join(f"{s['rss_mb']:.1f}" for s in r["samples"]))
    if r["problems"]:
        print("\nVIOLAÇÕES:")
        for p in r["problems"]:
            print(f"  - {p}")
        return 1
    print("\nNenhuma violação: nada perdido, nada em dobro, nenhuma falha permanente, memória estável.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
