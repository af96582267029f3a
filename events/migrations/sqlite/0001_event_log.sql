-- The append-only event log, unique claims and aggregate snapshots. One writer at a time
-- (SQLite's write lock), so positions are dense and in commit order.
CREATE TABLE events (
    position        INTEGER PRIMARY KEY,
    event_id        BLOB    NOT NULL,
    tenant_id       BLOB    NOT NULL,
    stream_type     TEXT    NOT NULL,
    stream_id       BLOB    NOT NULL,
    version         INTEGER NOT NULL,
    event_type      TEXT    NOT NULL,
    schema_version  INTEGER NOT NULL,
    recorded_at     INTEGER NOT NULL, -- microseconds since the Unix epoch, UTC
    correlation_id  BLOB    NOT NULL,
    causation_id    BLOB,
    actor           TEXT    NOT NULL,
    client_ip       TEXT,
    user_agent      TEXT,
    payload         TEXT    NOT NULL,
    UNIQUE (stream_type, stream_id, version)
);

CREATE TABLE unique_claims (
    tenant_id   BLOB NOT NULL,
    scope       TEXT NOT NULL,
    value       TEXT NOT NULL,
    stream_type TEXT NOT NULL,
    stream_id   BLOB NOT NULL,
    PRIMARY KEY (tenant_id, scope, value)
) WITHOUT ROWID;

CREATE TABLE snapshots (
    stream_type TEXT    NOT NULL,
    stream_id   BLOB    NOT NULL,
    version     INTEGER NOT NULL,
    state       TEXT    NOT NULL,
    PRIMARY KEY (stream_type, stream_id)
) WITHOUT ROWID;
