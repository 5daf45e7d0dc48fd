-- 0004: the tamper-evident audit trail (docs/security.md, "Audit trail").
--
-- Producers (lib/kp_audit.c) write an outbox row (jobs.type 'audit'); pacs-auditor appends each
-- event here, in the transaction that marks the job done, as one link of a hash chain:
--
--   hash = lower-case hex SHA-256 of the UTF-8 bytes of the canonical JSON array
--     [seq, event_id, at, actor, action, outcome, client, patient_id, study_uid, detail, prev_hash]
--   where
--     seq        JSON integer
--     event_id   JSON string (the outbox job id, decimal)
--     at         JSON string, UTC, exactly YYYY-MM-DDTHH:MM:SS.ffffffZ (6 fraction digits),
--                i.e. to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
--     actor .. study_uid  JSON string, or null when the column is NULL
--     detail     the detail object as canonical JSON (null when NULL)
--     prev_hash  JSON string: the previous row's hash; 64 '0' for seq 1
--   Canonical JSON is what jansson's json_dumps(JSON_COMPACT | JSON_SORT_KEYS) writes: no
--   whitespace at all, object keys sorted by their UTF-8 bytes, strings as raw UTF-8 with only
--   '"', '\' and the control characters U+0000..U+001F escaped (\b \f \n \r \t, otherwise
--   \u00XX with UPPER-case hex digits, e.g. \u001F), '/' and U+007F and above not escaped,
--   integers in decimal, reals as %.17g (producers keep to strings, integers, booleans, null,
--   arrays and objects). Python's json.dumps(x, separators=(',', ':'), sort_keys=True,
--   ensure_ascii=False) gives the same bytes except that it writes those \u00XX escapes in
--   lower case.
--
-- seq has no gaps: a missing seq is a deleted row. The chain tail is serialised by
-- pg_advisory_xact_lock(461446935908) (0x6b70617564, KP_AUDIT_CHAIN_LOCK) in every appending
-- transaction.
-- The trigger below refuses UPDATE, DELETE and TRUNCATE from everybody, so no service can alter
-- the trail. A superuser (or the table owner) can still disable triggers; the hash chain is
-- what detects that afterwards: `pacsctl audit verify`.

CREATE TABLE audit_log (
    seq         bigint PRIMARY KEY CHECK (seq > 0),
    event_id    text NOT NULL UNIQUE,
    at          timestamptz NOT NULL,
    actor       text,
    action      text NOT NULL,
    outcome     text NOT NULL CHECK (outcome IN ('success', 'failure')),
    client      text,
    patient_id  text,
    study_uid   text,
    detail      jsonb,
    prev_hash   text NOT NULL CHECK (prev_hash ~ '^[0-9a-f]{64}$'),
    hash        text NOT NULL CHECK (hash ~ '^[0-9a-f]{64}$'),
    recorded_at timestamptz NOT NULL DEFAULT now()  -- not hashed: when the auditor wrote it
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_actor ON audit_log (lower(actor), seq);
CREATE INDEX audit_log_action ON audit_log (action, seq);
CREATE INDEX audit_log_patient ON audit_log (patient_id, seq) WHERE patient_id IS NOT NULL;
CREATE INDEX audit_log_study ON audit_log (study_uid, seq) WHERE study_uid IS NOT NULL;

CREATE FUNCTION kp_audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'the audit trail is never changed; pacsctl audit verify checks it';
END
$$;
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION kp_audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION kp_audit_log_append_only();
