-- Per-subject data keys (wrapped by the master key), kept outside the event payloads so that
-- erasing a subject destroys its key and leaves the log whole (crypto-shredding).
CREATE TABLE subject_keys (
    subject_id  BLOB    PRIMARY KEY,
    tenant_id   BLOB    NOT NULL,
    wrapped_key BLOB    NOT NULL,
    created_at  INTEGER NOT NULL
) WITHOUT ROWID;

-- Where each log consumer (notifier, projections, relay) has got to.
CREATE TABLE checkpoints (
    name     TEXT    PRIMARY KEY,
    position INTEGER NOT NULL
) WITHOUT ROWID;
