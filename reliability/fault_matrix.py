#!/usr/bin/env python3
"""Matriz de falhas da API: cada falha sozinha e depois todas misturadas, com o monitor de
verdade (`monitor_bemsoft.py --drain`, processo próprio), PostgreSQL de verdade e a API falsa
do projeto em processo próprio, para BEMSOFT_CONCURRENCY=1 e 4.

Esperado (SPEC §5-§6):
- falhas transitórias (429 com Retry-After, 500, 502, 503, 504, timeout do cliente, conexão
  derrubada, resposta lenta) -> tudo entregue exatamente uma vez, NENHUM arquivo de falha;
- falhas permanentes (400, 201 com erro no corpo) -> só as solicitações atingidas em
  FAILED_DIR, com o motivo e o http_status; todas as outras entregues;
- token recusado (401) -> o envio pausa para todos, nada vai para FAILED_DIR, e tudo é
  entregue exatamente uma vez, com as mesmas chaves, quando o token volta a ser aceito;
- 409 (chave já recebida) -> conta como entregue, a API guarda cada exame uma vez;
- em todos os casos: nenhum item perdido (guardado uma vez OU num arquivo de falha, nunca os
  dois, nunca nenhum) e checkpoint == último CodItemSol.

Como cada falha é injetada (POST /_fake/faults na API falsa):
- transitórias: `fail_next` com n=5 (mais que as 3 tentativas imediatas de um envio, então a
  pausa geral do monitor e o reenvio no ciclo seguinte também são exercitados); 429 com
  `Retry-After: 1`; `drop_next` 5; `timeout_next` 3 com atraso maior que BEMSOFT_TIMEOUT (a API
  guarda o pedido e responde tarde: o reenvio com a mesma chave recebe 409).
- 400 / 201 com erro: `fail_next` n=2 com o status (e o corpo) da API real. 401: `fail_next`
  n=5; o `GET /tests` não é afetado por `fail_next`, então o catálogo carrega com o token
  válido e o 401 chega no POST — como um token revogado e depois restabelecido entre a leitura
  do catálogo e o envio. Caso extra "token errado": o monitor parte com um token que a API recusa já no
  `GET /tests`; esperado: nada enviado, nada em FAILED_DIR, checkpoint parado; com o token
  corrigido tudo é entregue.
- 409 realista: o monitor entrega metade; apagamos as linhas dele em _MonitorItems e
  _MonitorState (como uma restauração de backup do banco) e inserimos a outra metade; a
  segunda execução reenvia a primeira metade com as mesmas chaves -> 409 -> conta entregue.
- lenta: latência de 1,5 s (abaixo do BEMSOFT_TIMEOUT=2 s) nos primeiros POSTs; esperado:
  nenhuma retentativa (só 201).
- 201-com-erro-real: em vez de `fail_next`, a API falsa roda com `--max-external-id 12` e a
  solicitação 1000000 ("order-1000000") recebe o 201 com erro da própria API, que LEMBRA a
  chave (SPEC §5.2). Esperado: arquivo de falha com http_status 201.
- timeout+201-com-erro-real: o mesmo, mas essa resposta chega depois do BEMSOFT_TIMEOUT; o
  reenvio com a mesma chave recebe 409. A API não diz se a primeira tentativa foi salva ou
  recusada no corpo; o monitor conta como entregue (o caso comum) e avisa no log quais exames
  conferir. É um LIMITE CONHECIDO da API (docs/RELIABILITY.md): o caso é mostrado no relatório
  e não conta como violação.
- misto: `fault_rate` 10% com 429/500/502/503/504 (semente fixa, latência base de 30 ms) e,
  agendadas durante o envio, 400, queda de conexão, 401, 429 com Retry-After, 201 com erro, um
  trecho lento, 503 e por último um timeout.

Uso: python -m reliability.fault_matrix [--solicitations 100] [--items 2] [--concurrency 1 4]
     [--faults 400 503 ...] [--seed 7]
Sai com código 1 se qualquer caso violar o esperado.
"""
from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .common import (FakeApiProcess, MonitorProcess, PgDatabase, checkpoint, fake_api_with,
                    failure_files, finish_within, format_table, pg_unreachable, read_text, seed, sql,
                    temp_dir, verify, write_env)

