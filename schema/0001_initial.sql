-- 0001: the index (patients / studies / series / instances), the jobs outbox.
-- Every QIDO-RS matching attribute of PS3.18 section 8.3.4 (studies, series, instances) is a
-- column; study and series aggregates are kept current by the indexer in the same transaction
-- as the instance row. Text columns hold UTF-8. Person names are stored as the DICOM value
-- (components separated by ^, groups by =) plus a folded form for case/accent-insensitive
-- (fuzzy) matching.

CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE EXTENSION IF NOT EXISTS unaccent;

-- unaccent() is STABLE; an IMMUTABLE wrapper lets it appear in index expressions.
CREATE OR REPLACE FUNCTION kp_fold(t text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
    AS $$ SELECT lower(public.unaccent('public.unaccent'::regdictionary, t)) $$;

CREATE TABLE patients (
    pk              bigserial PRIMARY KEY,
    patient_id      text NOT NULL,
    issuer          text NOT NULL DEFAULT '',
    patient_name    text,
    birth_date      text,
    sex             text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    num_studies     integer NOT NULL DEFAULT 0,
    attrs_from      text NOT NULL DEFAULT '',  -- see the note at the top
    UNIQUE (patient_id, issuer)
);

CREATE TABLE studies (
    pk                    bigserial PRIMARY KEY,
    patient_pk            bigint NOT NULL REFERENCES patients(pk),
    study_uid             text NOT NULL UNIQUE,
    study_date            text,
    study_time            text,
    accession_number      text,
    study_id              text,
    study_description     text,
    referring_physician   text,
    -- copies of the patient attributes as sent with this study (QIDO study level returns them)
    patient_name          text,
    patient_name_fold     text,
    patient_id            text,
    issuer_of_patient_id  text,
    patient_birth_date    text,
    patient_sex           text,
    timezone_offset       text,
    specific_charset      text,
    modalities            text[] NOT NULL DEFAULT '{}',
    sop_classes           text[] NOT NULL DEFAULT '{}',
    num_series            integer NOT NULL DEFAULT 0,
    num_instances         integer NOT NULL DEFAULT 0,
    attrs_from            text NOT NULL DEFAULT '',
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX studies_patient ON studies (patient_pk);
CREATE INDEX studies_date ON studies (study_date);
CREATE INDEX studies_accession ON studies (accession_number);
CREATE INDEX studies_pid ON studies (patient_id);
CREATE INDEX studies_modalities ON studies USING gin (modalities);
CREATE INDEX studies_name_trgm ON studies USING gin (patient_name_fold gin_trgm_ops);
CREATE INDEX studies_updated ON studies (updated_at);

CREATE TABLE series (
    pk                    bigserial PRIMARY KEY,
    study_pk              bigint NOT NULL REFERENCES studies(pk),
    series_uid            text NOT NULL UNIQUE,
    modality              text,
    series_number         integer,
    series_description    text,
    series_date           text,
    series_time           text,
    body_part             text,
    station_name          text,
    pps_start_date        text,
    pps_start_time        text,
    request_spsid         text,   -- RequestAttributeSequence > ScheduledProcedureStepID
    request_rpid          text,   -- RequestAttributeSequence > RequestedProcedureID
    institution_name      text,
    num_instances         integer NOT NULL DEFAULT 0,
    attrs_from            text NOT NULL DEFAULT '',
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX series_study ON series (study_pk);
CREATE INDEX series_modality ON series (modality);

CREATE TABLE instances (
    pk                    bigserial PRIMARY KEY,
    series_pk             bigint NOT NULL REFERENCES series(pk),
    sop_uid               text NOT NULL UNIQUE,
    sop_class_uid         text,
    instance_number       integer,
    transfer_syntax_uid   text,
    rows                  integer,
    columns               integer,
    bits_allocated        integer,
    number_of_frames      integer,
    content_date          text,
    content_time          text,
    path                  text NOT NULL,      -- relative to storage.root
    file_size             bigint NOT NULL,
    file_sha256           text NOT NULL,
    pixel_offset          bigint,             -- byte offset of the PixelData value, if any
    pixel_length          bigint,             -- its length (-1: undefined / encapsulated)
    charset_fallback      boolean NOT NULL DEFAULT false,  -- kept raw: charset not convertible
    calling_ae            text,
    received_at           timestamptz,        -- the file's modification time
    metadata              jsonb NOT NULL,     -- DICOM JSON (PS3.18 Annex F), bulk data by URI
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX instances_series ON instances (series_pk);

-- Transactional outbox: a row is committed before the sender is acknowledged; the bus carries
-- a notification; the consumer marks it done in the same transaction as its effect.
CREATE TABLE jobs (
    id            bigserial PRIMARY KEY,
    type          text NOT NULL,
    payload       jsonb NOT NULL,
    state         text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'failed')),
    attempts      integer NOT NULL DEFAULT 0,
    lease_until   timestamptz NOT NULL DEFAULT now() + interval '30 seconds',
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX jobs_pending ON jobs (lease_until) WHERE state = 'pending';
CREATE INDEX jobs_done ON jobs (updated_at) WHERE state <> 'pending';
