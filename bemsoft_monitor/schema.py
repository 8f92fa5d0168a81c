"""Table definitions: the legacy LIS tables (read-only, spelled as the LIS has them) and the
monitor's own `_Monitor*` tables.

The reader uses `legacy_*` TableClauses without types so that odd values in legacy columns
reach the payload stage as they are (no driver-side conversion can raise mid-page);
`legacy_metadata` carries typed definitions used only to create the schema in the demo,
the tests and the benchmarks.
"""
from __future__ import annotations

import sqlalchemy as sa

# Placeholder schema for the monitor's own tables; the engine maps it to `dbo` on SQL Server
# and to the default schema elsewhere (schema_translate_map).
MONITOR_SCHEMA = "monitor_schema"

# --- legacy tables as the reader sees them (no types: values come back as the driver gives them)
item_sol = sa.table(
    "ItemSol",
    sa.column("CodItemSol"), sa.column("CodSolicitacao"), sa.column("DataEntrada"),
    sa.column("DescExames"), sa.column("CodConvExames"), sa.column("NomeTerceirizado"),
    sa.column("Origem"), sa.column("SituacaoResultado"),
)
solicitacao = sa.table(
    "solicitacao",
    sa.column("codsolicitacao"), sa.column("codpaciente"), sa.column("dtaentrada"),
    sa.column("Hora"),
)
paciente = sa.table(
    "paciente",
    sa.column("codpaciente"), sa.column("nome"), sa.column("cpf"), sa.column("datanasc"),
    sa.column("sexo"),
)

# --- typed legacy schema, for creating test/demo/bench databases only
legacy_metadata = sa.MetaData()

sa.Table(
    "ItemSol", legacy_metadata,
    sa.Column("CodItemSol", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("CodSolicitacao", sa.Integer, index=True),
    sa.Column("DataEntrada", sa.DateTime),
    sa.Column("DescExames", sa.String(255)),
    sa.Column("CodConvExames", sa.String(50)),
    sa.Column("NomeTerceirizado", sa.String(100)),
    sa.Column("Origem", sa.String(50)),
    sa.Column("Valor", sa.Numeric(12, 2)),
    sa.Column("VlTerceirizado", sa.Numeric(12, 2)),
    sa.Column("SituacaoResultado", sa.String(30)),
)
sa.Table(
    "solicitacao", legacy_metadata,
    sa.Column("codsolicitacao", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("codpaciente", sa.Integer),
    sa.Column("CodConvenio", sa.Integer),
    sa.Column("dtaentrada", sa.DateTime),
    sa.Column("Hora", sa.String(8)),
    sa.Column("Valortotal", sa.Numeric(12, 2)),
    sa.Column("TipoPgto", sa.String(30)),
    sa.Column("Obs_Sol", sa.Text),
)
sa.Table(
    "paciente", legacy_metadata,
    sa.Column("codpaciente", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("nome", sa.String(200)),
    sa.Column("cpf", sa.String(20)),
    sa.Column("datanasc", sa.DateTime),
    sa.Column("sexo", sa.String(20)),
    sa.Column("fone", sa.String(30)),
    sa.Column("EmailPac", sa.String(120)),
    sa.Column("cidade", sa.String(80)),
    sa.Column("uf", sa.String(2)),
)

# --- the monitor's own tables
monitor_metadata = sa.MetaData(schema=MONITOR_SCHEMA)

monitor_state = sa.Table(
    "_MonitorState", monitor_metadata,
    sa.Column("Name", sa.String(100), primary_key=True),
    sa.Column("LastItemId", sa.BigInteger, nullable=False),
    sa.Column("UpdatedAt", sa.DateTime, nullable=False),
)

# One row per ItemSol the monitor has taken up, kept for the look-back window: "sending"
# is written before the POST (with the Idempotency-Key, so a crash re-sends the same key),
# then "delivered" or "failed" once the outcome is recorded ("nofile" in between when the
# failure file could not be written).
monitor_items = sa.Table(
    "_MonitorItems", monitor_metadata,
    sa.Column("Name", sa.String(100), primary_key=True),
    sa.Column("CodItemSol", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("CodSolicitacao", sa.String(64), nullable=False),
    sa.Column("Status", sa.String(16), nullable=False),
    sa.Column("IdemKey", sa.String(100), nullable=False),
    sa.Column("UpdatedAt", sa.DateTime, nullable=False),
    # "nofile": the API refused it for good but the failure file could not be written yet;
    # kept here so that a restart writes the file instead of POSTing the key again
    sa.Column("Reason", sa.Unicode(1000), nullable=True),
    sa.Column("HttpStatus", sa.Integer, nullable=True),
)

# One row per item per event: what happened to an ItemSol, when, under which key and with
# which answer. Kept by age (HISTORY_DAYS), not by the look-back window. No patient data.
monitor_history = sa.Table(
    "_MonitorHistory", monitor_metadata,
    sa.Column("Id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=True),
    sa.Column("Name", sa.String(100), nullable=False),        # MONITOR_NAME
    sa.Column("At", sa.DateTime, nullable=False),             # UTC, naive
    sa.Column("CodSolicitacao", sa.String(64), nullable=False),
    sa.Column("CodItemSol", sa.BigInteger, nullable=False),
    sa.Column("ExamCode", sa.Unicode(100), nullable=True),    # CodConvExames as sent (redacted, control chars escaped)
    sa.Column("Event", sa.String(16), nullable=False),        # HistoryEvent below
    sa.Column("IdemKey", sa.String(100), nullable=True),
    sa.Column("HttpStatus", sa.Integer, nullable=True),
    sa.Column("LatencyMs", sa.Integer, nullable=True),
    sa.Column("Reason", sa.Unicode(1000), nullable=True),     # reasons.reason_group(redacted): no patient data
    sa.Column("FileName", sa.Unicode(255), nullable=True),    # failure file name (no folder)
    sa.Index("IX_MonitorHistory_Sol", "Name", "CodSolicitacao"),
    sa.Index("IX_MonitorHistory_Item", "Name", "CodItemSol"),
    sa.Index("IX_MonitorHistory_At", "Name", "At"),
)


class ItemStatus:
    """The Status of an item in _MonitorItems (stored strings: never change them)."""
    SENDING, DELIVERED, FAILED, NOFILE = "sending", "delivered", "failed", "nofile"


class HistoryEvent:
    """The Event of a row in _MonitorHistory (stored strings: never change them)."""
    SENDING = "sending"          # read and taken up under IdemKey (written with "sending" in _MonitorItems)
    ATTEMPT = "attempt"          # an answer that did not settle it (transient, token refused, no answer): sent again later under the same key
    DELIVERED = "delivered"      # 2xx
    DUPLICATE = "duplicate"      # 409: the API had it already; counted delivered
    FAILED = "failed"            # refused for good; FileName = the failure file
    GAVE_UP = "gaveup"           # kept failing while others went through; FileName = the failure file
    NOFILE = "nofile"            # refused for good, the failure file could not be written yet
    DB_REFUSED = "dbrefused"     # the database refused the monitor's own record; to FAILED_DIR
    REPLAYED = "replayed"        # delivered by retry_failed.py (IdemKey = key used)
    REPLAY_FAILED = "replayfail" # retry_failed.py sent it and the API refused again
