-- 0006: doctors' reports, their versions, templates and rendered PDFs.
--
-- A report belongs to one study. Its text lives in report_versions; a version is a draft until
-- signed. A signed (final) version is never edited in place: amending it creates a new draft
-- version (supersedes = the signed one); when that draft is signed it becomes final and the
-- version it supersedes becomes 'amended'. So, per report, at most one draft and at most one
-- final version exist at a time, and every earlier signed text is kept.
--
-- sections is a JSON object with the keys clinical_information, technique, findings, impression,
-- recommendations (each a string in the small markup subset documented in docs/reports.md).
-- lock_version is the optimistic-concurrency counter of the report: every change to the report
-- or one of its versions increments it; a client sends the value it read and gets 409 on a
-- mismatch.

CREATE TABLE report_templates (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    language    text NOT NULL CHECK (language IN ('en', 'ru', 'es', 'fr', 'de')),
    modality    text NOT NULL DEFAULT '',   -- '' = any
    body_part   text NOT NULL DEFAULT '',   -- '' = any
    sections    jsonb NOT NULL DEFAULT '{}',
    created_by  text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (name, language)
);

CREATE TABLE reports (
    id            bigserial PRIMARY KEY,
    study_uid     text NOT NULL,            -- no foreign key: `pacsctl reindex --wipe` rebuilds
                                            -- studies from the files, and reports must survive it
    language      text NOT NULL CHECK (language IN ('en', 'ru', 'es', 'fr', 'de')),
    template_id   bigint REFERENCES report_templates(id) ON DELETE SET NULL,
    status        text NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'final', 'amended')),
                  -- the status of the newest version ('amended': final, with an earlier signed text)
    lock_version  integer NOT NULL DEFAULT 1,
    created_by    text NOT NULL,            -- users.username
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reports_study ON reports (study_uid);
CREATE INDEX reports_status ON reports (status, updated_at);

CREATE TABLE report_versions (
    id            bigserial PRIMARY KEY,
    report_id     bigint NOT NULL REFERENCES reports(id) ON DELETE CASCADE,
    version       integer NOT NULL,          -- 1, 2, ... per report
    status        text NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'final', 'amended')),
    supersedes    bigint REFERENCES report_versions(id),
    sections      jsonb NOT NULL DEFAULT '{}',
    language      text NOT NULL CHECK (language IN ('en', 'ru', 'es', 'fr', 'de')),
    author        text NOT NULL,             -- users.username of the last editor
    author_name   text NOT NULL DEFAULT '',  -- display name at the time
    signed_by     text,                      -- users.username
    signed_name   text,                      -- display name at signing
    signed_at     timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (report_id, version),
    CHECK ((status = 'draft') = (signed_at IS NULL))
);
-- at most one draft per report
CREATE UNIQUE INDEX report_versions_one_draft ON report_versions (report_id) WHERE status = 'draft';

-- A rendered PDF of one version. The reporter worker (pacs-reporter) fills it from a 'report.pdf'
-- job; state pending -> done | failed. path is relative to storage.root; sop_uid is the
-- Encapsulated PDF instance stored into the study through the ingest path (NULL until stored).
CREATE TABLE report_pdfs (
    id            bigserial PRIMARY KEY,
    version_id    bigint NOT NULL REFERENCES report_versions(id) ON DELETE CASCADE,
    job_id        bigint,                    -- jobs.id of the render job
    state         text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'failed')),
    error         text,
    path          text,
    size          bigint,
    sha256        text,
    sop_uid       text,
    requested_by  text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX report_pdfs_version ON report_pdfs (version_id, created_at DESC);
