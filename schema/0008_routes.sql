-- 0008: auto-routing (pacs-router, workers/router/; docs/routing.md).
--
-- route_rules: what to send where. conditions, time_window and destinations are validated by
-- lib/kp_route.c (the gateway refuses anything it cannot parse; the router skips such a rule
-- with a log line). Destinations may hold secrets (STOW-RS bearer token, basic password): the
-- API never returns them.
-- route_deliveries: one durable job per (rule, destination, instance) - or per (rule,
-- destination, study) for the stable-study trigger. The unique indexes make creating the same
-- delivery twice impossible, so the scan may look at an instance any number of times.
-- route_study_watch: studies an enabled study-trigger rule matched, waiting to be stable (no new
-- instance for stable_seconds); turned into deliveries once, then removed.
-- route_scan: the watermark of the scan (instances.pk evaluated so far; one row).

ALTER TABLE instances ADD COLUMN called_ae text;  -- the AE title the sender called (C-STORE)

CREATE TABLE route_rules (
    id              bigserial PRIMARY KEY,
    name            text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 128),
    enabled         boolean NOT NULL DEFAULT true,
    description     text NOT NULL DEFAULT '',
    trigger         text NOT NULL DEFAULT 'instance' CHECK (trigger IN ('instance', 'study')),
    stable_seconds  integer NOT NULL DEFAULT 30 CHECK (stable_seconds BETWEEN 0 AND 604800),
    conditions      jsonb NOT NULL DEFAULT '[]',
    time_window     jsonb,
    destinations    jsonb NOT NULL,
    max_attempts    integer NOT NULL DEFAULT 5 CHECK (max_attempts BETWEEN 1 AND 1000),
    created_by      text NOT NULL DEFAULT '',
    updated_by      text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE route_deliveries (
    id              bigserial PRIMARY KEY,
    rule_id         bigint NOT NULL REFERENCES route_rules(id) ON DELETE CASCADE,
    destination     text NOT NULL,        -- 'dicom:AE' or 'stow:URL' (the rule's destination)
    study_uid       text NOT NULL,
    sop_uid         text,                 -- NULL: the whole study (trigger 'study')
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'sending', 'delivered', 'dead')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_until     timestamptz,          -- state 'sending': another router may take it after
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz
);
CREATE UNIQUE INDEX route_deliveries_instance ON route_deliveries (rule_id, destination, sop_uid)
    WHERE sop_uid IS NOT NULL;
CREATE UNIQUE INDEX route_deliveries_study ON route_deliveries (rule_id, destination, study_uid)
    WHERE sop_uid IS NULL;
CREATE INDEX route_deliveries_due ON route_deliveries (next_attempt_at)
    WHERE state IN ('pending', 'sending');
CREATE INDEX route_deliveries_state ON route_deliveries (state, id);
CREATE INDEX route_deliveries_study_uid ON route_deliveries (study_uid);

CREATE TABLE route_study_watch (
    rule_id         bigint NOT NULL REFERENCES route_rules(id) ON DELETE CASCADE,
    study_uid       text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rule_id, study_uid)
);

CREATE TABLE route_scan (
    id              integer PRIMARY KEY CHECK (id = 1),
    watermark       bigint NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
-- Instances indexed before this migration are not routed: rules apply from now on.
INSERT INTO route_scan (id, watermark) SELECT 1, coalesce(max(pk), 0) FROM instances;
