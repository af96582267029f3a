-- The append-only event log, unique claims and aggregate snapshots.
--
-- Ordering: an event's position is (transaction id << 20) + its index in the append, so
-- position order is transaction-id order. A reader only returns events whose transaction id is
-- below the oldest transaction still running (pg_snapshot_xmin), and every transaction below
-- that horizon has finished: a later commit can never land behind a position already read.
-- See README "Ordering on PostgreSQL".
CREATE TABLE events (
    position        bigint      PRIMARY KEY,
    event_id        uuid        NOT NULL,
    tenant_id       uuid        NOT NULL,
    stream_type     text        NOT NULL,
    stream_id       uuid        NOT NULL,
    version         bigint      NOT NULL,
    event_type      text        NOT NULL,
    schema_version  integer     NOT NULL,
    recorded_at     timestamptz NOT NULL,
    correlation_id  uuid        NOT NULL,
    causation_id    uuid,
    actor           text        NOT NULL,
    context         jsonb,
    payload         jsonb       NOT NULL,
    CONSTRAINT events_stream_version UNIQUE (stream_type, stream_id, version)
);

CREATE TABLE unique_claims (
    tenant_id   uuid NOT NULL,
    scope       text NOT NULL,
    value       text NOT NULL,
    stream_type text NOT NULL,
    stream_id   uuid NOT NULL,
    CONSTRAINT unique_claims_key PRIMARY KEY (tenant_id, scope, value)
);

CREATE TABLE snapshots (
    stream_type text   NOT NULL,
    stream_id   uuid   NOT NULL,
    version     bigint NOT NULL,
    state       jsonb  NOT NULL,
    PRIMARY KEY (stream_type, stream_id)
);

-- One append = one call = one transaction. Streams are checked against their expected
-- version (-1 = any), claims released then taken, events inserted with contiguous positions.
-- Errors: SQLSTATE GH001 (version conflict, DETAIL = "<stream index>:<actual version>"),
-- 23505 on events_stream_version (a concurrent append won the race) or unique_claims_key.
CREATE FUNCTION gatehouse_append(
    s_types text[], s_ids uuid[], s_expected bigint[],
    e_stream integer[], e_ids uuid[], e_tenants uuid[], e_types text[], e_schemas integer[], e_payloads text[],
    m_recorded timestamptz, m_correlation uuid, m_causation uuid, m_actor text, m_context jsonb,
    c_tenants uuid[], c_scopes text[], c_values text[], c_streams integer[],
    r_tenants uuid[], r_scopes text[], r_values text[], r_streams integer[]
) RETURNS TABLE (out_position bigint, out_version bigint)
LANGUAGE plpgsql AS $$
DECLARE
    base bigint := (pg_current_xact_id()::text::bigint) << 20;
    current_versions bigint[] := '{}';
    v bigint;
BEGIN
    IF cardinality(e_ids) >= 1048576 THEN
        RAISE EXCEPTION 'an append holds at most 1048575 events';
    END IF;
    FOR i IN 1 .. coalesce(cardinality(s_ids), 0) LOOP
        SELECT max(version) INTO v FROM events WHERE stream_type = s_types[i] AND stream_id = s_ids[i];
        v := coalesce(v, 0);
        IF s_expected[i] >= 0 AND v <> s_expected[i] THEN
            RAISE EXCEPTION USING ERRCODE = 'GH001', MESSAGE = 'stream version conflict', DETAIL = i::text || ':' || v::text;
        END IF;
        current_versions := current_versions || v;
    END LOOP;

    IF cardinality(r_scopes) > 0 THEN
        DELETE FROM unique_claims u
        USING unnest(r_tenants, r_scopes, r_values, r_streams) AS r(tenant_id, scope, value, s)
        WHERE u.tenant_id = r.tenant_id AND u.scope = r.scope AND u.value = r.value
          AND u.stream_type = s_types[r.s] AND u.stream_id = s_ids[r.s];
    END IF;
    IF cardinality(c_scopes) > 0 THEN
        INSERT INTO unique_claims (tenant_id, scope, value, stream_type, stream_id)
        SELECT c.tenant_id, c.scope, c.value, s_types[c.s], s_ids[c.s]
        FROM unnest(c_tenants, c_scopes, c_values, c_streams) AS c(tenant_id, scope, value, s);
    END IF;

    RETURN QUERY
    INSERT INTO events (position, event_id, tenant_id, stream_type, stream_id, version, event_type,
                        schema_version, recorded_at, correlation_id, causation_id, actor, context, payload)
    SELECT base + e.ord - 1, e.id, e.tenant_id, s_types[e.s], s_ids[e.s],
           current_versions[e.s] + row_number() OVER (PARTITION BY e.s ORDER BY e.ord),
           e.event_type, e.schema_version, m_recorded, m_correlation, m_causation, m_actor, m_context,
           e.payload::jsonb
    FROM unnest(e_stream, e_ids, e_tenants, e_types, e_schemas, e_payloads)
         WITH ORDINALITY AS e(s, id, tenant_id, event_type, schema_version, payload, ord)
    RETURNING position, version;
END;
$$;
