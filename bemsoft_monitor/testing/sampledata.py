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


def mssql_legacy_metadata() -> sa.MetaData:
    """The legacy tables as a real LIS has them on SQL Server: INT IDENTITY, DATETIME,
    VARCHAR (code-page text, accents included) and NVARCHAR, MONEY and TEXT."""
    metadata = sa.MetaData()
    for table in legacy_metadata.sorted_tables:
        for column in table.to_metadata(metadata).columns:
            column.type = TSQL_TYPES.get(column.name, column.type)
    return metadata


def create_legacy_schema(engine: sa.Engine, *, drop: bool = False) -> None:
    """The LIS tables; on SQL Server with the T-SQL types a real LIS uses. Inserts go
    through ITEM_SOL & co. either way (SQLAlchemy wraps an explicit CodItemSol in
    SET IDENTITY_INSERT on SQL Server)."""
    metadata = mssql_legacy_metadata() if engine.dialect.name == "mssql" else legacy_metadata
    if drop:
        metadata.drop_all(engine)
    metadata.create_all(engine)


def add_patient(conn, codpaciente: int, nome: str | None, *, cpf: str | None = None,
                datanasc=None, sexo: str | None = None, **extra) -> None:
    conn.execute(PACIENTE.insert().values(codpaciente=codpaciente, nome=nome, cpf=cpf,
                                          datanasc=datanasc, sexo=sexo, **extra))


def add_order(conn, cod: int, codpaciente: int | None, *, dtaentrada=None, hora=None,
              **extra) -> None:
    conn.execute(SOLICITACAO.insert().values(codsolicitacao=cod, codpaciente=codpaciente,
                                             dtaentrada=dtaentrada, Hora=hora, **extra))


def add_items(conn, cod: int, items: Iterable[dict], *, terceirizado: str,
              entered_at: dt.datetime | None = None) -> list[int]:
    """Insert ItemSol rows (dicts with CodConvExames, DescExames, Origem, optional
    CodItemSol/DataEntrada); returns the ids the database gave them."""
    ids = []
    for item in items:
        values = {"CodSolicitacao": cod, "NomeTerceirizado": terceirizado,
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