CLIENT_TIMEOUT = 2.0          # BEMSOFT_TIMEOUT in these runs
SLOW = 1.5                    # latency of a slow (but in time) answer
MIXED_LATENCY = 0.03          # base latency of the mixed case
TRANSIENT_N = 5               # consecutive transient failures injected
PERMANENT_N = 2               # POSTs answered with a permanent failure
BODY_ERROR = {"error": "Não foi possível salvar os dados recebidos no lote sol-X."}
BODY_400 = {"errors": ["batch.order.patient.birthDate: deve ser data AAAA-MM-DD"]}
BODY_401 = {"error": "token inválido"}

TRANSIENT = "transitória"
PERMANENT = "permanente"

ALL_FAULTS = ["400", "401", "401-token-errado", "409", "429", "500", "502", "503", "504",
              "timeout", "conexao-derrubada", "201-com-erro", "201-com-erro-real",
              "timeout+201-com-erro-real", "lenta", "misto"]
# reported, not counted as violations: what the API cannot tell (docs/RELIABILITY.md)
KNOWN_LIMITATIONS = {"timeout+201-com-erro-real"}
LONG_COD = 1000000            # "order-1000000" is longer than --max-external-id 12


@dataclass
class Case:
    """What one run needs and what it found."""
    fault: str
    concurrency: int
    url: str
    api: FakeApiProcess
    work: Path
    env: Path
    solicitations: int
    items: int
    rng: random.Random
    timeout: float
    ids: list = field(default_factory=list)
    expected_statuses: list = field(default_factory=list)   # http_status of failure files
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    seconds: float = 0.0
    exit_codes: list = field(default_factory=list)
    quick: bool = False          # CI: shorter slow phase and token-wait


    def seed(self, n: int, first_cod: int = 1) -> list[int]:
        new = seed(self.url, n, self.items, first_cod=first_cod)
        self.ids += new
        return new

    def drain(self, env: Path | None = None) -> str:
        """One `--drain` run; returns its log (LOG_FILE)."""
        monitor = MonitorProcess(env or self.env, ("--drain",))
        started = time.monotonic()
        code = finish_within(monitor, self.timeout)
        self.seconds += time.monotonic() - started
        self.exit_codes.append(code)
        if code is None:
            self.problems.append(f"--drain não terminou em {self.timeout:.0f} s (morto)")
        elif code != 0:
            self.problems.append(f"--drain saiu com código {code}")
        return read_text(monitor.log_file)

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.problems.append(message)


class Scheduler(threading.Thread):
    """Injects faults while the monitor sends: each step waits until the API has seen
    `at` POSTs (and the previous `fail_next` was consumed), then posts its options."""

    def __init__(self, api: FakeApiProcess, steps: list[dict]):
        super().__init__(daemon=True)
        self.api, self.steps, self.stop = api, steps, threading.Event()
        self.applied: list[dict] = []
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            for step in self.steps:
                while not self.stop.is_set():
                    state = self.api.state()
                    idle = state["faults"]["fail_next"] == 0 and state["faults"]["timeout_next"] == 0
                    if state["posts"] >= step["at"] and idle:
                        break
                    self.stop.wait(0.02)
                if self.stop.is_set():
                    return
                if step.get("pause"):
                    if self.stop.wait(step["pause"]):
                        return
                self.api.faults(**step["faults"])
                self.applied.append(step)
        except Exception as err:  # reported by the case, never silently lost
            self.error = err


def _run_with_scheduler(case: Case, steps: list[dict]) -> Scheduler:
    scheduler = Scheduler(case.api, steps)
    scheduler.start()
    try:
        case.drain()
    finally:
        scheduler.stop.set()
        scheduler.join(10)
    if scheduler.error:
        case.problems.append(f"agendador de falhas: {scheduler.error!r}")
    return scheduler


