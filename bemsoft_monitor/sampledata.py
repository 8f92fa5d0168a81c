"""Writing legacy-shaped data: the demo, the tests and the benchmarks create the LIS schema
and orders through these helpers (the monitor itself never writes to LIS tables)."""
from __future__ import annotations

import datetime as dt
from typing import Iterable, Sequence

import sqlalchemy as sa

from .schema import legacy_metadata

ITEM_SOL = legacy_metadata.tables["ItemSol"]
SOLICITACAO = legacy_metadata.tables["solicitacao"]
PACIENTE = legacy_metadata.tables["paciente"]


def create_legacy_schema(engine: sa.Engine, *, drop: bool = False, primary_keys: bool = True,
                         text_codes: bool = False) -> None:
    """The LIS tables. `primary_keys=False` creates `solicitacao` and `paciente` without
    keys, as many real LIS databases have them (duplicated rows are then possible);
    `ItemSol.CodItemSol` stays the identity column the monitor pages on. `text_codes=True`
    keeps codsolicitacao/codpaciente as text (NVARCHAR), as some LIS do."""
    if drop:
        legacy_metadata.drop_all(engine)
    if primary_keys and not text_codes:
        legacy_metadata.create_all(engine)
    else:
        _variant_metadata(primary_keys, text_codes).create_all(engine)


_CODE_COLUMNS = {"CodSolicitacao", "codsolicitacao", "codpaciente"}


def _variant_metadata(primary_keys: bool, text_codes: bool) -> sa.MetaData:
    metadata = sa.MetaData()
    for table in legacy_metadata.sorted_tables:
        keep = primary_keys or table.name == "ItemSol"
        sa.Table(table.name, metadata, *[
            sa.Column(c.name, sa.Unicode(300) if text_codes and c.name in _CODE_COLUMNS else c.type,
                      primary_key=keep and c.primary_key,
                      autoincrement=c.autoincrement if keep else False, index=c.index)
            for c in table.columns])
    return metadata


def _code(value):
    """A text code goes in as text (a LIS may keep its codes in VARCHAR columns)."""
    return sa.bindparam(None, value, type_=sa.String) if isinstance(value, str) else value


def add_patient(conn, codpaciente: int, nome: str | None, *, cpf: str | None = None,
                datanasc=None, sexo: str | None = None, **extra) -> None:
    conn.execute(PACIENTE.insert().values(codpaciente=_code(codpaciente), nome=nome, cpf=cpf,
                                          datanasc=datanasc, sexo=sexo, **extra))


def add_order(conn, cod: int, codpaciente: int | None, *, dtaentrada=None, hora=None,
              **extra) -> None:
    conn.execute(SOLICITACAO.insert().values(codsolicitacao=_code(cod), codpaciente=_code(codpaciente),
                                             dtaentrada=dtaentrada, Hora=hora, **extra))


def add_items(conn, cod: int, items: Iterable[dict], *, terceirizado: str,
              entered_at: dt.datetime | None = None) -> list[int]:
    """Insert ItemSol rows (dicts with CodConvExames, DescExames, Origem, optional
    CodItemSol/DataEntrada); returns the ids the database gave them."""
    ids = []
    for item in items:
        values = {"CodSolicitacao": _code(cod), "NomeTerceirizado": terceirizado,
                  "DataEntrada": entered_at, "SituacaoResultado": "PENDENTE", **item}
        result = conn.execute(ITEM_SOL.insert().values(**values))
        ids.append(int(values.get("CodItemSol") or result.inserted_primary_key[0]))
    return ids


def bulk_orders(engine: sa.Engine, n_orders: int, items_per_order: int, *, terceirizado: str,
                first_cod: int = 1, codes: Sequence[str] = ("GLI", "HEMO", "TSH", "URINA1"),
                chunk: int = 2000) -> int:
    """Fast seeding for benchmarks: n orders x m items, contiguous ids; returns item count."""
    when = dt.datetime(2026, 11, 28, 8, 0, 0)
    patients, orders, items = [], [], []
    item_id = _max_item_id(engine)
    for n in range(n_orders):
        cod = first_cod + n
        patients.append({"codpaciente": cod, "nome": f"Paciente Benchmark {cod}",
                         "cpf": f"{cod:011d}", "datanasc": dt.datetime(1980, 1, 1),
                         "sexo": "F" if n % 2 else "M"})
        orders.append({"codsolicitacao": cod, "codpaciente": cod, "dtaentrada": when,
                       "Hora": "08:00:00"})
        for m in range(items_per_order):
            item_id += 1
            items.append({"CodItemSol": item_id, "CodSolicitacao": cod, "DataEntrada": when,
                          "DescExames": f"EXAME {codes[m % len(codes)]}",
                          "CodConvExames": codes[m % len(codes)], "NomeTerceirizado": terceirizado,
                          "Origem": "BENCH", "SituacaoResultado": "PENDENTE"})
    with engine.begin() as conn:
        for table, rows in ((PACIENTE, patients), (SOLICITACAO, orders), (ITEM_SOL, items)):
            for start in range(0, len(rows), chunk):
                conn.execute(table.insert(), rows[start:start + chunk])
    return len(items)


def _max_item_id(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.max(ITEM_SOL.c.CodItemSol))).scalar() or 0)
