#!/usr/bin/env python3
"""Duas instâncias do monitor no mesmo banco, iniciadas no mesmo instante (modo laço).

Esperado: só uma envia; a outra registra "Outro monitor 'bemsoft' já está ativo" e espera
(nova tentativa a cada POLL_SECONDS, entre 1 e 15 s); um terceiro monitor com --drain sai na hora com código 4;
quando a primeira morre com kill -9, a segunda assume e termina a fila; cada item guardado
pela API exatamente uma vez (os envios em andamento da primeira são reenviados pela segunda
com a mesma chave -> 409), checkpoint == último item, nenhum arquivo de falha.

Mede quanto tempo a reserva levou para assumir (do kill até "Bloqueio obtido" e até a
primeira entrega dela).

Uso: python -m reliability.two_instances [--solicitations 600] [--rounds 3]
Sai com código 1 em qualquer violação.
"""
from __future__ import annotations

import argparse
import re
import sys
import time

from .common import (MonitorProcess, PgDatabase, checkpoint, FakeApiProcess,
                    failure_files, finish_within, format_table, pg_unreachable, read_text, seed,
                    temp_dir, verify, wait_until, write_env)

STANDBY = "Outro monitor 'bemsoft' já está ativo"
STARTED = "Monitor iniciado"
TOOK_LOCK = "Bloqueio obtido"
DELIVERED = re.compile(r"Solicitação \S+ entregue")
SENT_ANY = re.compile(r"Solicitação \S+ (entregue|não entregue|falhou)")


def run_round(solicitations: int = 600, items: int = 2, latency: float = 0.05,
              concurrency: int = 4, kill_fraction: float = 0.6, takeover_timeout: float = 45.0,
              drain_timeout: float = 180.0, label: str = "") -> dict:
    result = {"round": label, "problems": [], "takeover_s": None, "first_post_s": None}
    problems = result["problems"]
    # kill -9 of the active one: the fake must not process a half-sent POST (see crash_trials)
    with PgDatabase() as url, FakeApiProcess(latency=latency) as api:
        ids = seed(url, solicitations, items)
        last_id = max(ids)
        dirs = [temp_dir(f"two-{name}-") for name in ("a", "b", "c")]
        envs = [write_env(d, url, api.url, BEMSOFT_CONCURRENCY=concurrency) for d in dirs]
        first, second = MonitorProcess(envs[0]), MonitorProcess(envs[1])   # same instant
        monitors = {"A": first, "B": second}
        try:
            def roles():
                texts = {k: read_text(m.log_file) for k, m in monitors.items()}
                active = [k for k, t in texts.items() if STARTED in t]
                waiting = [k for k, t in texts.items() if STANDBY in t]
                return active, waiting
            if not wait_until(lambda: roles()[0] and roles()[1], 30):
                active, waiting = roles()
                problems.append(f"papéis não definidos em 30 s: ativo={active} espera={waiting}")
                return result
            active_name, standby_name = roles()[0][0], roles()[1][0]
            if len(roles()[0]) != 1 or len(roles()[1]) != 1:
                problems.append(f"os dois iniciaram o envio: {roles()}")
            active, standby = monitors[active_name], monitors[standby_name]
            result["active"], result["standby"] = active_name, standby_name

            # a third one with --drain gives up at once (exit code 4) and sends nothing
            third = MonitorProcess(envs[2], ("--drain",))
            code = finish_within(third, 30)
            third_text = read_text(third.log_file)
            result["third_exit"] = code
            if code != 4 or STANDBY not in third_text or SENT_ANY.search(third_text):
                problems.append(f"terceiro monitor (--drain) deveria sair com 4 sem enviar: código {code}")

            target = max(1, int(solicitations * kill_fraction))
            if not wait_until(lambda: api.state()["posts"] >= target, 60, 0.05):
                problems.append(f"a instância ativa não chegou a {target} POSTs em 60 s")
            standby_text = read_text(standby.log_file)
            result["standby_sent_before_kill"] = len(SENT_ANY.findall(standby_text))
            if result["standby_sent_before_kill"] or TOOK_LOCK in standby_text:
                problems.append("a instância em espera enviou antes da queda da ativa")
            result["posts_at_kill"] = api.state()["posts"]
            result["checkpoint_at_kill"] = checkpoint(url)
            active.kill9()
            killed_at = time.monotonic()

            if wait_until(lambda: TOOK_LOCK in read_text(standby.log_file), takeover_timeout, 0.05):
                result["takeover_s"] = round(time.monotonic() - killed_at, 2)
            else:
                problems.append(f"a reserva não assumiu em {takeover_timeout:.0f} s")
            posts_at_lock = api.state()["posts"]
            if wait_until(lambda: api.state()["posts"] > posts_at_lock, takeover_timeout, 0.05):
                result["first_post_s"] = round(time.monotonic() - killed_at, 2)
            if not wait_until(lambda: (checkpoint(url) or 0) >= last_id, drain_timeout, 0.2):
                problems.append(f"a fila não esvaziou em {drain_timeout:.0f} s depois da troca")
            code = standby.stop(60)
            if code != 0:
                problems.append(f"a reserva saiu com código {code} ao receber SIGTERM")
        finally:
            for m in monitors.values():
                if m.alive():
                    m.kill9()

        report = verify(api, url, ids, dirs[0] / "failed")
        files = sum(len(failure_files(d / "failed")) for d in dirs)
        active_text, standby_text = read_text(active.log_file), read_text(standby.log_file)
        result.update({
            "items": len(ids), "stored": report["stored"], "missing": len(report["missing"]),
            "duplicates": len(report["duplicates"]), "checkpoint": report["checkpoint"],
            "last_id": last_id, "failure_files": files, "posts_by_status": report["posts_by_status"],
            "delivered_by_active": len(DELIVERED.findall(active_text)),
            "delivered_by_standby": len(DELIVERED.findall(standby_text)),
            "dup409_by_standby": standby_text.count("(já recebida antes: 409)"),
        })
        if not report["ok"]:
            problems.append(f"verificação: perdidos {len(report['missing'])}, em dobro "
                            f"{len(report['duplicates'])}, checkpoint {report['checkpoint']}/{last_id}")
        if files:
            problems.append(f"{files} arquivos de falha (esperado 0)")
        if report["posts_by_status"].get("201", 0) != solicitations:
            problems.append(f"{report['posts_by_status'].get('201', 0)} POSTs 201 para "
                            f"{solicitations} solicitações")
    result["ok"] = not problems
    return result