# ------------------------------------------------------------------ the cases
def case_transient(case: Case, options: dict, status_label: str | None) -> None:
    case.seed(case.solicitations)
    case.api.faults(**options)
    case.drain()
    state = case.api.state()
    pending = state["faults"]
    case.check(pending["fail_next"] == 0 and pending["drop_next"] == 0 and pending["timeout_next"] == 0,
               f"falha injetada não foi consumida: {pending}")
    if status_label:
        seen = state["posts_by_status"].get(status_label, 0)
        case.check(seen >= TRANSIENT_N, f"esperados {TRANSIENT_N} POSTs com {status_label}, vistos {seen}")


def case_timeout(case: Case) -> None:
    case.seed(case.solicitations)
    case.api.faults(timeout_next={"n": 3, "seconds": CLIENT_TIMEOUT + 1.5})
    case.drain()
    by_status = case.api.state()["posts_by_status"]
    # the API stored the timed-out requests; their re-sends with the same key must get 409
    case.check(by_status.get("409", 0) >= 3,
               f"esperados >= 3 POSTs 409 (reenvio após timeout), vistos {by_status.get('409', 0)}")
    case.notes.append("reenvio após timeout recebeu 409 (a API já tinha guardado)")


def case_permanent(case: Case, status: int, body) -> None:
    case.seed(case.solicitations)
    case.api.faults(fail_next={"n": PERMANENT_N, "status": status, "body": body})
    case.drain()
    case.expected_statuses = [status] * PERMANENT_N


def case_slow(case: Case) -> None:
    case.seed(case.solicitations)
    case.api.faults(latency=SLOW)
    slow_posts = min(1 if case.quick else 8, case.solicitations)
    _run_with_scheduler(case, [{"at": slow_posts, "faults": {"latency": 0}}])
    by_status = case.api.state()["posts_by_status"]
    case.check(set(by_status) == {"201"} and by_status["201"] == case.solicitations,
               f"resposta lenta (abaixo do timeout) não deveria causar retentativa: {by_status}")
    case.notes.append(f"{slow_posts}+ POSTs com {SLOW:.1f} s de latência (timeout {CLIENT_TIMEOUT:.0f} s)")


def case_409(case: Case) -> None:
    first = case.solicitations // 2 or 1
    case.seed(first)
    case.drain()
    sql(case.url, 'DELETE FROM "_MonitorItems"')
    sql(case.url, 'DELETE FROM "_MonitorState"')
    rest = case.solicitations - first
    if rest:
        case.seed(rest, first_cod=first + 1)
    output = case.drain()
    by_status = case.api.state()["posts_by_status"]
    dup_lines = output.count("(já recebida antes: 409)")
    case.check(by_status.get("409", 0) == first,
               f"esperados {first} POSTs 409, vistos {by_status.get('409', 0)}")
    case.check(dup_lines == first,
               f"o monitor deveria registrar {first} entregas '409', registrou {dup_lines}")
    summary = [line for line in output.splitlines() if "Monitor encerrado" in line]
    expected = f"Monitor encerrado: {case.solicitations} solicitações entregues"
    case.check(bool(summary) and expected in summary[-1],
               f"resumo da 2ª execução deveria dizer '{expected}': {summary[-1:]!r}")
    case.notes.append(f"{first} reenviadas após apagar _MonitorItems/_MonitorState -> "
                      "409 contadas como entregues")


def case_bad_token(case: Case) -> None:
    case.seed(case.solicitations)
    bad_dir = case.work / "token_errado"
    bad_dir.mkdir()
    bad_env = write_env(bad_dir, case.url, case.api.url, BEMSOFT_TOKEN="token-revogado",
                        BEMSOFT_CONCURRENCY=case.concurrency, BEMSOFT_TIMEOUT=CLIENT_TIMEOUT,
                        FAILED_DIR=str(case.work / "failed"))
    monitor = MonitorProcess(bad_env)          # loop mode: it must wait, not fail items
    started = time.monotonic()
    time.sleep(2.0 if case.quick else 4.0)
    code = monitor.stop(30)
    case.seconds += time.monotonic() - started
    output = read_text(monitor.log_file)
    state = case.api.state()
    case.check(code == 0, f"monitor com token errado saiu com código {code}")
    case.check(state["posts"] == 0, f"com token errado nenhum POST deveria sair: {state['posts']}")
    case.check(not failure_files(case.work / "failed"),
               "token errado não deveria gerar arquivo de falha (o catálogo nem carrega)")
    case.check("HTTP 401" in output and "BEMSOFT_TOKEN" in output,
               "o log deveria dizer que a API recusou o token (HTTP 401, BEMSOFT_TOKEN)")
    cp = checkpoint(case.url)
    case.check(cp in (None, 0), f"checkpoint não pode andar sem entrega: {cp}")
    case.notes.append(f"token errado: {state['tests_calls']} GET /tests com 401, 0 POST, "
                      "0 arquivo, checkpoint parado; depois, token certo:")
    case.drain()


