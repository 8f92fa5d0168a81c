#!/usr/bin/env python3
"""Quedas do monitor: `kill -9` em momentos aleatórios enquanto ele esvazia a fila, reinício,
repetido N vezes para cada concorrência; no fim o monitor termina sozinho (`--drain`).

Esperado (README, "Garantias de entrega"): cada item guardado pela API exatamente uma vez (o
reenvio depois de uma queda usa a mesma Idempotency-Key e recebe 409, não é guardado de
novo), exatamente um POST 201 por solicitação, checkpoint == último CodItemSol, nenhum
arquivo de falha, nenhuma linha "sending" sobrando em _MonitorItems.

O atraso de cada kill é uniforme em [--min-delay, --max-delay] segundos a partir do início do
processo (semente fixa): cai na partida (conexão, criação das tabelas, checkpoint, catálogo),
no envio ou na gravação dos resultados. A API falsa responde com uma latência pequena
(--latency-per-worker x concorrência, ~50 solicitações/s nas duas concorrências) para que a
fila dure os kills pedidos.

Um POST cujo corpo não chegou inteiro (o kill -9 caiu entre o envio dos cabeçalhos e o do
corpo) é descartado pela API falsa sem ser visto, como faz um servidor HTTP real (até a
correção da API falsa ele era respondido com 400 e a chave ficava lembrada: perda falsa).

Depois, um cenário dirigido (desligável com --skip-body-error-crash): a API responde "201 com
erro no corpo" (nada salvo, chave lembrada) e o monitor morre logo em seguida; no reinício o
reenvio com a mesma chave recebe 409 e NÃO pode ser contado como entregue (até b227f49 era:
itens perdidos; corrigido em 3787e23, a falha é gravada assim que a resposta chega).

Uso: python -m reliability.crash_trials [--solicitations 2000] [--kills 50] [--concurrency 1 4]
Sai com código 1 em qualquer violação.
"""
from __future__ import annotations

import argparse
import random
import sys
import time

from .common import (FakeApiProcess, MonitorProcess, PgDatabase, checkpoint,
                    fake_api_with, failure_files, finish_within, format_table, pg_unreachable,
                    read_text, seed, sql, temp_dir, verify, wait_until, write_env)

LOCK_BUSY = 4   # monitor_bemsoft.py exit code: another monitor holds the lock


def run_trials(concurrency: int, solicitations: int = 2000, items: int = 2, kills: int = 50,
               min_delay: float = 0.1, max_delay: float = 3.0, latency_per_worker: float = 0.02,
               batch_size: int = 100, seed_value: int = 11, max_seconds: float = 900.0,
               log=print) -> dict:
    rng = random.Random(f"{seed_value}-{concurrency}")
    work = temp_dir(f"crash-c{concurrency}-")
    latency = latency_per_worker * concurrency
    started = time.monotonic()
    deadline = started + max_seconds
    stats = {"concurrency": concurrency, "solicitations": solicitations, "items": solicitations * items,
             "kills": 0, "kills_while_draining": 0, "kills_before_first_post": 0, "lives": 0,
             "lock_refusals": 0, "finished_alone": 0, "delays": [], "problems": [],
             "latency": latency, "batch_size": batch_size, "work": str(work)}
    with PgDatabase() as url, FakeApiProcess(latency=latency) as api:
        ids = seed(url, solicitations, items)
        last_id = max(ids)
        env = write_env(work, url, api.url, BEMSOFT_CONCURRENCY=concurrency, BATCH_SIZE=batch_size)
        drained = False
        while stats["kills"] < kills and time.monotonic() < deadline:
            posts_before = api.state()["posts"]
            monitor = MonitorProcess(env, ("--drain",))
            stats["lives"] += 1
            delay = rng.uniform(min_delay, max_delay)
            code = finish_within_or_none(monitor, delay)
            if code is None:          # still running at its moment: kill -9
                monitor.kill9()
                stats["kills"] += 1
                stats["delays"].append(delay)
                cp = checkpoint(url) or 0
                if api.state()["posts"] == posts_before:
                    stats["kills_before_first_post"] += 1
                if cp < last_id:
                    stats["kills_while_draining"] += 1
                if stats["kills"] % 10 == 0:
                    log(f"  concorrência {concurrency}: {stats['kills']} kills, checkpoint {cp}/{last_id}, "
                        f"POSTs {api.state()['posts_by_status']}")
            elif code == LOCK_BUSY:   # the killed process's session still held the lock
                stats["lock_refusals"] += 1
                time.sleep(0.3)
            elif code == 0:
                stats["finished_alone"] += 1
                if (checkpoint(url) or 0) >= last_id:
                    drained = True
                    break
            else:
                stats["problems"].append(f"monitor saiu com código {code} na vida {stats['lives']}")
                break
        if stats["kills"] < kills:
            why = "a fila esvaziou antes (aumente --latency-per-worker)" if drained else "tempo esgotado"
            stats["problems"].append(f"só {stats['kills']} kills de {kills}: {why}")
        if stats["kills_while_draining"] < min(kills, stats["kills"]):
            stats["problems"].append(f"só {stats['kills_while_draining']} kills com a fila pendente")

        # let it finish
        final_started = time.monotonic()
        final_code = None
        for _ in range(10):
            monitor = MonitorProcess(env, ("--drain",))
            final_code = finish_within(monitor, max(60.0, deadline - time.monotonic()))
            if final_code != LOCK_BUSY:
                break
            stats["lock_refusals"] += 1
            time.sleep(0.5)
        stats["final_drain_seconds"] = round(time.monotonic() - final_started, 1)
        if final_code != 0:
            stats["problems"].append(f"execução final saiu com código {final_code}")

        report = verify(api, url, ids, work / "failed")
        sending_left = sql(url, 'SELECT count(*) FROM "_MonitorItems" WHERE "Status" = \'sending\'')
        output = read_text(work / "monitor.out")
        stats.update({
            "posts_by_status": report["posts_by_status"], "stored": report["stored"],
            "missing": len(report["missing"]), "duplicates": len(report["duplicates"]),
            "checkpoint": report["checkpoint"], "last_id": report["last_id"],
            "failure_files": len(failure_files(work / "failed")), "sending_left": sending_left,
            "tracebacks": output.count("Traceback"),
            "error_lines": sum(1 for line in output.splitlines() if " ERROR " in line),
            "seconds": round(time.monotonic() - started, 1),
        })
        created = report["posts_by_status"].get("201", 0)
        stats["problems"] += report["problems"]
        if created != solicitations:
            stats["problems"].append(f"{created} POSTs 201 para {solicitations} solicitações")
        if sending_left:
            stats["problems"].append(f"{sending_left} itens ainda 'sending' em _MonitorItems")
        if stats["tracebacks"]:
            stats["problems"].append(f"{stats['tracebacks']} tracebacks no log do monitor")
    stats["ok"] = not stats["problems"]
    return stats


