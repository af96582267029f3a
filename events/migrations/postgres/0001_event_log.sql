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
    stream_type     text        COLLATE "C" NOT NULL,
    stream_id       uuid        NOT NULL,
    version         bigint      NOT NULL,
    event_type      text        COLLATE "C" NOT NULL,
    schema_version  integer     NOT NULL,
    recorded_at     timestamptz NOT NULL,
    correlation_id  uuid        NOT NULL,
    causation_id    uuid,
    actor           text        NOT NULL,
    client_ip       text,
    user_agent      text,
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

-- Appends a group of commands in one transaction (group commit: one WAL flush for many
-- commands) and one INSERT. Each command is all-or-nothing on its own: its streams are checked against their
-- expected versions (-1 = any) and its claims against unique_claims before anything of it is
-- written; a command that fails a check is skipped and reported, the others are appended.
-- Arrays list the commands' streams, events, claims and releases one command after another;
-- cmd_* give each command's counts. Stream indexes (e_stream, c_stream, r_stream) are 1-based
-- positions in s_*; e_offset is an event's 1-based index among its command's events of that
-- stream. Event i (1-based, across the group) lands at position base + i - 1.
-- Returns [base, then per command: status, detail, current version of each of its streams]:
-- status 0 = appended; 1 = version conflict (detail = stream index); 2 = claim taken
-- (detail = claim index). A concurrent transaction winning a race raises 23505 (constraint
-- events_stream_version or unique_claims_key) and rolls back the whole group.
CREATE FUNCTION gatehouse_append(
    cmd_streams integer[], cmd_events integer[], cmd_claims integer[], cmd_releases integer[],
    m_recorded timestamptz[], m_correlation uuid[], m_causation uuid[], m_actor text[], m_ip text[], m_user_agent text[],
    s_types text[], s_ids uuid[], s_expected bigint[],
    e_stream integer[], e_offset integer[], e_ids uuid[], e_tenants uuid[], e_types text[],
    e_schemas integer[], e_payloads text[],
    c_stream integer[], c_tenants uuid[], c_scopes text[], c_values text[],
    r_stream integer[], r_tenants uuid[], r_scopes text[], r_values text[]
) RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    base bigint := (pg_current_xact_id()::text::bigint) << 20;
    result bigint[] := ARRAY[base];
    s0 integer := 0;
    e0 integer := 0;
    c0 integer := 0;
    r0 integer := 0;
    status bigint;
    detail bigint;
    versions bigint[];
    v bigint;
    -- Per event: its command and, when the command is accepted, its version.
    e_cmd integer[] := '{}';
    e_version bigint[] := '{}';
    -- Streams this group already appended to, with their new versions (latest entry wins).
    seen_types text[] := '{}';
    seen_ids uuid[] := '{}';
    seen_versions bigint[] := '{}';