def case_mixed(case: Case) -> None:
    n = case.solicitations
    case.seed(n)
    # a small base latency so that the scheduled faults land while the queue is being sent
    case.api.faults(latency=MIXED_LATENCY,
                    fault_rate={"rate": 0.10, "statuses": [429, 500, 502, 503, 504],
                                "seed": case.rng.randrange(1 << 30)})
    at = lambda frac: max(1, int(n * frac))  # noqa: E731
    steps = [
        {"at": at(0.10), "faults": {"fail_next": {"n": 1, "status": 400, "body": BODY_400}}, "status": 400},
        {"at": at(0.20), "faults": {"drop_next": 2}},
        {"at": at(0.30), "faults": {"fail_next": {"n": 1, "status": 401, "body": BODY_401}}},
        {"at": at(0.40), "faults": {"fail_next": {"n": 2, "status": 429, "retry_after": 1}}},
        {"at": at(0.50), "faults": {"fail_next": {"n": 1, "status": 201, "body": BODY_ERROR}},
         "status": 201},
        {"at": at(0.60), "faults": {"latency": 1.0}},
        {"at": at(0.65), "faults": {"latency": MIXED_LATENCY}},
        {"at": at(0.70), "faults": {"fail_next": {"n": 2, "status": 503}}},
        # last: the timed-out request is stored by the API and its re-send must meet the
        # API's 409, not an injected permanent failure (the real API checks the key first)
        {"at": at(0.80), "faults": {"timeout_next": {"n": 1, "seconds": CLIENT_TIMEOUT + 1.5}}},
    ]
    scheduler = _run_with_scheduler(case, steps)
    pending = case.api.state()["faults"]
    expected = [s["status"] for s in scheduler.applied if "status" in s]
    case.expected_statuses = expected
    case.check(len(scheduler.applied) == len(steps) and not pending["fail_next"]
               and not pending["timeout_next"] and not pending["drop_next"],
               f"só {len(scheduler.applied)}/{len(steps)} falhas agendadas aplicadas e consumidas "
               f"(pendentes: {pending}); aumente --solicitations")
    case.notes.append(f"fault_rate 10% + {len(scheduler.applied)}/{len(steps)} falhas agendadas; "
                      f"permanentes esperadas: {expected}")


def case_real_body_error(case: Case, with_timeout: bool) -> None:
    """The real API's 201-with-error: the fake runs with --max-external-id 12, so the
    solicitation with cod 1000000 ("order-1000000", 13 characters) is answered 201 with an
    error body, nothing stored, and its Idempotency-Key remembered (SPEC §5.1, §5.2, §5.4).
    with_timeout: that answer also arrives after BEMSOFT_TIMEOUT (timeout_next), so the
    monitor never sees it and re-sends the same key -> 409."""
    bad = case.seed(1, first_cod=LONG_COD)
    case.seed(case.solicitations - 1, first_cod=1)
    if with_timeout:
        # the first wave of POSTs (one per sender) answers late: the bad solicitation, sent
        # first, is always among them
        case.api.faults(timeout_next={"n": case.concurrency, "seconds": CLIENT_TIMEOUT + 1.0})
    output = case.drain()
    # with the timeout the monitor never saw the 201: any failure file will do, lost will not
    case.expected_statuses = ["qualquer"] if with_timeout else [201]
    case.notes.append(f"solicitação {LONG_COD} (itens {bad}): 201 com erro da API falsa, chave lembrada"
                      + ("; resposta depois do timeout" if with_timeout else ""))
    if "HTTP 409" in output and f"Solicitação {LONG_COD} entregue" in output:
        case.notes.append(f"o monitor registrou a solicitação {LONG_COD} como ENTREGUE (409) "
                          "sem a API ter guardado nada")


