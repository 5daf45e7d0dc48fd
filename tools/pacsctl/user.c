/* pacsctl user: accounts from the command line (schema/0003_auth.sql), for the first admin and
 * for administrators who prefer a terminal. The same rules as the API apply: the password policy,
 * Argon2id hashes, roles and sites that must exist.
 *
 *   pacsctl user list
 *   pacsctl user add NAME --role R [--role R2] [--site S]... [--display-name D] [--email E]
 *                   [--language en|ru|es|fr|de] [--password-file F | --password-env VAR]
 *                   [--temporary] [--if-missing]
 *       Without a password option a random one is generated, printed once, and the account
 *       must change it at first login (as with --temporary). --if-missing: succeed without
 *       change when the user exists (for make run).
 *   pacsctl user passwd NAME [--password-file F | --password-env VAR] [--temporary]
 *   pacsctl user disable NAME | enable NAME | unlock NAME | reset-mfa NAME
 *   pacsctl user sessions-revoke NAME     log the user out everywhere */
#include "kp_audit.h"
#include "kp_errors.h"
#include "kp_password.h"
#include "pacsctl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define S_MAX_LIST 16

static char *s_read_password(const char *file, const char *env)
{
    if (env) {
        const char *v = getenv(env);
        if (!v) {
            fprintf(stderr, "pacsctl: environment variable %s is not set\n", env);
            return NULL;
        }
        return strdup(v);
    }
    FILE *f = fopen(file, "r");
    if (!f) {
        fprintf(stderr, "pacsctl: cannot read %s\n", file);
        return NULL;
    }
    char buf[1100];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    buf[strcspn(buf, "\r\n")] = 0;
    return strdup(buf);
}

/* A generated password: 18 random bytes as base64url (24 characters), which passes the policy. */
static char *s_generate(void)
{
    return kp_random_token(18);
}

static int s_check_policy(const kp_config_t *cfg, const char *user, const char *pw)
{
    kp_password_policy_t *pol = kp_password_policy_new(cfg);
    const char *why = NULL;
    int rc = kp_password_policy_check(pol, user, pw, &why);
    kp_password_policy_destroy(&pol);
    if (rc) fprintf(stderr, "pacsctl: password refused: %s\n", why ? why : "policy");
    return rc;
}

/* The new password of user name: read (file/env) or generated, checked against the policy, and
 * hashed. 0 with *pw and *hash malloc'd, or 1 (reported). */
static int s_new_password(const kp_config_t *cfg, const char *name, const char *pwfile,
                          const char *pwenv, char **pw, char **hash)
{
    *hash = NULL;
    *pw = (!pwfile && !pwenv) ? s_generate() : s_read_password(pwfile, pwenv);
    if (!*pw) return 1;
    int rc = s_check_policy(cfg, name, *pw) ? KP_EINVAL : kp_password_hash(cfg, *pw, hash);
    if (rc) {
        if (rc != KP_EINVAL) fprintf(stderr, "pacsctl: cannot hash the password: %s\n", kp_strerror(rc));
        free(*pw);
        *pw = NULL;
        return 1;
    }
    return 0;
}

/* A change made at the terminal is in the audit trail like one made through the admin API:
 * action admin.user, actor "pacsctl:<login name>", client "local". */
static void s_audit(kp_db_t *db, const char *command, const char *target)
{
    const char *who = getenv("SUDO_USER") ? getenv("SUDO_USER") : getenv("USER");
    char actor[96];
    snprintf(actor, sizeof actor, "pacsctl:%s", who && *who ? who : "?");
    json_t *d = json_pack("{s:s, s:s, s:s}", "command", command, "target", target, "via",
                          "pacsctl");
    kp_audit_event_t ev = {.action = "admin.user",
                           .outcome = "success",
                           .actor = actor,
                           .client = "local",
                           .detail = d};
    if (kp_audit_emit(db, NULL, &ev))
        fprintf(stderr, "pacsctl: warning: the change is not in the audit trail\n");
    json_decref(d);
}

static int s_list(kp_db_t *db)
{
    PGresult *r = NULL;
    if (kp_db_exec(db, &r,
                   "SELECT u.username, u.display_name, coalesce((SELECT string_agg(role, ',' "
                   "ORDER BY role) FROM user_roles WHERE user_id = u.id), ''), coalesce((SELECT "
                   "string_agg(s.name, ',' ORDER BY s.name) FROM user_sites us JOIN sites s ON "
                   "s.id = us.site_id WHERE us.user_id = u.id), ''), CASE WHEN u.disabled THEN "
                   "'disabled' WHEN u.locked_until > now() THEN 'locked' WHEN "
                   "u.must_change_password THEN 'must change password' ELSE 'active' END, CASE "
                   "WHEN u.totp_secret IS NOT NULL THEN 'yes' ELSE 'no' END, "
                   "coalesce(to_char(u.last_login_at, 'YYYY-MM-DD HH24:MI'), '-') FROM users u "
                   "ORDER BY lower(u.username)",
                   0, NULL))
        return 1;
    printf("%-20s %-22s %-18s %-14s %-21s %-4s %s\n", "user", "name", "roles", "sites", "state",
           "mfa", "last login");
    for (int i = 0; i < PQntuples(r); i++)
        printf("%-20s %-22s %-18s %-14s %-21s %-4s %s\n", PQgetvalue(r, i, 0), PQgetvalue(r, i, 1),
               PQgetvalue(r, i, 2), PQgetvalue(r, i, 3), PQgetvalue(r, i, 4), PQgetvalue(r, i, 5),
               PQgetvalue(r, i, 6));
    if (!PQntuples(r)) printf("(no user: pacsctl user add NAME --role admin)\n");
    PQclear(r);
    return 0;
}

