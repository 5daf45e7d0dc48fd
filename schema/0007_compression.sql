-- 0007: lossless compression of stored instances (pacs-compressor, workers/compressor/).
--
-- compression: the decision taken for each instance's file, one row per instance (the latest).
-- 'compressed': the file whose digest is before_sha256 was transcoded losslessly, verified
-- pixel for pixel and replaced by the file after_sha256 (the index row now points to it).
-- 'skipped': the file before_sha256 is left as it is, for `reason` (a stable code, see
-- workers/README) with a human-readable `detail`. A decision applies to one file version: when
-- the instance is stored again with other content, its file_sha256 matches neither digest and
-- the instance is a candidate again.
CREATE TABLE compression (
    sop_uid         text PRIMARY KEY,
    outcome         text NOT NULL CHECK (outcome IN ('compressed', 'skipped')),
    reason          text,                  -- skipped: already-compressed, no-pixel-data, ...
    detail          text,
    before_sha256   text NOT NULL,
    before_size     bigint NOT NULL,
    before_syntax   text,
    before_path     text,
    after_sha256    text,                  -- compressed only
    after_size      bigint,
    after_syntax    text,
    after_path      text,
    job_id          bigint,
    decided_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX compression_outcome ON compression (outcome, reason);

-- Files that may have to be removed from storage: a replaced original (kept `not_before` for
-- readers that looked its path up just before the switch) and every compressed file from the
-- moment before it is written until the index points to it (so a crash in between leaves a
-- row here, never an untracked file). A file is removed only when no index row points to it
-- and, when `inode` is known, the path still holds that very file (a new copy stored under
-- the same name since is kept).
CREATE TABLE storage_orphans (
    path        text PRIMARY KEY,              -- relative to storage.root
    sop_uid     text NOT NULL,
    inode       bigint,
    not_before  timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX storage_orphans_due ON storage_orphans (not_before);

-- The compressor's scan looks for a pending job per instance before queueing one.
CREATE INDEX jobs_compress_sop ON jobs ((payload->>'sop')) WHERE type = 'compress';
