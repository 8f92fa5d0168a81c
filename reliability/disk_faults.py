#!/usr/bin/env python3
"""Falhas de disco na pasta de falhas (FAILED_DIR) com o monitor de verdade em laço
(`monitor_bemsoft.py`, processo próprio), PostgreSQL de verdade e a API falsa do projeto em
processo próprio.

O banco tem solicitações boas misturadas com algumas que falham de forma permanente
(paciente sem sexo e sem DEFAULT_GENDER: vão para FAILED_DIR). Enquanto o disco está com
defeito, o arquivo de falha não pode ser gravado:

- unwritable: FAILED_DIR é um caminho abaixo de um ARQUIVO comum (o root ignora as
  permissões, então chmod não serviria); conserto: o arquivo é removido;
- full: FAILED_DIR num tmpfs de 16 KiB cheio (`mount -t tmpfs -o size=16k`); conserto: o
  tmpfs é aumentado (`mount -o remount,size=1m`);
- readonly: FAILED_DIR num tmpfs montado só para leitura; conserto: `remount,rw`.
  (full e readonly exigem poder montar; sem isso são pulados com o motivo impresso.)

Esperado (SPEC §6 "not past a failure file that could not be written", README "Garantias de
entrega"): o erro aparece no log; o monitor continua entregando as solicitações boas e
continua tentando gravar a falha; o checkpoint não passa do primeiro item da solicitação
cuja falha não foi gravada; consertado o disco, os arquivos de falha aparecem (modo 0600,
com o motivo) e o checkpoint chega ao último CodItemSol; nada perdido nem repetido. Tudo que
é montado é desmontado no fim (try/finally).

Uso: python -m reliability.disk_faults [--good 60] [--bad 3] [--items 2]
     [--fault-seconds 5] [--modes unwritable full readonly]
Sai com código 1 se qualquer verificação falhar (2 se o PostgreSQL estiver inacessível).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from .common import (
    CheckpointWatcher,
    FakeApiProcess,
    MonitorProcess,
    PgDatabase,
    add_solicitation,
    count_in_log,
    failure_files,
    fill_disk,
    lab_item_ids,
    mount_permitted,
    mount_tmpfs,
    pg_unreachable,
    read_text,
    remount_tmpfs,
    temp_dir,
    umount,
    verify,
    wait_drained,
    wait_until,
    write_env,
)

MODES = ["unwritable", "full", "readonly"]
NEEDS_MOUNT = {"full", "readonly"}
UNWRITTEN_LINE = "O checkpoint fica parado até conseguir gravar"
STARTED_LINE = "Monitor iniciado"


@dataclass
class Outcome:
    mode: str
    skipped: str = ""
    violations: list[str] = field(default_factory=list)
    figures: dict = field(default_factory=dict)


def seed_mixed(db_url: str, good: int, bad: int, items: int) -> tuple[list[int], list[int], list[int]]:
    """`good` solicitations plus `bad` ones without gender spread among them (never last,
    so good solicitations after a bad one show that the monitor keeps delivering).
    Returns (good item ids, bad item ids, bad cods)."""
    total = good + bad
    bad_cods = {1 + (n + 1) * total // (bad + 1) for n in range(bad)} if bad else set()
    good_ids, bad_ids = [], []
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            for cod in range(1, total + 1):
                ids = add_solicitation(conn, cod, items, sexo=None if cod in bad_cods else "F")
                (bad_ids if cod in bad_cods else good_ids).extend(ids)
    finally:
        engine.dispose()
    return good_ids, bad_ids, sorted(bad_cods)


def break_disk(mode: str, work: Path) -> tuple[Path, Path | None]:
    """Returns (FAILED_DIR, mount point or None)."""
    if mode == "unwritable":
        blocker = work / "bloqueio"
        blocker.write_text("um arquivo comum onde deveria haver uma pasta\n", encoding="utf-8")
        return blocker / "failed", None
    mount = work / "mnt"
    if mode == "full":
        mount_tmpfs(mount, "16k")
        (mount / "failed").mkdir(mode=0o700)
        fill_disk(mount)
    else:
        mount_tmpfs(mount, "16k", read_only=True)
    return mount / "failed", mount


def fix_disk(mode: str, work: Path, mount: Path | None) -> str:
    if mode == "unwritable":
        (work / "bloqueio").unlink()
        return "arquivo no caminho removido"
    if mode == "full":
        remount_tmpfs(mount, "size=1m")
        return "tmpfs aumentado para 1 MiB"
    remount_tmpfs(mount, "rw")
    return "tmpfs remontado rw"


def run_mode(mode: str, args) -> Outcome:
    result = Outcome(mode)
    work = temp_dir(f"bm_disk_{mode}_")
    mount = None
    v = result.violations
    try:
        with PgDatabase() as url, FakeApiProcess(latency=args.latency) as api:
            good_ids, bad_ids, bad_cods = seed_mixed(url, args.good, args.bad, args.items)
            first_bad = min(bad_ids)
            failed_dir, mount = break_disk(mode, work)
            env = write_env(work, url, api.url, FAILED_DIR=failed_dir)
            log_file = work / "monitor.log"
            watcher = CheckpointWatcher(url, interval=0.1)
            watcher.start()
            monitor = MonitorProcess(env)
            started = time.monotonic()
            try:
                # phase 1: disk broken
                def good_all_delivered():
                    stored = {int(k[5:]) for k in api.state()["tests"]}
                    return set(good_ids) <= stored
                noticed = wait_until(lambda: count_in_log(log_file, UNWRITTEN_LINE) >= 1
                                     or not monitor.alive(), 60)
                delivered_good = wait_until(good_all_delivered, 60, interval=0.3)
                if not noticed:
                    v.append("o erro de gravação da falha não apareceu no log em 60 s")
                if not delivered_good:
                    v.append("as solicitações boas não foram todas entregues com o disco com defeito")
                time.sleep(args.fault_seconds)
                lines_after = count_in_log(log_file, UNWRITTEN_LINE)
                broken_s = time.monotonic() - started
                cp_during = max(watcher.checkpoint_values(), default=None)
                files_during = sorted(p.name for p in failed_dir.glob("*")) if failed_dir.is_dir() else []
                if cp_during is not None and cp_during >= first_bad:
                    v.append(f"o checkpoint chegou a {cp_during} com a falha do item {first_bad} "
                             "não gravada")
                # the error is logged once per solicitation (then every 5 min, so a disk full
                # for hours does not flood the log); that the monitor keeps trying shows in the
                # failure files appearing within a cycle or two of the fix, checked below
                if lines_after < 1:
                    v.append("o erro de gravação da falha não foi registrado no log")
                if files_during:
                    v.append(f"arquivos na pasta com o disco com defeito: {files_during}")
                if not monitor.alive():
                    v.append("o monitor terminou sozinho com o disco com defeito")
                # phase 2: disk fixed
                fixed_at = time.monotonic()
                how = fix_disk(mode, work, mount)
                drained = wait_drained(api, url, args.timeout, failed_dir, interval=0.2,
                                       stall=args.stall)
                recover_s = time.monotonic() - fixed_at
                if not drained:
                    v.append(f"depois do conserto ({how}) o monitor não gravou as falhas / não "
                             f"levou o checkpoint ao fim em {args.timeout:.0f} s")
                if not monitor.alive():
                    v.append("o monitor terminou sozinho")
            finally:
                code = monitor.stop(60)
                watcher.stop()
            report = verify(api, url, lab_item_ids(url), failed_dir, expect_failures=True)
            files = failure_files(failed_dir) if failed_dir.is_dir() else []
            leftovers = sorted(p.name for p in failed_dir.glob(".tmp-*")) if failed_dir.is_dir() else []
    finally:
        if mount is not None and not umount(mount):
            v.append(f"não foi possível desmontar {mount}")

    if not report["ok"]:
        v.append(f"entrega incorreta: perdidos {report['missing']}, duplicados "
                 f"{report['duplicates']}, guardados e em falha {report['stored_and_failed']}, "
                 f"checkpoint {report['checkpoint']} (último {report['last_id']})")
    in_files = sorted(i for f in files for i in f["item_ids"])
    if in_files != sorted(bad_ids):
        v.append(f"itens nos arquivos de falha {in_files} != itens das solicitações ruins {bad_ids}")
    wrong_mode = [f["path"] for f in files if f["mode"] != 0o600]
    if wrong_mode:
        v.append(f"arquivos de falha sem modo 0600: {wrong_mode}")
    no_reason = [f["path"] for f in files if "sexo" not in f["reason"]]
    if no_reason:
        v.append(f"arquivos de falha sem o motivo (sexo): {no_reason}")
    if leftovers:
        v.append(f"temporários esquecidos na pasta de falhas: {leftovers}")
    if code != 0:
        v.append(f"o monitor saiu com código {code} ao receber SIGTERM")
    unexpected = count_in_log(log_file, "Erro inesperado no ciclo")
    tracebacks = read_text(work / "monitor.out").count("Traceback")
    if unexpected or tracebacks:
        v.append(f"{unexpected} erros inesperados, {tracebacks} tracebacks")
    sample_error = next((line for line in read_text(log_file).splitlines() if UNWRITTEN_LINE in line), "")
    result.figures = {
        "solicitações boas / ruins": f"{args.good} / {args.bad} (cods ruins {bad_cods})",
        "itens": f"{len(good_ids) + len(bad_ids)} ({len(bad_ids)} das ruins; 1º ruim = {first_bad})",
        "disco com defeito por": f"{broken_s:.1f} s",
        "linhas de erro de gravação": f"{lines_after} ({lines_after / max(broken_s, 0.1) * 60:.0f}/min "
                                      f"com POLL_SECONDS=0.2)",
        "checkpoint máximo com defeito": f"{cp_during} (< {first_bad})",
        "boas entregues com defeito": "sim" if delivered_good else "NÃO",
        "conserto": how,
        "recuperação depois do conserto": f"{recover_s:.1f} s",
        "arquivos de falha": f"{len(files)} ({len(in_files)} itens, modos "
                             f"{sorted({oct(f['mode']) for f in files})})",
        "checkpoint final / último": f"{report['checkpoint']} / {report['last_id']}",
        "API": f"{report['stored']} itens guardados, duplicados {len(report['duplicates'])}, "
               f"POSTs {report['posts_by_status']}",
        "vigia (itens abaixo do checkpoint sem resultado)": str(len(watcher.violations(0.0))),
        "exemplo do erro no log": sample_error[24:][:400],
    }
    if watcher.violations(0.0):
        v.append(f"o checkpoint passou de itens sem resultado: {list(watcher.violations(0.0))[:12]}")
    if not v and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        result.figures["pasta de trabalho"] = str(work)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--good", type=int, default=60, help="solicitações boas (padrão 60)")
    parser.add_argument("--bad", type=int, default=3,
                        help="solicitações sem sexo, que vão para FAILED_DIR (padrão 3)")
    parser.add_argument("--items", type=int, default=2, help="itens por solicitação (padrão 2)")
    parser.add_argument("--fault-seconds", type=float, default=5.0,
                        help="segundos com o disco com defeito depois do 1º erro (padrão 5)")
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES,
                        help="quais defeitos (padrão: todos)")
    parser.add_argument("--latency", type=float, default=0.005, help="latência da API falsa (s)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="espera máxima depois do conserto (padrão 60 s)")
    parser.add_argument("--stall", type=float, default=20.0,
                        help="desiste antes se nada progredir por N segundos (padrão 20)")
    parser.add_argument("--keep", action="store_true", help="mantém as pastas de trabalho")
    args = parser.parse_args(argv)
    if args.bad < 1 or args.good < 1 or args.good + args.bad > 100_000:
        parser.error("--good e --bad: pelo menos 1 de cada")
    if pg_unreachable():
        return 2
    can_mount, why = mount_permitted()
    results = []
    for mode in args.modes:
        if mode in NEEDS_MOUNT and not can_mount:
            results.append(Outcome(mode, skipped=f"pulado: {why}"))
            print(f"[{mode}] PULADO: {why}", flush=True)
            continue
        print(f"[{mode}] rodando...", flush=True)
        try:
            results.append(run_mode(mode, args))
        except Exception as err:  # noqa: BLE001 - the harness failed: report, never hide
            traceback.print_exc()
            results.append(Outcome(mode, violations=[f"o cenário falhou: {err!r}"]))

    print()
    print("=== Falhas de disco em FAILED_DIR (monitor em laço, PostgreSQL, API falsa) ===")
    print(f"mount de tmpfs: {why}")
    failed = False
    for outcome in results:
        print()
        print(f"--- {outcome.mode} ---")
        if outcome.skipped:
            print(outcome.skipped)
            continue
        width = max(len(k) for k in outcome.figures)
        for key, value in outcome.figures.items():
            print(f"  {key.ljust(width)}  {value}")
        if outcome.violations:
            failed = True
            print("VIOLAÇÕES:")
            for item in outcome.violations:
                print(f"  - {item}")
        else:
            print("OK")
    print()
    if failed:
        return 1
    print("OK: com o disco com defeito o checkpoint parou antes da falha não gravada, as boas "
          "seguiram, e depois do conserto as falhas foram gravadas; nada perdido.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