static int s_add(const kp_config_t *cfg, kp_db_t *db, int argc, char **argv)
{
    const char *name = argv[0], *display = "", *email = "", *lang = "en";
    const char *pwfile = NULL, *pwenv = NULL;
    const char *roles[S_MAX_LIST], *sites[S_MAX_LIST];
    int nroles = 0, nsites = 0;
    bool temporary = false, if_missing = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--role") && i + 1 < argc && nroles < S_MAX_LIST)
            roles[nroles++] = argv[++i];
        else if (!strcmp(argv[i], "--site") && i + 1 < argc && nsites < S_MAX_LIST)
            sites[nsites++] = argv[++i];
        else if (!strcmp(argv[i], "--display-name") && i + 1 < argc)
            display = argv[++i];
        else if (!strcmp(argv[i], "--email") && i + 1 < argc)
            email = argv[++i];
        else if (!strcmp(argv[i], "--language") && i + 1 < argc)
            lang = argv[++i];
        else if (!strcmp(argv[i], "--password-file") && i + 1 < argc)
            pwfile = argv[++i];
        else if (!strcmp(argv[i], "--password-env") && i + 1 < argc)
            pwenv = argv[++i];
        else if (!strcmp(argv[i], "--temporary"))
            temporary = true;
        else if (!strcmp(argv[i], "--if-missing"))
            if_missing = true;
        else {
            fprintf(stderr, "pacsctl: user add: unknown or incomplete option '%s'\n", argv[i]);
            return 2;
        }
    }
    if (!nroles) {
        fprintf(stderr, "pacsctl: user add: give at least one --role (admin, doctor, operator, "
                        "or a custom role)\n");
        return 2;
    }
    if (if_missing) {
        PGresult *r = NULL;
        const char *p[] = {name};
        if (kp_db_exec(db, &r, "SELECT 1 FROM users WHERE lower(username) = lower($1)", 1, p))
            return 1;
        int exists = PQntuples(r);
        PQclear(r);
        if (exists) {
            printf("user %s exists; nothing changed\n", name);
            return 0;
        }
    }
    bool generated = !pwfile && !pwenv;
    char *pw = NULL, *hash = NULL;
    if (s_new_password(cfg, name, pwfile, pwenv, &pw, &hash)) return 1;
    int rc;
    /* roles and sites as PostgreSQL arrays of text */
    char rl[1024] = "{", sl[1024] = "{";
    for (int i = 0; i < nroles; i++)
        snprintf(rl + strlen(rl), sizeof rl - strlen(rl), "%s\"%s\"", i ? "," : "", roles[i]);
    for (int i = 0; i < nsites; i++)
        snprintf(sl + strlen(sl), sizeof sl - strlen(sl), "%s\"%s\"", i ? "," : "", sites[i]);
    strcat(rl, "}");
    strcat(sl, "}");
    const char *must = (temporary || generated) ? "true" : "false";
    const char *p[] = {name, display, email, lang, hash, must, rl, sl};
    PGresult *r = NULL;
    rc = kp_db_exec(
        db, &r,
        "WITH u AS (INSERT INTO users (username, display_name, email, language, password_hash, "
        "must_change_password) VALUES ($1, $2, $3, $4, $5, $6::boolean) RETURNING id), "
        "r AS (INSERT INTO user_roles (user_id, role) SELECT u.id, x FROM u, "
        "unnest($7::text[]) x RETURNING 1), "
        "s AS (INSERT INTO user_sites (user_id, site_id) SELECT u.id, st.id FROM u, "
        "unnest($8::text[]) x JOIN sites st ON st.name = x RETURNING 1) "
        "SELECT (SELECT count(*) FROM r), (SELECT count(*) FROM s), "
        "(SELECT count(*) FROM roles WHERE name = ANY($7::text[])), "
        "(SELECT count(*) FROM sites WHERE name = ANY($8::text[]))",
        8, p);
    free(hash);
    if (rc) {
        fprintf(stderr, "pacsctl: user %s not added (see the database error above: does it "
                        "exist already? are the name, language and roles valid?)\n",
                name);
        free(pw);
        return 1;
    }
    long nr = atol(PQgetvalue(r, 0, 2)), ns = atol(PQgetvalue(r, 0, 3));
    PQclear(r);
    if (nr != nroles || ns != nsites) {
        /* an unknown role fails the insert (foreign key); an unknown site is only skipped */
        fprintf(stderr, "pacsctl: warning: some sites do not exist (pacsctl site list)\n");
    }
    printf("user %s added (roles %s, sites %s)\n", name, rl, nsites ? sl : "none");
    s_audit(db, "add", name);
    if (generated)
        printf("initial password (shown once, to be changed at first login): %s\n", pw);
    free(pw);
    return 0;
}

