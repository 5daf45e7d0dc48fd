-- 0002: the modality registry (AE titles we talk DICOM with).
-- Managed with `pacsctl ae add|list|remove|echo` (and later /api/modalities). An AE title is
-- 1 to 16 characters of the DICOM default repertoire without backslash or control characters,
-- and not all spaces (PS3.5 6.2, VR AE). allow_* say what the peer may do with us: send
-- (C-STORE), query (C-FIND), retrieve (C-MOVE/C-GET, and be a C-MOVE destination).

CREATE TABLE modalities (
    pk              bigserial PRIMARY KEY,
    ae_title        text NOT NULL UNIQUE
                    CHECK (ae_title ~ '^[ -\[\]-~]{1,16}$' AND btrim(ae_title) <> ''
                           AND ae_title = btrim(ae_title)),
    host            text NOT NULL CHECK (length(host) BETWEEN 1 AND 253),
    port            integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    description     text NOT NULL DEFAULT '',
    site            text NOT NULL DEFAULT '',
    allow_store     boolean NOT NULL DEFAULT true,
    allow_find      boolean NOT NULL DEFAULT true,
    allow_retrieve  boolean NOT NULL DEFAULT true,
    tls             boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