BEGIN
    IF cardinality(e_ids) >= 1048576 THEN
        RAISE EXCEPTION 'a group holds at most 1048575 events';
    END IF;
    -- Full length from the start: assigning into an empty array at index i would make an
    -- array starting at i, and unnest would then pair it with the wrong events.
    e_cmd := array_fill(NULL::integer, ARRAY[cardinality(e_ids)]);
    e_version := array_fill(NULL::bigint, ARRAY[cardinality(e_ids)]);
    FOR k IN 1 .. cardinality(cmd_streams) LOOP
        status := 0;
        detail := 0;
        versions := '{}';
        FOR i IN s0 + 1 .. s0 + cmd_streams[k] LOOP
            v := NULL;
            FOR t IN REVERSE cardinality(seen_ids) .. 1 LOOP
                IF seen_ids[t] = s_ids[i] AND seen_types[t] = s_types[i] THEN
                    v := seen_versions[t];
                    EXIT;
                END IF;
            END LOOP;
            IF v IS NULL THEN
                -- ORDER BY … LIMIT 1 rather than max(): the plan is cached while the table is
                -- still small, and this form keeps it on the index as the table grows.
                v := coalesce((SELECT version FROM events WHERE stream_type = s_types[i] AND stream_id = s_ids[i]
                               ORDER BY version DESC LIMIT 1), 0);
            END IF;
            versions := versions || v;
            IF status = 0 AND s_expected[i] >= 0 AND v <> s_expected[i] THEN
                status := 1;
                detail := i;
            END IF;
        END LOOP;

        IF status = 0 AND cmd_claims[k] > 0 THEN
            SELECT c0 + c.idx INTO detail
            FROM unnest(c_tenants[c0 + 1 : c0 + cmd_claims[k]], c_scopes[c0 + 1 : c0 + cmd_claims[k]],
                        c_values[c0 + 1 : c0 + cmd_claims[k]]) WITH ORDINALITY AS c(tenant_id, scope, value, idx)
            JOIN unique_claims u ON u.tenant_id = c.tenant_id AND u.scope = c.scope AND u.value = c.value
            ORDER BY c.idx LIMIT 1;
            IF FOUND THEN
                status := 2;
            ELSE
                detail := 0;
            END IF;
        END IF;

        IF status = 0 THEN
            IF cmd_releases[k] > 0 THEN
                DELETE FROM unique_claims u
                USING unnest(r_stream[r0 + 1 : r0 + cmd_releases[k]], r_tenants[r0 + 1 : r0 + cmd_releases[k]],
                             r_scopes[r0 + 1 : r0 + cmd_releases[k]], r_values[r0 + 1 : r0 + cmd_releases[k]])
                     AS r(s, tenant_id, scope, value)
                WHERE u.tenant_id = r.tenant_id AND u.scope = r.scope AND u.value = r.value
                  AND u.stream_type = s_types[r.s] AND u.stream_id = s_ids[r.s];
            END IF;
            IF cmd_claims[k] > 0 THEN
                INSERT INTO unique_claims (tenant_id, scope, value, stream_type, stream_id)
                SELECT c.tenant_id, c.scope, c.value, s_types[c.s], s_ids[c.s]
                FROM unnest(c_stream[c0 + 1 : c0 + cmd_claims[k]], c_tenants[c0 + 1 : c0 + cmd_claims[k]],
                            c_scopes[c0 + 1 : c0 + cmd_claims[k]], c_values[c0 + 1 : c0 + cmd_claims[k]])
                     AS c(s, tenant_id, scope, value);
            END IF;
            FOR i IN e0 + 1 .. e0 + cmd_events[k] LOOP
                e_cmd[i] := k;
                e_version[i] := versions[e_stream[i] - s0] + e_offset[i];
            END LOOP;
            FOR j IN s0 + 1 .. s0 + cmd_streams[k] LOOP
                v := versions[j - s0];
                FOR i IN e0 + 1 .. e0 + cmd_events[k] LOOP
                    IF e_stream[i] = j THEN
                        v := greatest(v, e_version[i]);
                    END IF;
                END LOOP;
                seen_types := seen_types || s_types[j];
                seen_ids := seen_ids || s_ids[j];
                seen_versions := seen_versions || v;
            END LOOP;
        END IF;

        result := result || status || detail || versions;
        s0 := s0 + cmd_streams[k];
        e0 := e0 + cmd_events[k];
        c0 := c0 + cmd_claims[k];
        r0 := r0 + cmd_releases[k];
    END LOOP;

    -- One insert for every accepted command of the group.
    INSERT INTO events (position, event_id, tenant_id, stream_type, stream_id, version, event_type,
                        schema_version, recorded_at, correlation_id, causation_id, actor, client_ip, user_agent, payload)
    SELECT base + e.ord - 1, e.id, e.tenant_id, s_types[e.s], s_ids[e.s], e.version, e.event_type,
           e.schema_version, m_recorded[e.cmd], m_correlation[e.cmd], m_causation[e.cmd], m_actor[e.cmd],
           m_ip[e.cmd], m_user_agent[e.cmd], e.payload::jsonb
    FROM unnest(e_stream, e_ids, e_tenants, e_types, e_schemas, e_payloads, e_cmd, e_version)
         WITH ORDINALITY AS e(s, id, tenant_id, event_type, schema_version, payload, cmd, version, ord)
    WHERE e.version IS NOT NULL;
    RETURN result;
END;
$$;
