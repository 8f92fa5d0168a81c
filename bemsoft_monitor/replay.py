"""Replaying failure files: rebuild the payload from the stored event with the current
settings and catalog, send it, and move the file out of FAILED_DIR once delivered.

A file is claimed (renamed) before it is sent, so two replays never send the same file."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .catalog import CatalogUnavailable
from .client import BemsoftClient, Delivery, Verdict, judge
from .config import Settings
from .failures import FailureFileError, FailureRecord, FailureStore, claim, release, rewrite
from .payload import TransformError, build_payload
from .planner import choose_key
from .redaction import redact

log = logging.getLogger(__name__)


class ReplayStatus:
    """What replaying one failure file came to (not the API's Answer nor an ItemStatus).
    TOKEN_REFUSED: the API refused the token; the file is left as it was and the run stops."""
    OK, WOULD_SEND, FAILED, SKIPPED = "ok", "would-send", "failed", "skipped"
    TOKEN_REFUSED = "token-refused"


HEADER_SAFE = re.compile(r"[\x21-\x7e]{1,200}")   # visible ASCII: fits an HTTP header


@dataclass
class ReplayResult:
    path: Path
    status: str          # a ReplayStatus
    message: str
    key: str = ""
    payload: dict | None = None
    delivery: Delivery | None = None
    record: FailureRecord | None = None   # the file's record, once it was sent (for the history)


def prepare(record: FailureRecord, settings: Settings, catalog) -> tuple[dict, list[int], str]:
    """Rebuild payload and key; raises TransformError when it still cannot be sent."""
    if not HEADER_SAFE.fullmatch(record.cod or "0"):
        raise TransformError(f"o código da solicitação {record.cod!r} tem caractere que não cabe "
                             "no cabeçalho Idempotency-Key (quebra de linha, espaço, acento): "
                             "corrija 'cod_solicitacao' no arquivo")
    built = build_payload(record.event, settings, catalog)
    if built.rejected:
        reasons = "; ".join(f"item {item.get('CodItemSol')}: {why}" for item, why in built.rejected)
        raise TransformError(f"ainda há itens que não podem ser enviados: {reasons}")
    if built.payload is None:
        raise TransformError("o evento não tem itens para enviar")
    try:
        json.dumps(built.payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise TransformError(f"o arquivo tem texto inválido (caractere UTF-16 isolado, "
                             f"{err.object[err.start:err.end]!r}): corrija o evento no arquivo") from None
    key = choose_key(record.cod, built.item_ids, pending=record.key or None,
                     refused=key_was_refused(record))
    if not HEADER_SAFE.fullmatch(key):
        raise TransformError(f"a chave {key!r} não cabe no cabeçalho Idempotency-Key: corrija "
                             "'idempotency_key' no arquivo")
    return built.payload, built.item_ids, key


def key_was_refused(record: FailureRecord) -> bool:
    """Whether the API refused the file's key (a replay then needs a new one). Files written
    before `refused` was recorded are judged by the answer they keep: a portal's 200 page, a
    429 or a 5xx are transient (the first attempt may have been saved), a 2xx with an error
    body or a 400/401/403 are refusals."""
    if record.refused is not None:
        return record.refused
    if record.http_status is None:
        return False
    verdict, _, _ = judge(record.http_status, record.response.encode("utf-8", "replace"))
    return verdict in (Verdict.PERMANENT, Verdict.TOKEN_REFUSED)


def replay_file(path: Path, settings: Settings, client: BemsoftClient | None, catalog, *,
                send: bool, move_ok: Path) -> ReplayResult:
    path = Path(path)
    claimed = claim(path) if send else path
    if claimed is None:
        return ReplayResult(path, ReplayStatus.SKIPPED, "já está sendo reenviado por outro processo")
    try:
        try:
            record = FailureStore.load(claimed)
        except FailureFileError as err:
            return ReplayResult(path, ReplayStatus.FAILED, f"arquivo ilegível, deixado no lugar: {err}")
        try:
            payload, item_ids, key = prepare(record, settings, catalog)
        except CatalogUnavailable as err:
            status = ReplayStatus.TOKEN_REFUSED if err.token_refused else ReplayStatus.FAILED
            return ReplayResult(path, status, str(err), key=record.key)
        except TransformError as err:
            return ReplayResult(path, ReplayStatus.FAILED, str(err), key=record.key)
        except Exception as err:  # an odd stored value must not stop the other files
            log.debug("Erro inesperado ao remontar %s", path.name, exc_info=True)
            return ReplayResult(path, ReplayStatus.FAILED, "erro inesperado ao montar o pedido: "
                                + redact(repr(err), settings), key=record.key)
        if not send:
            return ReplayResult(path, ReplayStatus.WOULD_SEND, f"seria enviado com a chave {key} "
                                                  f"({len(item_ids)} itens)", key, payload)
        if key != record.key:
            # the new key is kept in the file before the POST: if this process dies before the
            # file is moved, the next replay re-sends with the same key and the API dedupes
            record.key, record.http_status, record.refused = key, None, None
            rewrite(claimed, record.to_json())
        try:
            delivery = client.deliver(payload, key)
        except Exception as err:  # one file's odd content must not stop the others
            log.debug("Erro ao enviar %s", path.name, exc_info=True)
            return ReplayResult(path, ReplayStatus.FAILED, "erro ao enviar: " + redact(repr(err), settings),
                                key=key)
        if delivery.outcome == Verdict.TOKEN_REFUSED:  # not this file's problem: left as it is
            return ReplayResult(path, ReplayStatus.TOKEN_REFUSED, delivery.reason, key, payload, delivery)
        record.item_ids = item_ids
        if delivery.ok:
            target = _move_delivered(claimed, move_ok, path.name)
            claimed = None
            return ReplayResult(path, ReplayStatus.OK, f"{delivery.reason} -> {target}", key, payload,
                                delivery, record)
        _update_record(claimed, record, delivery, key)
        return ReplayResult(path, ReplayStatus.FAILED, delivery.reason, key, payload, delivery, record)
    finally:
        if send and claimed is not None and claimed.exists():
            release(claimed)


def _move_delivered(claimed: Path, move_ok: Path, name: str) -> Path:
    """Out of FAILED_DIR once delivered; if --move-ok cannot be written, renamed in place to
    `*.sent` (never picked up again)."""
    try:
        move_ok.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = move_ok / name
        shutil.move(str(claimed), str(target))
        return target
    except OSError as err:
        target = claimed.with_name(name + ".sent")
        os.replace(claimed, target)
        log.warning("Não foi possível mover para %s (%s); renomeado para %s.", move_ok, err, target)
        return target


def _update_record(claimed: Path, record: FailureRecord, delivery: Delivery, key: str) -> None:
    """Keep the latest answer in the file, so the operator sees why it still fails."""
    data = record.to_json()
    data.update(reason=delivery.reason, http_status=delivery.status, idempotency_key=key,
                attempts=record.attempts + delivery.attempts, response=delivery.body,
                refused=delivery.outcome == Verdict.PERMANENT)
    rewrite(claimed, data)


def send_event(event: dict, settings: Settings, client: BemsoftClient, catalog) -> Delivery:
    """Send one stored event (the seed's REPL recipe); raises TransformError if it cannot."""
    # unknown history: the content key lets the server answer 409 if it already has it
    record = FailureRecord(reason="", key="", cod=str(event.get("cod_solicitacao") or ""),
                           item_ids=[], event=event, http_status=None)
    payload, _, key = prepare(record, settings, catalog)
    return client.deliver(payload, key)


