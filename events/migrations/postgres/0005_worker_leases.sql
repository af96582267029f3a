-- Leases of background workers that run in one replica at a time (the notifier, the JetStream
-- relay, the risk detector): who holds each, and until when (microseconds since the epoch).
CREATE TABLE worker_leases (
    name        TEXT   PRIMARY KEY,
    owner       TEXT   NOT NULL DEFAULT '',
    lease_until BIGINT NOT NULL DEFAULT 0
);
