"""The SQL Server side: every statement the monitor runs, compiled by the mssql dialect
(T-SQL as production receives it), plus the PostgreSQL plan of the page query."""
from __future__ import annotations

import re

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mssql

from bemsoft_monitor import migrations
from bemsoft_monitor.db import monitor_schema_map
from bemsoft_monitor.schema import monitor_metadata
from bemsoft_monitor.source import LegacySource
from conftest import LAB


def tsql(statement) -> str:
    compiled = statement.compile(dialect=mssql.dialect(),
                                 schema_translate_map=monitor_schema_map("mssql"),
                                 render_schema_translate=True,
                                 compile_kwargs={"render_postcompile": True})
    return re.sub(r"\s+", " ", str(compiled)).strip()


@pytest.fixture
def statements():
    return LegacySource(sa.create_engine("sqlite://"), "bemsoft", [LAB, "OUTRO"]).statements()


def test_page_query_is_one_indexed_range_read_with_top(statements):
    sql = tsql(statements["page"])
    assert sql.startswith("SELECT TOP 500 [ItemSol].[CodItemSol], [ItemSol].[CodSolicitacao]")
    assert "FROM [ItemSol] LEFT OUTER JOIN solicitacao ON solicitacao.codsolicitacao = [ItemSol].[CodSolicitacao]" in sql
    assert "LEFT OUTER JOIN paciente ON paciente.codpaciente = solicitacao.codpaciente" in sql
    assert ("LEFT OUTER JOIN dbo.[_MonitorItems] ON dbo.[_MonitorItems].[Name] = :Name_1 "
            "AND dbo.[_MonitorItems].[CodItemSol] = [ItemSol].[CodItemSol]") in sql
    assert "[ItemSol].[NomeTerceirizado] IN (:NomeTerceirizado_1_1, :NomeTerceirizado_1_2)" in sql
    assert "[ItemSol].[CodItemSol] > :CodItemSol_1" in sql
    assert sql.endswith("ORDER BY [ItemSol].[CodItemSol]")
    assert "LIMIT" not in sql and "OFFSET" not in sql


def test_followup_query_fetches_the_rest_of_cut_solicitations(statements):
    sql = tsql(statements["followup"])
    assert "[ItemSol].[CodSolicitacao] IN (:CodSolicitacao_1_1, :CodSolicitacao_1_2)" in sql
    assert "TOP" not in sql


def test_duplicates_query_is_a_plain_group_by(statements):
    """Runs only when a join returned an item twice, to name the duplicated keys."""
    assert tsql(statements["duplicates"]) == (
        "SELECT paciente.codpaciente, count(*) AS count_1 FROM paciente WHERE paciente.codpaciente "
        "IN (:codpaciente_1_1, :codpaciente_1_2) GROUP BY paciente.codpaciente HAVING count(*) > :count_2")


def test_dry_run_page_does_not_touch_monitor_tables(statements):
    assert "_Monitor" not in tsql(statements["page_dry_run"])


def test_monitor_tables_live_in_dbo(statements):
    assert tsql(statements["mark_sending"]).startswith("INSERT INTO dbo.[_MonitorItems] ([Name], [CodItemSol], "
                                                       "[CodSolicitacao], [Status], [IdemKey], [UpdatedAt]")
    assert tsql(statements["outcome"]) == (
        "UPDATE dbo.[_MonitorItems] SET [Status]=:Status, [UpdatedAt]=:UpdatedAt "
        "WHERE dbo.[_MonitorItems].[Name] = :Name_1 AND dbo.[_MonitorItems].[CodItemSol] "
        "IN (:CodItemSol_1_1, :CodItemSol_1_2)")
    assert tsql(statements["checkpoint_update"]).startswith(
        "UPDATE dbo.[_MonitorState] SET [LastItemId]=:LastItemId, [UpdatedAt]=:UpdatedAt "
        "WHERE dbo.[_MonitorState].[Name] = :Name_1")
    assert tsql(statements["checkpoint_insert"]).startswith("INSERT INTO dbo.[_MonitorState]")
    assert tsql(statements["checkpoint_read"]) == (
        "SELECT dbo.[_MonitorState].[LastItemId] FROM dbo.[_MonitorState] "
        "WHERE dbo.[_MonitorState].[Name] = :Name_1")
    assert tsql(statements["prune"]).startswith("DELETE FROM dbo.[_MonitorItems] WHERE")


def test_backlog_and_max_are_plain_aggregates(statements):
    assert tsql(statements["backlog"]) == (
        "SELECT count(*) AS count_1 FROM [ItemSol] WHERE [ItemSol].[NomeTerceirizado] IN "
        "(:NomeTerceirizado_1_1, :NomeTerceirizado_1_2) AND [ItemSol].[CodItemSol] > :CodItemSol_1")
    assert tsql(statements["max_item"]).startswith("SELECT max([ItemSol].[CodItemSol])")