def run_fault(fault: str, concurrency: int, solicitations: int = 100, items: int = 2,
              seed_value: int = 7, timeout: float = 240.0, quick: bool = False) -> dict:
    """Runs one (fault, concurrency) case in a fresh database and a fresh fake API."""
    rng = random.Random(f"{seed_value}-{fault}-{concurrency}")
    work = temp_dir(f"fm-{fault}-c{concurrency}-")
    real_body_error = fault in ("201-com-erro-real", "timeout+201-com-erro-real")
    api_factory = (lambda: fake_api_with("--max-external-id", "12")) if real_body_error else FakeApiProcess
    with PgDatabase() as url, api_factory() as api:
        env = write_env(work, url, api.url, BEMSOFT_CONCURRENCY=concurrency,
                        BEMSOFT_TIMEOUT=CLIENT_TIMEOUT)
        case = Case(fault, concurrency, url, api, work, env, solicitations, items, rng, timeout,
                    quick=quick)
        if fault in ("429", "500", "502", "503", "504"):
            options = {"n": TRANSIENT_N, "status": int(fault)}
            if fault == "429":
                options["retry_after"] = 1
            case_transient(case, {"fail_next": options}, fault)
        elif fault == "conexao-derrubada":
            case_transient(case, {"drop_next": TRANSIENT_N}, "dropped")
        elif fault == "timeout":
            case_timeout(case)
        elif fault == "400":
            case_permanent(case, 400, BODY_400)
        elif fault == "401":
            case_transient(case, {"fail_next": {"n": TRANSIENT_N, "status": 401, "body": BODY_401}}, "401")
        elif fault == "201-com-erro":
            case_permanent(case, 201, BODY_ERROR)
        elif fault == "lenta":
            case_slow(case)
        elif fault == "409":
            case_409(case)
        elif fault == "401-token-errado":
            case_bad_token(case)
        elif fault == "misto":
            case_mixed(case)
        elif real_body_error:
            case_real_body_error(case, with_timeout=fault.startswith("timeout"))
        else:
            raise ValueError(f"falha desconhecida: {fault}")
        return _evaluate(case)


def _evaluate(case: Case) -> dict:
    failed_dir = case.work / "failed"
    expect_failures = bool(case.expected_statuses)
    report = verify(case.api, case.url, case.ids, failed_dir, expect_failures=expect_failures)
    files = failure_files(failed_dir)
    statuses = sorted((f["http_status"] for f in files), key=str)
    case.problems += report["problems"]
    if case.expected_statuses == ["qualquer"]:
        if len(files) != 1:
            case.problems.append(f"esperado 1 arquivo de falha (qualquer status), há {len(files)}")
    elif statuses != sorted(case.expected_statuses):
        case.problems.append(f"arquivos de falha com http_status {statuses}, esperados "
                             f"{sorted(case.expected_statuses)}")
    for f in files:
        if not f["reason"]:
            case.problems.append(f"arquivo de falha sem motivo: {f['path']}")
        if f["mode"] & 0o077:
            case.problems.append(f"arquivo de falha legível por outros ({oct(f['mode'])}): {f['path']}")
    failed_items = sum(len(f["item_ids"]) for f in files)
    return {
        "fault": case.fault, "concurrency": case.concurrency, "items": len(case.ids),
        "stored": report["stored"], "failure_files": len(files), "failed_items": failed_items,
        "failure_statuses": statuses, "lost": len(report["missing"]),
        "duplicates": len(report["duplicates"]), "both": len(report["stored_and_failed"]),
        "checkpoint_ok": report["checkpoint"] == report["last_id"],
        "posts_by_status": report["posts_by_status"], "seconds": round(case.seconds, 1),
        "exit_codes": case.exit_codes, "problems": case.problems, "notes": case.notes,
        "ok": not case.problems, "reasons": sorted({f["reason"][:90] for f in files}),
    }


def kind_of(fault: str) -> str:
    if fault in ("400", "201-com-erro", "201-com-erro-real"):
        return PERMANENT
    if fault in ("409", "401-token-errado", "misto", "timeout+201-com-erro-real"):
        return "especial"
    return TRANSIENT


