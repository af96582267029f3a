-- The hash chain over each tenant's events (SPEC §8, integrity). The sealer follows the log
-- and writes one seal per event: hash = SHA-256(previous hash of the tenant ‖ canonical bytes
-- of the event). Seals are deterministic, so two sealers write identical rows.
CREATE TABLE event_seals (
    position  INTEGER PRIMARY KEY,
    tenant_id BLOB    NOT NULL,
    hash      BLOB    NOT NULL
);
CREATE INDEX event_seals_tenant ON event_seals (tenant_id, position);

-- Signed statements that a tenant's chain had head `head` at `position` at `signed_at`.
CREATE TABLE integrity_checkpoints (
    tenant_id BLOB    NOT NULL,
    position  INTEGER NOT NULL,
    head      BLOB    NOT NULL,
    signed_at INTEGER NOT NULL, -- microseconds since the Unix epoch, UTC
    key_id    TEXT    NOT NULL,
    signature BLOB    NOT NULL,
    PRIMARY KEY (tenant_id, position)
) WITHOUT ROWID;