def test_monitor_table_ddl_for_sql_server():
    from sqlalchemy.schema import CreateTable
    ddl = [re.sub(r"\s+", " ", str(CreateTable(t).compile(
        dialect=mssql.dialect(), schema_translate_map=monitor_schema_map("mssql"),
        render_schema_translate=True))) for t in monitor_metadata.sorted_tables]
    state = next(d for d in ddl if "_MonitorState" in d)
    assert "CREATE TABLE dbo.[_MonitorState]" in state
    assert "[LastItemId] BIGINT NOT NULL" in state and "PRIMARY KEY ([Name])" in state
    items = next(d for d in ddl if "_MonitorItems" in d)
    assert "PRIMARY KEY ([Name], [CodItemSol])" in items


@pytest.mark.postgres
def test_postgres_plan_uses_the_primary_key_index(pg_url):
    """The page query is an index range scan on ItemSol's key, not a full scan."""
    from bemsoft_monitor.testing.sampledata import bulk_orders
    engine = sa.create_engine(pg_url)
    source = LegacySource(engine, "bemsoft", [LAB])
    migrations.upgrade(source.engine)        # the monitor's tables, as a start makes them
    bulk_orders(engine, 3000, 3, terceirizado=LAB)
    with engine.begin() as conn:
        conn.execute(sa.text('ANALYZE "ItemSol"'))
        conn.execute(sa.text("ANALYZE solicitacao"))
        conn.execute(sa.text("ANALYZE paciente"))
        compiled = source.page_statement(8000, 500).compile(
            dialect=engine.dialect, schema_translate_map=monitor_schema_map("postgresql"),
            render_schema_translate=True, compile_kwargs={"literal_binds": True})
        plan = "\n".join(r[0] for r in conn.execute(sa.text(f"EXPLAIN {compiled}")))
    engine.dispose()
    assert re.search(r'Index Scan using "ItemSol_pkey" on "ItemSol"', plan), plan
    assert 'Seq Scan on "ItemSol"' not in plan, plan


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_idle_cycle_costs_one_query(harness):
    """Gentle on the LIS: once caught up, a cycle is the single range query."""
    harness.order(1, ["GLI"])
    monitor = harness.monitor()
    monitor.step()                       # start-up and the first delivery
    statements = []

    def count(conn, cursor, statement, *args):
        statements.append(statement)

    sa.event.listen(harness.engine, "before_cursor_execute", count)
    try:
        monitor.step()
        monitor.step()
    finally:
        sa.event.remove(harness.engine, "before_cursor_execute", count)
    assert len(statements) == 2, statements
    assert all('FROM "ItemSol"' in s and "LIMIT" in s for s in statements)


def test_no_statement_uses_merge(statements):
    """SQL Server 2012+ and no MERGE: update-then-insert, as the checkpoint does."""
    for name, statement in statements.items():
        assert "MERGE" not in tsql(statement).upper(), name


def test_legacy_tables_for_sql_server_use_the_types_of_a_real_lis():
    """The tests create the LIS tables on SQL Server with T-SQL types (create_legacy_schema
    picks them when the dialect is mssql)."""
    from sqlalchemy.schema import CreateTable
    from bemsoft_monitor.testing.sampledata import mssql_legacy_metadata
    ddl = {t.name: re.sub(r"\s+", " ", str(CreateTable(t).compile(dialect=mssql.dialect())))
           for t in mssql_legacy_metadata().sorted_tables}
    item = ddl["ItemSol"]
    assert "[CodItemSol] INTEGER NOT NULL IDENTITY" in item and "PRIMARY KEY ([CodItemSol])" in item
    assert "[DataEntrada] DATETIME NULL" in item and "[DescExames] VARCHAR(255)" in item
    assert "[Valor] MONEY NULL" in item
    assert "nome NVARCHAR(200)" in ddl["paciente"] and "datanasc DATETIME" in ddl["paciente"]
    assert "[Obs_Sol] TEXT NULL" in ddl["solicitacao"] and "[Valortotal] MONEY" in ddl["solicitacao"]
    assert "codsolicitacao INTEGER NOT NULL" in ddl["solicitacao"]
    assert "IDENTITY" not in ddl["solicitacao"] + ddl["paciente"]  # keys the LIS gives itself


def test_applock_batch_as_pyodbc_receives_it():
    """sp_getapplock in one batch: NOCOUNT first (no row-count results before `SELECT @r`),
    one positional parameter, session owner, no wait."""
    from bemsoft_monitor.lock import MSSQL_GETAPPLOCK, MSSQL_RELEASE
    # the dialect of a real mssql+pyodbc engine (pyodbc's paramstyle); nothing is connected
    dialect = sa.create_engine("mssql+pyodbc://u:p@h/lis?driver=ODBC+Driver+18+for+SQL+Server").dialect
    for statement in (MSSQL_GETAPPLOCK, MSSQL_RELEASE):
        compiled = statement.compile(dialect=dialect)
        assert compiled.string.startswith("SET NOCOUNT ON; DECLARE @r int; EXEC @r = sp_")
        assert compiled.string.endswith("; SELECT @r")
        assert "@Resource = ?" in compiled.string and compiled.positiontup == ["resource"]
        assert "@LockOwner = 'Session'" in compiled.string
    assert "@LockTimeout = 0" in str(MSSQL_GETAPPLOCK)
