-- 0003: accounts, roles and permissions, sites, sessions (refresh-token families).
-- Passwords are Argon2id PHC strings (lib/kp_password.c); refresh tokens and recovery codes are
-- stored as SHA-256 hex of random tokens, never in clear. docs/security.md describes the model.

-- The permission catalogue: a role may only hold names listed here.
CREATE TABLE permissions (
    name        text PRIMARY KEY,
    description text NOT NULL
);
INSERT INTO permissions (name, description) VALUES
    ('study.read',       'search studies and view images and metadata'),
    ('study.download',   'retrieve whole instances (Part 10), WADO-URI, export'),
    ('study.upload',     'store instances (STOW-RS, web upload)'),
    ('study.delete',     'delete studies, series or instances'),
    ('patient.edit',     'correct patient and study attributes'),
    ('annotation.write', 'save measurements and annotations'),
    ('report.read',      'read reports'),
    ('report.write',     'create and edit draft reports'),
    ('report.sign',      'sign (finalise) and amend reports'),
    ('report.export',    'export reports as PDF'),
    ('report.delete',    'delete draft reports'),
    ('user.manage',      'create, change, disable users; reset passwords and MFA'),
    ('role.manage',      'create and change roles'),
    ('site.manage',      'create and change sites'),
    ('site.all',         'see the studies of every site'),
    ('system.configure', 'modalities, configuration, system status'),
    ('route.manage',     'routing rules and deliveries'),
    ('audit.read',       'read the audit trail');

CREATE TABLE roles (
    name        text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_.-]{0,63}$'),
    description text NOT NULL DEFAULT '',
    builtin     boolean NOT NULL DEFAULT false,
    require_mfa boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE role_permissions (
    role       text NOT NULL REFERENCES roles(name) ON UPDATE CASCADE ON DELETE CASCADE,
    permission text NOT NULL REFERENCES permissions(name),
    PRIMARY KEY (role, permission)
);
INSERT INTO roles (name, description, builtin) VALUES
    ('admin',    'Administrator: everything', true),
    ('doctor',   'Doctor: view, download, write, sign and export reports, annotate', true),
    ('operator', 'Operator: upload, view, correct patient data; no reports', true);
INSERT INTO role_permissions (role, permission) SELECT 'admin', name FROM permissions;
INSERT INTO role_permissions (role, permission) VALUES
    ('doctor', 'study.read'), ('doctor', 'study.download'), ('doctor', 'annotation.write'),
    ('doctor', 'report.read'), ('doctor', 'report.write'), ('doctor', 'report.sign'),
    ('doctor', 'report.export'),
    ('operator', 'study.read'), ('operator', 'study.upload'), ('operator', 'patient.edit');

CREATE TABLE sites (
    id          serial PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    description text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO sites (id, name, description) VALUES (1, 'default', 'Studies not mapped to another site');
SELECT setval('sites_id_seq', 1);

-- A study belongs to one site: the indexer sets it from the sites.map rules (calling AE title,
-- InstitutionName) when the study's first instance arrives; the default site otherwise.
ALTER TABLE studies ADD COLUMN site_id integer NOT NULL DEFAULT 1 REFERENCES sites(id);
CREATE INDEX studies_site ON studies (site_id);

CREATE TABLE users (
    id                   bigserial PRIMARY KEY,
    username             text NOT NULL CHECK (username ~ '^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$'),
    display_name         text NOT NULL DEFAULT '',
    email                text NOT NULL DEFAULT '',
    language             text NOT NULL DEFAULT 'en' CHECK (language IN ('en', 'ru', 'es', 'fr', 'de')),
    password_hash        text NOT NULL,
    must_change_password boolean NOT NULL DEFAULT false,
    disabled             boolean NOT NULL DEFAULT false,
    failed_logins        integer NOT NULL DEFAULT 0,
    locked_until         timestamptz,
    totp_secret          text,              -- base32; NULL: not enrolled
    totp_pending         text,              -- secret offered during enrolment, not yet confirmed
    totp_last_step       bigint NOT NULL DEFAULT 0, -- replay protection
    recovery_codes       text[] NOT NULL DEFAULT '{}', -- SHA-256 hex; '' once used
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    last_login_at        timestamptz
);
CREATE UNIQUE INDEX users_username ON users (lower(username));

CREATE TABLE user_roles (
    user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role    text NOT NULL REFERENCES roles(name) ON UPDATE CASCADE ON DELETE CASCADE,
    PRIMARY KEY (user_id, role)
);
CREATE TABLE user_sites (
    user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    site_id integer NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    PRIMARY KEY (user_id, site_id)
);

-- A session is one login: a family of refresh tokens, each used at most once. Presenting a
-- token that was already used (stolen and replayed) revokes the whole session.
CREATE TABLE sessions (
    id           text PRIMARY KEY,            -- random, carried in the access token (sid)
    user_id      bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    revoked_at   timestamptz,
    revoked_why  text,
    client_addr  text NOT NULL DEFAULT '',
    user_agent   text NOT NULL DEFAULT ''
);
CREATE INDEX sessions_user ON sessions (user_id);
CREATE TABLE refresh_tokens (
    hash       text PRIMARY KEY,              -- SHA-256 hex of the token
    session_id text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    used_at    timestamptz
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);
