"""Writing legacy-shaped data: the demo, the tests and the benchmarks create the LIS schema
and orders through these helpers (the monitor itself never writes to LIS tables)."""
from __future__ import annotations

import datetime as dt
from typing import Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import mssql

from ..schema import legacy_metadata

ITEM_SOL = legacy_metadata.tables["ItemSol"]
SOLICITACAO = legacy_metadata.tables["solicitacao"]
PACIENTE = legacy_metadata.tables["paciente"]


# T-SQL types of a real LIS where SQLAlchemy's generic ones render differently on SQL Server
# (an Integer primary key already becomes INT IDENTITY, DateTime DATETIME, String VARCHAR).
TSQL_TYPES = {
    "Valor": mssql.MONEY(), "VlTerceirizado": mssql.MONEY(), "Valortotal": mssql.MONEY(),
    "Obs_Sol": mssql.TEXT(), "nome": mssql.NVARCHAR(200), "cidade": mssql.NVARCHAR(80),
    "uf": mssql.CHAR(2),
}
_CODE_COLUMNS = {"CodSolicitacao", "codsolicitacao", "codpaciente"}


def legacy_variant(*, primary_keys: bool = True, text_codes: bool = False,
                   tsql_types: bool = False) -> sa.MetaData:
    """The legacy tables as some real LIS has them. `primary_keys=False`: `solicitacao` and
    `paciente` without keys (duplicated rows are then possible; `ItemSol.CodItemSol` stays
    the identity column the monitor pages on). `text_codes=True`: codsolicitacao/codpaciente
    as text (NVARCHAR). `tsql_types=True`: INT IDENTITY, DATETIME, VARCHAR (code-page text,
    accents included) and NVARCHAR, MONEY and TEXT, as on SQL Server."""
    metadata = sa.MetaData()
    for table in legacy_metadata.sorted_tables:
        keep = primary_keys or table.name == "ItemSol"
        columns = []
        for c in table.columns:
            kind = TSQL_TYPES.get(c.name, c.type) if tsql_types else c.type
            if text_codes and c.name in _CODE_COLUMNS:
                kind = sa.Unicode(300)
            columns.append(sa.Column(c.name, kind, primary_key=keep and c.primary_key,
                                     autoincrement=c.autoincrement if keep else False,
                                     index=c.index))
        sa.Table(table.name, metadata, *columns)
    return metadata


def mssql_legacy_metadata() -> sa.MetaData:
    """The legacy tables with the T-SQL types a real LIS uses on SQL Server."""
    return legacy_variant(tsql_types=True)


def create_legacy_schema(engine: sa.Engine, *, drop: bool = False, primary_keys: bool = True,
                         text_codes: bool = False) -> None:
    """The LIS tables (see legacy_variant); on SQL Server with the T-SQL types a real LIS
    uses. Inserts go through ITEM_SOL & co. either way (SQLAlchemy wraps an explicit
    CodItemSol in SET IDENTITY_INSERT on SQL Server)."""
    tsql = engine.dialect.name == "mssql"
    metadata = (legacy_metadata if primary_keys and not text_codes and not tsql
                else legacy_variant(primary_keys=primary_keys, text_codes=text_codes,
                                    tsql_types=tsql))
    if drop:
        metadata.drop_all(engine)
    metadata.create_all(engine)


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