def crash_after_body_error(concurrency: int, good: int = 20, latency: float = 0.1,
                           timeout: float = 60.0) -> dict:
    """Regression probe: the real API answers 201 with an error body (nothing saved, key
    remembered, SPEC §5.1-5.2) and the monitor is killed right after. Up to b227f49 the
    failure was recorded only when the whole page was settled, so the restart re-sent the
    same key, got 409 and counted the solicitation as delivered (items lost); since 3787e23
    the sender writes the failure file as soon as the answer arrives.

    The fake runs with --max-external-id 12, so solicitation 1000000 ("order-1000000") gets
    that answer; it has the lowest item ids, so it is the first POST of the page. The kill
    comes right after that POST was answered, while the rest of the page is still being sent
    (up to b227f49 the monitor recorded failures only when the whole page was done)."""
    work = temp_dir(f"crash-bodyerr-c{concurrency}-")
    result = {"concurrency": concurrency, "problems": []}
    with PgDatabase() as url, fake_api_with("--max-external-id", "12", latency=latency) as api:
        bad = seed(url, 1, 2, first_cod=1000000)
        ids = bad + seed(url, good, 2, first_cod=1)
        env = write_env(work, url, api.url, BEMSOFT_CONCURRENCY=concurrency)
        monitor = MonitorProcess(env, ("--drain",))
        answered = concurrency + 1      # the POSTs after it prove its answer came back
        if not wait_until_posts(api, answered, 30):
            monitor.kill9()
            result["problems"].append("a API falsa não recebeu os POSTs esperados")
            return result
        result["failure_file_before_kill"] = bool(failure_files(work / "failed"))
        monitor.kill9()
        result["status_before_restart"] = sql(
            url, 'SELECT min("Status") FROM "_MonitorItems" WHERE "CodItemSol" = :i', i=bad[0])
        code = finish_within(MonitorProcess(env, ("--drain",)), timeout)
        report = verify(api, url, ids, work / "failed", expect_failures=True)
        output = read_text(work / "monitor.log")       # LOG_FILE: the INFO lines too
        result.update({
            "exit_code": code, "bad_items": bad, "missing": report["missing"],
            "failure_files": len(failure_files(work / "failed")),
            "checkpoint": report["checkpoint"], "last_id": report["last_id"],
            "posts_by_status": report["posts_by_status"],
            "counted_delivered_409": "Solicitação 1000000 entregue" in output and "HTTP 409" in output,
        })
        if report["missing"]:
            result["problems"].append(
                f"itens {report['missing']} perdidos: a API respondeu 201 com erro (nada salvo), o "
                "monitor morreu antes de gravar a falha e, no reinício, o 409 da mesma chave foi "
                f"contado como entregue; checkpoint {report['checkpoint']} passou por eles")
    result["ok"] = not result["problems"]
    return result


def wait_until_posts(api, n: int, timeout: float) -> bool:
    return wait_until(lambda: api.state()["posts"] >= n, timeout, 0.01)


