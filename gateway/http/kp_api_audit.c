/* kp_api_audit: GET /api/audit, the audit trail (permission audit.read; database worker).
 *
 * Query parameters, all optional: user (actor, ignoring case), patient (Patient ID), study
 * (Study Instance UID), action (exact, e.g. auth.login_failed), from / to (ISO 8601 times, the
 * range [from, to)), limit (default 100, at most 1000), offset. Answer:
 * {"total": N, "items": [{seq, at, actor, action, outcome, client, patient_id, study_uid,
 * detail, hash}, ...]} newest first; total counts every match, not just this page. */
#include "kp_api.h"

#include "kp_audit.h"
#include "kp_errors.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define S_VALUE_MAX 256

static int s_hex(int c)
{
    return isdigit(c) ? c - '0' : isxdigit(c) ? (tolower(c) - 'a' + 10) : -1;
}

/* The percent-decoded value of parameter name in query into out; 1 found, 0 absent, -1 too
 * long or badly encoded. */
static int s_param(const char *query, const char *name, char *out, size_t len)
{
    size_t nl = strlen(name);
    for (const char *p = query; p && *p;) {
        const char *end = strchr(p, '&');
        if (!end) end = p + strlen(p);
        if ((size_t)(end - p) > nl && !strncmp(p, name, nl) && p[nl] == '=') {
            size_t k = 0;
            for (const char *s = p + nl + 1; s < end; s++) {
                int c = (unsigned char)*s;
                if (c == '+') {
                    c = ' ';
                } else if (c == '%') {
                    if (end - s < 3 || s_hex(s[1]) < 0 || s_hex(s[2]) < 0) return -1;
                    c = s_hex(s[1]) * 16 + s_hex(s[2]);
                    s += 2;
                }
                if (c == 0 || k + 1 >= len) return -1;
                out[k++] = (char)c;
            }
            out[k] = 0;
            return 1;
        }
        p = *end ? end + 1 : end;
    }
    return 0;
}

/* A strict ISO 8601 date or date-time that PostgreSQL will accept as timestamptz:
 * YYYY-MM-DD[THH:MM[:SS[.fraction]]][Z|+HH:MM|-HH:MM] with a real calendar date. */
static bool s_iso_time(const char *s)
{
    int y, mo, d, h = 0, mi = 0, sec = 0, n = 0;
    if (sscanf(s, "%4d-%2d-%2d%n", &y, &mo, &d, &n) != 3 || n != 10) return false;
    const char *p = s + 10;
    if (*p == 'T' || *p == ' ') {
        int m = 0;
        if (sscanf(p + 1, "%2d:%2d%n", &h, &mi, &m) != 2 || m != 5) return false;
        p += 6;
        if (*p == ':') {
            if (!isdigit((unsigned char)p[1]) || !isdigit((unsigned char)p[2])) return false;
            sec = (p[1] - '0') * 10 + (p[2] - '0');
            p += 3;
            if (*p == '.') {
                p++;
                if (!isdigit((unsigned char)*p)) return false;
                while (isdigit((unsigned char)*p)) p++;
            }
        }
        if (*p == 'Z') {
            p++;
        } else if (*p == '+' || *p == '-') {
            if (!isdigit((unsigned char)p[1]) || !isdigit((unsigned char)p[2]) || p[3] != ':' ||
                !isdigit((unsigned char)p[4]) || !isdigit((unsigned char)p[5]))
                return false;
            p += 6;
        }
    }
    if (*p || y < 1900 || mo < 1 || mo > 12 || d < 1 || h > 23 || mi > 59 || sec > 59)
        return false;
    struct tm tm = {.tm_year = y - 1900, .tm_mon = mo - 1, .tm_mday = d, .tm_hour = 12};
    time_t t = timegm(&tm);
    struct tm back;
    gmtime_r(&t, &back);
    return back.tm_mday == d && back.tm_mon == mo - 1; /* 2026-02-31 is refused */
}

int kp_api_audit_list(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    static const char *const names[] = {"user", "patient", "study", "action", "from", "to"};
    char vals[6][S_VALUE_MAX];
    const char *p[8] = {0};
    for (int i = 0; i < 6; i++) {
        int f = s_param(req->query, names[i], vals[i], sizeof vals[i]);
        if (f < 0) {
            kp_http_error(resp, KP_EINVAL, 0, "invalid query parameter", names[i]);
            return 0;
        }
        if (f && vals[i][0]) p[i] = vals[i];
    }
    for (int i = 4; i < 6; i++)
        if (p[i] && !s_iso_time(p[i])) {
            kp_http_error(resp, KP_EINVAL, 0, "from and to are ISO 8601 times",
                          "e.g. 2026-01-31 or 2026-01-31T08:00:00Z");
            return 0;
        }
    char num[2][S_VALUE_MAX], limit[24], offset[24];
    long lim = 100, off = 0;
    for (int i = 0; i < 2; i++) {
        int f = s_param(req->query, i ? "offset" : "limit", num[i], sizeof num[i]);
        if (f == 0) continue;
        char *end = NULL;
        long v = f > 0 ? strtol(num[i], &end, 10) : -1;
        if (f < 0 || !end || *end || end == num[i] || v < (i ? 0 : 1) ||
            (i == 0 && v > 1000) || v > 100000000L) {
            kp_http_error(resp, KP_EINVAL, 0,
                          i ? "offset must be a number >= 0" : "limit must be 1..1000", NULL);
            return 0;
        }
        if (i)
            off = v;
        else
            lim = v;
    }
    snprintf(limit, sizeof limit, "%ld", lim);
    snprintf(offset, sizeof offset, "%ld", off);
    p[6] = limit;
    p[7] = offset;
    PGresult *r = NULL;
    int rc = kp_db_exec(
        env->db, &r,
        "WITH m AS (SELECT * FROM audit_log WHERE ($1::text IS NULL OR lower(actor) = lower($1)) "
        "AND ($2::text IS NULL OR patient_id = $2) AND ($3::text IS NULL OR study_uid = $3) AND "
        "($4::text IS NULL OR action = $4) AND ($5::timestamptz IS NULL OR at >= $5) AND "
        "($6::timestamptz IS NULL OR at < $6)) SELECT json_build_object('total', (SELECT "
        "count(*) FROM m), 'items', coalesce((SELECT json_agg(x ORDER BY x.seq DESC) FROM "
        "(SELECT seq, " KP_AUDIT_AT_SQL("at") " AS at, actor, action, outcome, client, "
        "patient_id, study_uid, detail, hash FROM m ORDER BY seq DESC LIMIT $7::int OFFSET "
        "$8::bigint) x), '[]'::json))::text",
        8, p);
    if (rc) return rc;
    resp->status = 200;
    resp->content_type = "application/json";
    resp->len = (size_t)PQgetlength(r, 0, 0);
    resp->body = strndup(PQgetvalue(r, 0, 0), resp->len);
    if (!resp->body) abort();
    resp->compressible = true;
    PQclear(r);
    return 0;
}