static int s_passwd(const kp_config_t *cfg, kp_db_t *db, int argc, char **argv)
{
    const char *name = argv[0], *pwfile = NULL, *pwenv = NULL;
    bool temporary = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--password-file") && i + 1 < argc)
            pwfile = argv[++i];
        else if (!strcmp(argv[i], "--password-env") && i + 1 < argc)
            pwenv = argv[++i];
        else if (!strcmp(argv[i], "--temporary"))
            temporary = true;
        else {
            fprintf(stderr, "pacsctl: user passwd: unknown option '%s'\n", argv[i]);
            return 2;
        }
    }
    bool generated = !pwfile && !pwenv;
    char *pw = NULL, *hash = NULL;
    if (s_new_password(cfg, name, pwfile, pwenv, &pw, &hash)) return 1;
    const char *p[] = {name, hash, (temporary || generated) ? "true" : "false"};
    PGresult *r = NULL;
    int rc = kp_db_exec(db, &r,
                        "UPDATE users SET password_hash = $2, must_change_password = $3::boolean, "
                        "failed_logins = 0, locked_until = NULL, updated_at = now() WHERE "
                        "lower(username) = lower($1) RETURNING id",
                        3, p);
    free(hash);
    if (rc || PQntuples(r) != 1) {
        fprintf(stderr, "pacsctl: no user %s\n", name);
        if (r) PQclear(r);
        free(pw);
        return 1;
    }
    PQclear(r);
    printf("password of %s set%s\n", name, (temporary || generated) ? " (must be changed at next login)" : "");
    s_audit(db, "passwd", name);
    if (generated) printf("new password (shown once): %s\n", pw);
    free(pw);
    return 0;
}

static int s_simple(kp_db_t *db, const char *what, const char *name)
{
    static const struct {
        const char *cmd, *sql, *done;
    } ops[] = {
        {"disable", "UPDATE users SET disabled = true, updated_at = now() WHERE lower(username) = "
                    "lower($1) RETURNING id",
         "disabled"},
        {"enable", "UPDATE users SET disabled = false, updated_at = now() WHERE lower(username) = "
                   "lower($1) RETURNING id",
         "enabled"},
        {"unlock", "UPDATE users SET failed_logins = 0, locked_until = NULL, updated_at = now() "
                   "WHERE lower(username) = lower($1) RETURNING id",
         "unlocked"},
        {"reset-mfa", "UPDATE users SET totp_secret = NULL, totp_pending = NULL, "
                      "totp_last_step = 0, recovery_codes = '{}', updated_at = now() WHERE "
                      "lower(username) = lower($1) RETURNING id",
         "has no second factor any more (enrol again at next login)"},
        {"sessions-revoke", "UPDATE sessions SET revoked_at = now(), revoked_why = 'revoked by "
                            "an administrator' WHERE revoked_at IS NULL AND user_id = (SELECT id "
                            "FROM users WHERE lower(username) = lower($1)) RETURNING id",
         "logged out everywhere"},
    };
    for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++) {
        if (strcmp(ops[i].cmd, what)) continue;
        const char *p[] = {name};
        PGresult *r = NULL;
        if (kp_db_exec(db, &r, ops[i].sql, 1, p)) return 1;
        int n = PQntuples(r);
        PQclear(r);
        if (!n && strcmp(what, "sessions-revoke")) {
            fprintf(stderr, "pacsctl: no user %s\n", name);
            return 1;
        }
        printf("user %s %s\n", name, ops[i].done);
        s_audit(db, what, name);
        return 0;
    }
    fprintf(stderr, "pacsctl: user: unknown command '%s'\n", what);
    return 2;
}

int pacsctl_user(const kp_config_t *cfg, int argc, char **argv)
{
    if (argc < 1) {
        fprintf(stderr, "usage: pacsctl user list | add NAME --role R ... | passwd NAME | "
                        "disable|enable|unlock|reset-mfa|sessions-revoke NAME\n");
        return 2;
    }
    kp_db_t *db = pacsctl_db(cfg, true);
    if (!db) return 1;
    int rc;
    if (!strcmp(argv[0], "list"))
        rc = s_list(db);
    else if (argc < 2) {
        fprintf(stderr, "pacsctl: user %s: which user?\n", argv[0]);
        rc = 2;
    } else if (!strcmp(argv[0], "add"))
        rc = s_add(cfg, db, argc - 1, argv + 1);
    else if (!strcmp(argv[0], "passwd"))
        rc = s_passwd(cfg, db, argc - 1, argv + 1);
    else
        rc = s_simple(db, argv[0], argv[1]);
    kp_db_destroy(&db);
    return rc;
}