def finish_within_or_none(monitor: MonitorProcess, seconds: float) -> int | None:
    """Exit code if the monitor ends within `seconds`, else None (left running)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        code = monitor.proc.poll()
        if code is not None:
            monitor._out.close()
            return code
        time.sleep(min(0.02, max(0.0, end - time.monotonic())))
    code = monitor.proc.poll()
    if code is not None:
        monitor._out.close()
    return code


def render(rows: list[dict]) -> str:
    headers = ["concorrência", "kills", "c/ fila pendente", "antes do 1º POST", "vidas",
               "recusas do bloqueio", "itens", "guardados", "perdidos", "duplicados",
               "POSTs por status", "checkpoint", "arq. falha", "segundos", "ok"]
    table = []
    for r in rows:
        posts = ", ".join(f"{k}:{v}" for k, v in sorted(r["posts_by_status"].items()))
        table.append([r["concurrency"], r["kills"], r["kills_while_draining"],
                      r["kills_before_first_post"], r["lives"], r["lock_refusals"], r["items"],
                      r["stored"], r["missing"], r["duplicates"], posts,
                      f"{r['checkpoint']}/{r['last_id']}", r["failure_files"], r["seconds"],
                      "sim" if r["ok"] else "NÃO"])
    return format_table(headers, table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="kill -9 aleatório no monitor real, com reinício.")
    parser.add_argument("--solicitations", type=int, default=2000, help="solicitações (padrão 2000)")
    parser.add_argument("--items", type=int, default=2, help="itens por solicitação (padrão 2)")
    parser.add_argument("--kills", type=int, default=50, help="kills por concorrência (padrão 50)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--min-delay", type=float, default=0.1, help="atraso mínimo do kill (s)")
    parser.add_argument("--max-delay", type=float, default=3.0, help="atraso máximo do kill (s)")
    parser.add_argument("--latency-per-worker", type=float, default=0.02,
                        help="latência da API falsa por worker (s); a latência é isto x concorrência")
    parser.add_argument("--batch-size", type=int, default=100, help="BATCH_SIZE do monitor (padrão 100)")
    parser.add_argument("--seed", type=int, default=11, help="semente dos atrasos")
    parser.add_argument("--max-seconds", type=float, default=900.0,
                        help="limite de tempo por concorrência (s)")
    parser.add_argument("--skip-body-error-crash", action="store_true",
                        help="não roda o cenário 'kill -9 depois de um 201 com erro'")
    args = parser.parse_args(argv)
    if pg_unreachable():
        return 2

    rows = []
    for concurrency in args.concurrency:
        print(f"Concorrência {concurrency}: {args.solicitations} solicitações x {args.items} itens, "
              f"{args.kills} kills com atraso uniforme em [{args.min_delay}, {args.max_delay}] s "
              f"(semente {args.seed}), latência da API {args.latency_per_worker * concurrency:.3f} s, "
              f"BATCH_SIZE={args.batch_size}", flush=True)
        row = run_trials(concurrency, args.solicitations, args.items, args.kills, args.min_delay,
                         args.max_delay, args.latency_per_worker, args.batch_size, args.seed,
                         args.max_seconds, log=lambda m: print(m, flush=True))
        rows.append(row)
        delays = row["delays"]
        if delays:
            print(f"  atrasos dos kills: mín {min(delays):.2f} s, média {sum(delays) / len(delays):.2f} s, "
                  f"máx {max(delays):.2f} s; execução final {row['final_drain_seconds']} s; "
                  f"linhas ERROR no log: {row['error_lines']}", flush=True)

    print()
    print("Quedas com kill -9 (POSTs por status = tudo o que a API recebeu; 409 = reenvio "
          "após queda com a mesma chave, não guardado de novo)")
    print(render(rows))
    probes = []
    if not args.skip_body_error_crash:
        print("\nkill -9 logo depois de um '201 com erro no corpo' da API (chave lembrada, SPEC §5.2):")
        for concurrency in args.concurrency:
            probe = crash_after_body_error(concurrency)
            probes.append(probe)
            print(f"  concorrência {concurrency}: arquivo de falha antes do kill: "
                  f"{probe.get('failure_file_before_kill')}; status em _MonitorItems: "
                  f"{probe.get('status_before_restart')}; depois do reinício: perdidos "
                  f"{probe.get('missing')}, arquivos de falha {probe.get('failure_files')}, contado "
                  f"como entregue (409): {probe.get('counted_delivered_409')}, checkpoint "
                  f"{probe.get('checkpoint')}/{probe.get('last_id')}, POSTs {probe.get('posts_by_status')}"
                  f" — {'ok' if probe['ok'] else 'VIOLAÇÃO'}", flush=True)
    bad = [r for r in rows + probes if not r["ok"]]
    if bad:
        print("\nVIOLAÇÕES:")
        for r in bad:
            for p in r["problems"]:
                print(f"  - concorrência {r['concurrency']}: {p}")
        return 1
    print("\nNenhuma violação: cada item guardado uma vez, um 201 por solicitação, checkpoint no "
          "último item, nenhum arquivo de falha, nada 'sending' sobrando.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