def render(rows: list[dict]) -> str:
    headers = ["falha", "tipo", "conc.", "itens", "entregues", "arq. falha (itens)", "status arq.",
               "perdidos", "duplicados", "os dois", "checkpoint", "segundos", "POSTs por status", "ok"]
    table = []
    for r in rows:
        posts = ", ".join(f"{k}:{v}" for k, v in sorted(r["posts_by_status"].items()))
        table.append([r["fault"], kind_of(r["fault"]), r["concurrency"], r["items"], r["stored"],
                      f"{r['failure_files']} ({r['failed_items']})",
                      ",".join(map(str, r["failure_statuses"])) or "-", r["lost"], r["duplicates"],
                      r["both"], "ok" if r["checkpoint_ok"] else "ERRADO", f"{r['seconds']:.1f}",
                      posts, "sim" if r["ok"] else "NÃO"])
    return format_table(headers, table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Matriz de falhas da API Bemsoft contra o monitor real.")
    parser.add_argument("--solicitations", type=int, default=100, help="solicitações por caso (padrão 100)")
    parser.add_argument("--items", type=int, default=2, help="itens por solicitação (padrão 2)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4],
                        help="valores de BEMSOFT_CONCURRENCY (padrão 1 4)")
    parser.add_argument("--faults", nargs="+", default=ALL_FAULTS, choices=ALL_FAULTS,
                        help="casos a rodar (padrão: todos)")
    parser.add_argument("--seed", type=int, default=7, help="semente das falhas aleatórias")
    parser.add_argument("--case-timeout", type=float, default=240.0,
                        help="limite de cada execução do monitor (s)")
    args = parser.parse_args(argv)
    if pg_unreachable():
        return 2

    rows, started = [], time.monotonic()
    for concurrency in args.concurrency:
        for fault in args.faults:
            row = run_fault(fault, concurrency, args.solicitations, args.items, args.seed,
                            args.case_timeout)
            rows.append(row)
            row["known_limitation"] = fault in KNOWN_LIMITATIONS and not row["ok"]
            status = ("ok" if row["ok"] else
                      ("LIMITE CONHECIDO (SPEC §5.2): " if row["known_limitation"] else "VIOLAÇÃO: ")
                      + "; ".join(row["problems"]))
            print(f"[{fault} / concorrência {concurrency}] {row['seconds']:.1f} s — {status}", flush=True)

    print()
    print(f"Matriz de falhas: {args.solicitations} solicitações x {args.items} itens por caso, "
          f"BEMSOFT_TIMEOUT={CLIENT_TIMEOUT:.0f} s, BEMSOFT_RETRIES=2, BEMSOFT_MAX_BACKOFF=2 s")
    print(render(rows))
    notes = [(r, n) for r in rows for n in r["notes"]]
    if notes:
        print("\nObservações:")
        for r, note in notes:
            print(f"  - {r['fault']} / {r['concurrency']}: {note}")
    reasons = sorted({(r["fault"], reason) for r in rows for reason in r["reasons"]})
    if reasons:
        print("\nMotivos gravados nos arquivos de falha:")
        for fault, reason in reasons:
            print(f"  - {fault}: {reason}")
    bad = [r for r in rows if not r["ok"] and not r["known_limitation"]]
    total = time.monotonic() - started
    for r in rows:
        if r["known_limitation"]:
            print(f"\nLimite conhecido — {r['fault']} / concorrência {r['concurrency']}: "
                  + "; ".join(r["problems"]) + " (a API não diz se a tentativa sem resposta foi "
                  "salva; o monitor avisa no log quais exames conferir)")
    if bad:
        print(f"\nVIOLAÇÕES em {len(bad)} de {len(rows)} casos ({total:.0f} s):")
        for r in bad:
            for p in r["problems"]:
                print(f"  - {r['fault']} / concorrência {r['concurrency']}: {p}")
        return 1
    print(f"\nTodos os {len(rows)} casos dentro do esperado ({total:.0f} s): nenhum item perdido, "
          "nenhum em dobro, falhas só onde a falha é permanente.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