def render(rows: list[dict]) -> str:
    headers = ["rodada", "ativa", "reserva", "3º (--drain)", "envios da reserva antes do kill",
               "POSTs no kill", "assumiu em (s)", "1º POST da reserva (s)",
               "entregas registradas ativa/reserva",
               "409 da reserva", "itens", "guardados", "perdidos", "duplicados", "checkpoint",
               "POSTs por status", "ok"]
    table = []
    for r in rows:
        posts = ", ".join(f"{k}:{v}" for k, v in sorted(r.get("posts_by_status", {}).items()))
        table.append([r["round"], r.get("active"), r.get("standby"), f"código {r.get('third_exit')}",
                      r.get("standby_sent_before_kill"), r.get("posts_at_kill"), r["takeover_s"],
                      r["first_post_s"],
                      f"{r.get('delivered_by_active')}/{r.get('delivered_by_standby')}",
                      r.get("dup409_by_standby"), r.get("items"), r.get("stored"), r.get("missing"),
                      r.get("duplicates"), f"{r.get('checkpoint')}/{r.get('last_id')}", posts,
                      "sim" if r["ok"] else "NÃO"])
    return format_table(headers, table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Duas instâncias do monitor no mesmo banco.")
    parser.add_argument("--solicitations", type=int, default=600, help="solicitações (padrão 600)")
    parser.add_argument("--items", type=int, default=2)
    parser.add_argument("--latency", type=float, default=0.05, help="latência da API falsa (s)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="rodadas (banco novo em cada)")
    parser.add_argument("--kill-fraction", type=float, default=0.6,
                        help="a ativa morre depois de POSTar esta fração das solicitações")
    args = parser.parse_args(argv)
    if pg_unreachable():
        return 2
    rows = []
    for n in range(1, args.rounds + 1):
        row = run_round(args.solicitations, args.items, args.latency, args.concurrency,
                        args.kill_fraction, label=str(n))
        rows.append(row)
        print(f"[rodada {n}] assumiu em {row['takeover_s']} s — "
              f"{'ok' if row['ok'] else 'VIOLAÇÃO: ' + '; '.join(row['problems'])}", flush=True)
    print()
    print(f"Duas instâncias no mesmo banco: {args.solicitations} solicitações x {args.items} itens, "
          f"concorrência {args.concurrency}, latência da API {args.latency} s; a reserva tenta o "
          "bloqueio a cada POLL_SECONDS (entre 1 e 15 s)")
    print(render(rows))
    times = [r["takeover_s"] for r in rows if r["takeover_s"] is not None]
    if times:
        print(f"\nTempo até a reserva assumir: mín {min(times):.1f} s, máx {max(times):.1f} s "
              f"(limite teórico: 15 s de intervalo + partida)")
    bad = [r for r in rows if not r["ok"]]
    if bad:
        print("\nVIOLAÇÕES:")
        for r in bad:
            for p in r["problems"]:
                print(f"  - rodada {r['round']}: {p}")
        return 1
    print("\nNenhuma violação: só uma instância enviou de cada vez, a reserva assumiu, cada item "
          "guardado uma vez.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
