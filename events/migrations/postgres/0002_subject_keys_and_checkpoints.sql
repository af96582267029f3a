-- Per-subject data keys (wrapped by the master key), kept outside the event payloads so that
-- erasing a subject destroys its key and leaves the log whole (crypto-shredding).
CREATE TABLE subject_keys (
    subject_id  uuid        PRIMARY KEY,
    tenant_id   uuid        NOT NULL,
    wrapped_key bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Where each log consumer (notifier, projections, relay) has got to.
CREATE TABLE checkpoints (
    name     text   PRIMARY KEY,
    position bigint NOT NULL
);
