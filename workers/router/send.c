/* pacs-router: sending deliveries (see workers/README, "pacs-router").
 *
 *   1. claim: ONE statement moves up to router.batch due deliveries (pending and due, or
 *      sending with an expired lease: a router that died mid-send) to 'sending', counts the
 *      attempt and sets a lease; FOR UPDATE SKIP LOCKED, so routers never claim the same row;
 *   2. send, grouped by destination: a DICOM AE (registered in the modality registry) gets all
 *      its instances over one association (kp_dicom_store_scu: the C-MOVE negotiation and
 *      transcoding, TLS when the AE is flagged so); a STOW-RS URL one request per delivery
 *      (libcurl, the files streamed as multipart/related, bearer or basic auth);
 *   3. record each outcome: delivered (acknowledged: C-STORE success or warning, STOW-RS 200
 *      without failures), pending again after an exponential backoff (connection failures,
 *      out of resources, HTTP 5xx / 408 / 429), or dead (a refusal - a 4xx, a 409, a STOW-RS
 *      answer with a FailedSOPSequence, a DIMSE refusal - or max_attempts reached). The update
 *      only applies while the row is still ours (state sending, same attempt).
 * A crash between the peer's acknowledgement and step 3 leaves the row 'sending': after the
 * lease it is sent again (at-least-once; docs/routing.md). */
#include "router.h"

#include "kp_dicom.h"
#include "kp_errors.h"
#include "kp_log.h"

#include <curl/curl.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

typedef struct {
    char sop_class[72], sop[72], ts[72];
    char *path; /* absolute */
    int64_t size;
} s_file_t;

enum { S_DELIVERED = 0, S_RETRY, S_DEAD };

typedef struct {
    int64_t id;
    int attempts, max_attempts;
    char rule[136], study[72], sop[72];
    char *dest;   /* "dicom:AE" / "stow:URL" */
    json_t *spec; /* the rule's destination object (secrets included), or NULL when gone */
    s_file_t *files;
    size_t nfiles;
    int outcome;
    char error[512];
} s_delivery_t;

long router_backoff(const kp_config_t *cfg, int attempts)
{
    long d = cfg->router_backoff_base;
    for (int i = 1; i < attempts && d < cfg->router_backoff_max; i++)
        d *= 2;
    return d < cfg->router_backoff_max ? d : cfg->router_backoff_max;
}

static void s_fail(s_delivery_t *d, int outcome, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void s_fail(s_delivery_t *d, int outcome, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(d->error, sizeof d->error, fmt, ap);
    va_end(ap);
    d->outcome = outcome;
}

/* The instances of d (one, or the whole study in series / instance order). 0, or a negative
 * code (database); d is marked dead when there is nothing to send. */
static int s_files(router_t *r, s_delivery_t *d)
{
    PGresult *res = NULL;
    const char *p[] = {d->sop[0] ? d->sop : d->study};
    int rc = kp_db_exec(
        r->db, &res,
        d->sop[0] ? "SELECT coalesce(i.sop_class_uid, ''), i.sop_uid, "
                    "coalesce(i.transfer_syntax_uid, ''), i.path, i.file_size FROM instances i "
                    "WHERE i.sop_uid = $1"
                  : "SELECT coalesce(i.sop_class_uid, ''), i.sop_uid, "
                    "coalesce(i.transfer_syntax_uid, ''), i.path, i.file_size FROM instances i "
                    "JOIN series se ON se.pk = i.series_pk JOIN studies st ON st.pk = "
                    "se.study_pk WHERE st.study_uid = $1 ORDER BY se.series_number NULLS LAST, "
                    "se.series_uid, i.instance_number NULLS LAST, i.sop_uid",
        1, p);
    if (rc) return rc;
    int n = PQntuples(res);
    d->files = calloc((size_t)n + 1, sizeof *d->files);
    if (!d->files) abort();
    for (int i = 0; i < n; i++) {
        const char *rel = PQgetvalue(res, i, 3);
        if (!kp_storage_relpath_valid(rel)) continue;
        s_file_t *f = &d->files[d->nfiles++];
        snprintf(f->sop_class, sizeof f->sop_class, "%s", PQgetvalue(res, i, 0));
        snprintf(f->sop, sizeof f->sop, "%s", PQgetvalue(res, i, 1));
        snprintf(f->ts, sizeof f->ts, "%s", PQgetvalue(res, i, 2));
        f->path = kp_storage_abspath(r->st, rel);
        f->size = atoll(PQgetvalue(res, i, 4));
    }
    PQclear(res);
    if (!d->nfiles) s_fail(d, S_DEAD, "%s is no longer stored", d->sop[0] ? d->sop : d->study);
    return 0;
}

/* ---- DICOM: C-STORE over one association per destination ---------------------------------- */

static void s_send_dicom(router_t *r, const char *ae, s_delivery_t **ds, size_t n)
{
    const kp_config_t *cfg = r->cfg;
    PGresult *res = NULL;
    const char *p[] = {ae};
    char host[256] = "";
    int port = 0;
    bool tls = false;
    if (kp_db_exec(r->db, &res, "SELECT host, port, tls FROM modalities WHERE ae_title = $1", 1,
                   p)) {
        for (size_t i = 0; i < n; i++)
            s_fail(ds[i], S_RETRY, "database error looking up %s", ae);
        return;
    }
    if (PQntuples(res) == 1) {
        snprintf(host, sizeof host, "%s", PQgetvalue(res, 0, 0));
        port = atoi(PQgetvalue(res, 0, 1));
        tls = PQgetvalue(res, 0, 2)[0] == 't';
    }
    PQclear(res);
    if (!port) {
        for (size_t i = 0; i < n; i++)
            s_fail(ds[i], S_RETRY, "%s is not in the modality registry", ae);
        return;
    }
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += ds[i]->nfiles;
    kp_dicom_store_item_t *items = calloc(total + 1, sizeof *items);
    if (!items) abort();
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < ds[i]->nfiles; j++) {
            s_file_t *f = &ds[i]->files[j];
            items[k++] = (kp_dicom_store_item_t){.sop_class_uid = f->sop_class,
                                                 .sop_instance_uid = f->sop,
                                                 .transfer_syntax_uid = f->ts,
                                                 .path = f->path};
        }
    kp_dicom_tls_t t = {.cert_file = cfg->dicom_tls_cert,
                        .key_file = cfg->dicom_tls_key,
                        .ca_file = cfg->dicom_tls_ca};
    char err[512] = "";
    int rc = kp_dicom_store_scu(host, port, cfg->dicom_ae_title, ae, (int)cfg->router_timeout,
                                tls ? &t : NULL, items, total, err, sizeof err);
    k = 0;
    for (size_t i = 0; i < n; i++) {
        s_delivery_t *d = ds[i];
        if (rc) {
            s_fail(d, rc == KP_EINVAL ? S_DEAD : S_RETRY, "%s", err);
            continue;
        }
        d->outcome = S_DELIVERED;
        for (size_t j = 0; j < d->nfiles; j++, k++) {
            unsigned st = items[k].status;
            if (st == 0 || (st & 0xF000) == 0xB000) continue;
            int o = (st == 0xFFFF || (st & 0xFF00) == 0xA700) ? S_RETRY : S_DEAD;
            if (d->outcome == S_DELIVERED || (o == S_DEAD && d->outcome == S_RETRY))
                s_fail(d, o, "C-STORE of %s to %s: status %04X%s%s", items[k].sop_instance_uid, ae,
                       st, items[k].error[0] ? ": " : "", items[k].error);
        }
    }
    free(items);
}

/* ---- STOW-RS ------------------------------------------------------------------------------- */

#define S_BOUNDARY "KlinikaRouterBoundary7f3a9c"

/* The multipart body, streamed from the files. */
typedef struct {
    const s_delivery_t *d;
    size_t file; /* current file */
    int phase;   /* 0 part header, 1 file bytes, 2 part trailer, 3 closing boundary, 4 done */
    size_t off;  /* offset in the current header / trailer text */
    FILE *fp;
    bool failed;
    char why[200];
} s_body_t;

static const char s_part_head[] = "--" S_BOUNDARY "\r\nContent-Type: application/dicom\r\n\r\n";
static const char s_part_tail[] = "\r\n";
static const char s_close[] = "--" S_BOUNDARY "--\r\n";

static size_t s_copy_text(const char *text, size_t len, s_body_t *b, char *out, size_t room,
                          int next)
{
    size_t n = len - b->off < room ? len - b->off : room;
    memcpy(out, text + b->off, n);
    b->off += n;
    if (b->off == len) {
        b->off = 0;
        b->phase = next;
    }
    return n;
}

static size_t s_read_body(char *out, size_t size, size_t nitems, void *user)
{
    s_body_t *b = user;
    size_t room = size * nitems;
    for (;;) {
        switch (b->phase) {
        case 0:
            if (b->file == b->d->nfiles) {
                b->phase = 3;
                continue;
            }
            return s_copy_text(s_part_head, sizeof s_part_head - 1, b, out, room, 1);
        case 1: {
            if (!b->fp) {
                b->fp = fopen(b->d->files[b->file].path, "rb");
                if (!b->fp) {
                    snprintf(b->why, sizeof b->why, "cannot open %s: %s", b->d->files[b->file].path,
                             strerror(errno));
                    b->failed = true;
                    return CURL_READFUNC_ABORT;
                }
            }
            size_t got = fread(out, 1, room, b->fp);
            if (got) return got;
            if (ferror(b->fp)) {
                snprintf(b->why, sizeof b->why, "cannot read %s", b->d->files[b->file].path);
                b->failed = true;
                return CURL_READFUNC_ABORT;
            }
            fclose(b->fp);
            b->fp = NULL;
            b->phase = 2;
            continue;
        }
        case 2: {
            size_t n = s_copy_text(s_part_tail, sizeof s_part_tail - 1, b, out, room, 0);
            if (b->phase == 0) b->file++;
            return n;
        }
        case 3:
            return s_copy_text(s_close, sizeof s_close - 1, b, out, room, 4);
        default:
            return 0;
        }
    }
}

typedef struct {
    char *data;
    size_t len;
} s_buf_t;

static size_t s_write_resp(char *ptr, size_t size, size_t nmemb, void *user)
{
    s_buf_t *b = user;
    size_t n = size * nmemb;
    if (b->len + n > (1u << 20)) return n; /* keep the first MiB: enough for the failures */
    char *p = realloc(b->data, b->len + n + 1);
    if (!p) abort();
    memcpy(p + b->len, ptr, n);
    b->data = p;
    b->len += n;
    b->data[b->len] = 0;
    return n;
}

/* The failures a STOW-RS response lists (FailedSOPSequence), as text into why; 0 when none. */
static size_t s_stow_failures(const char *body, char *why, size_t whylen)
{
    json_t *j = body ? json_loads(body, 0, NULL) : NULL;
    json_t *items = json_object_get(json_object_get(j, "00081198"), "Value");
    size_t n = json_array_size(items);
    if (n) {
        json_t *first = json_array_get(items, 0);
        const char *uid = json_string_value(
            json_array_get(json_object_get(json_object_get(first, "00081155"), "Value"), 0));
        json_t *reason =
            json_array_get(json_object_get(json_object_get(first, "00081197"), "Value"), 0);
        snprintf(why, whylen, "%zu instance(s) refused, e.g. %s (FailureReason %lld)", n,
                 uid ? uid : "?", (long long)json_integer_value(reason));
    }
    json_decref(j);
    return n;
}

static void s_send_stow(router_t *r, s_delivery_t *d)
{
    const kp_config_t *cfg = r->cfg;
    const char *url = json_string_value(json_object_get(d->spec, "url"));
    json_t *auth = json_object_get(d->spec, "auth");
    const char *at = json_string_value(json_object_get(auth, "type"));
    CURL *c = curl_easy_init();
    if (!c) {
        s_fail(d, S_RETRY, "cannot initialise libcurl");
        return;
    }
    curl_off_t len = (curl_off_t)(sizeof s_close - 1);
    for (size_t i = 0; i < d->nfiles; i++) {
        struct stat sb;
        if (stat(d->files[i].path, &sb)) {
            s_fail(d, S_RETRY, "cannot read %s: %s", d->files[i].path, strerror(errno));
            curl_easy_cleanup(c);
            return;
        }
        len += (curl_off_t)(sizeof s_part_head - 1 + sizeof s_part_tail - 1) + sb.st_size;
    }
    s_body_t body = {.d = d};
    s_buf_t resp = {0};
    struct curl_slist *h = NULL;
    h = curl_slist_append(h, "Content-Type: multipart/related; type=\"application/dicom\"; "
                             "boundary=" S_BOUNDARY);
    h = curl_slist_append(h, "Accept: application/dicom+json");
    h = curl_slist_append(h, "Expect:");
    char *bearer = NULL;
    if (at && !strcmp(at, "bearer")) {
        const char *tok = json_string_value(json_object_get(auth, "token"));
        if (asprintf(&bearer, "Authorization: Bearer %s", tok ? tok : "") < 0) abort();
        h = curl_slist_append(h, bearer);
    } else if (at && !strcmp(at, "basic")) {
        curl_easy_setopt(c, CURLOPT_HTTPAUTH, (long)CURLAUTH_BASIC);
        curl_easy_setopt(c, CURLOPT_USERNAME, json_string_value(json_object_get(auth, "username")));
        curl_easy_setopt(c, CURLOPT_PASSWORD, json_string_value(json_object_get(auth, "password")));
    }
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_POST, 1L);
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, len);
    curl_easy_setopt(c, CURLOPT_READFUNCTION, s_read_body);
    curl_easy_setopt(c, CURLOPT_READDATA, &body);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, s_write_resp);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &resp);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, cfg->router_timeout);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, cfg->router_timeout * 10);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(c, CURLOPT_USERAGENT, "pacs-router (Klinika PACS)");
    if (*cfg->router_ca_file) curl_easy_setopt(c, CURLOPT_CAINFO, cfg->router_ca_file);
    char cerr[CURL_ERROR_SIZE] = "";
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, cerr);
    CURLcode cc = curl_easy_perform(c);
    long status = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    if (body.fp) fclose(body.fp);
    char why[300] = "";
    if (body.failed) {
        s_fail(d, S_RETRY, "%s", body.why);
    } else if (cc != CURLE_OK) {
        s_fail(d, S_RETRY, "STOW-RS to %s: %s", url, cerr[0] ? cerr : curl_easy_strerror(cc));
    } else if (status == 200 || status == 202) {
        if (s_stow_failures(resp.data, why, sizeof why))
            s_fail(d, S_DEAD, "STOW-RS to %s: HTTP %ld: %s", url, status, why);
        else
            d->outcome = S_DELIVERED;
    } else {
        /* the reason: the JSON error's message, or the start of the body */
        json_t *j = resp.data ? json_loads(resp.data, 0, NULL) : NULL;
        const char *msg = json_string_value(json_object_get(j, "error"));
        if (!msg) msg = json_string_value(json_object_get(j, "message"));
        snprintf(why, sizeof why, "%.200s", msg ? msg : resp.data ? resp.data : "");
        json_decref(j);
        if (!msg && s_stow_failures(resp.data, why, sizeof why) == 0 && resp.data)
            snprintf(why, sizeof why, "%.200s", resp.data);
        bool retry = status >= 500 || status == 408 || status == 429;
        s_fail(d, retry ? S_RETRY : S_DEAD, "STOW-RS to %s: HTTP %ld%s%s", url, status,
               why[0] ? ": " : "", why);
    }
    curl_slist_free_all(h);
    free(bearer);
    free(resp.data);
    curl_easy_cleanup(c);
}

/* ---- claiming and recording ---------------------------------------------------------------- */

static int s_cmp(const void *a, const void *b)
{
    const s_delivery_t *x = a, *y = b;
    int c = strcmp(x->dest, y->dest);
    return c ? c : (x->id < y->id ? -1 : x->id > y->id);
}

static int s_record(router_t *r, s_delivery_t *d)
{
    char id[24], att[24], wait[24];
    snprintf(id, sizeof id, "%lld", (long long)d->id);
    snprintf(att, sizeof att, "%d", d->attempts);
    int o = d->outcome;
    if (o == S_RETRY && d->attempts >= d->max_attempts) o = S_DEAD;
    snprintf(wait, sizeof wait, "%ld", router_backoff(r->cfg, d->attempts));
    const char *state = o == S_DELIVERED ? "delivered" : o == S_RETRY ? "pending" : "dead";
    const char *p[] = {id, att, state, o == S_DELIVERED ? NULL : d->error, wait};
    PGresult *res = NULL;
    int rc = kp_db_exec(r->db, &res,
                        "UPDATE route_deliveries SET state = $3, last_error = $4, lease_until = "
                        "NULL, updated_at = now(), delivered_at = CASE WHEN $3 = 'delivered' THEN "
                        "now() END, next_attempt_at = CASE WHEN $3 = 'pending' THEN now() + "
                        "$5::int * interval '1 second' ELSE next_attempt_at END WHERE id = "
                        "$1::bigint AND state = 'sending' AND attempts = $2::int RETURNING id",
                        5, p);
    if (rc) return rc;
    bool ours = PQntuples(res) == 1;
    PQclear(res);
    const char *what = d->sop[0] ? d->sop : d->study;
    if (!ours)
        kp_warn("deliver",
                "delivery %s (%s -> %s) changed while being sent; outcome %s not "
                "recorded",
                id, what, d->dest, state);
    else if (o == S_DELIVERED)
        kp_info("deliver",
                "delivery %s: rule %s: %s -> %s delivered (%zu instance(s), attempt "
                "%d)",
                id, d->rule, what, d->dest, d->nfiles, d->attempts);
    else if (o == S_RETRY)
        kp_warn("deliver",
                "delivery %s: rule %s: %s -> %s failed (attempt %d of %d), retry in "
                "%ss: %s",
                id, d->rule, what, d->dest, d->attempts, d->max_attempts, wait, d->error);
    else
        kp_error("deliver", "delivery %s: rule %s: %s -> %s dead after %d attempt(s): %s", id,
                 d->rule, what, d->dest, d->attempts, d->error);
    if (ours) {
        if (o == S_DELIVERED)
            r->delivered++;
        else if (o == S_RETRY)
            r->retried++;
        else
            r->dead++;
    }
    return 0;
}

int router_send(router_t *r)
{
    char batch[24], lease[24];
    snprintf(batch, sizeof batch, "%ld", r->cfg->router_batch);
    snprintf(lease, sizeof lease, "%ld", r->cfg->router_lease);
    const char *p[] = {batch, lease};
    PGresult *res = NULL;
    int rc = kp_db_exec(
        r->db, &res,
        "UPDATE route_deliveries d SET state = 'sending', attempts = d.attempts + 1, lease_until "
        "= now() + $2::int * interval '1 second', updated_at = now() FROM route_rules ru WHERE "
        "ru.id = d.rule_id AND d.id IN (SELECT id FROM route_deliveries WHERE (state = 'pending' "
        "AND next_attempt_at <= now()) OR (state = 'sending' AND lease_until < now()) ORDER BY "
        "next_attempt_at, id LIMIT $1::int FOR UPDATE SKIP LOCKED) RETURNING d.id, d.attempts, "
        "ru.max_attempts, ru.name, d.destination, d.study_uid, coalesce(d.sop_uid, ''), "
        "ru.destinations::text",
        2, p);
    if (rc) return rc;
    size_t n = (size_t)PQntuples(res);
    if (!n) {
        PQclear(res);
        return 0;
    }
    s_delivery_t *ds = calloc(n, sizeof *ds);
    if (!ds) abort();
    for (size_t i = 0; i < n; i++) {
        s_delivery_t *d = &ds[i];
        d->id = atoll(PQgetvalue(res, (int)i, 0));
        d->attempts = atoi(PQgetvalue(res, (int)i, 1));
        d->max_attempts = atoi(PQgetvalue(res, (int)i, 2));
        snprintf(d->rule, sizeof d->rule, "%s", PQgetvalue(res, (int)i, 3));
        d->dest = strdup(PQgetvalue(res, (int)i, 4));
        if (!d->dest) abort();
        snprintf(d->study, sizeof d->study, "%s", PQgetvalue(res, (int)i, 5));
        snprintf(d->sop, sizeof d->sop, "%s", PQgetvalue(res, (int)i, 6));
        json_t *dests = json_loads(PQgetvalue(res, (int)i, 7), 0, NULL);
        size_t k;
        json_t *one;
        json_array_foreach(dests, k, one)
        {
            char key[KP_ROUTE_MAX_URL + 8];
            if (!kp_route_destination_key(one, key, sizeof key) && !strcmp(key, d->dest)) {
                d->spec = json_incref(one);
                break;
            }
        }
        json_decref(dests);
        d->outcome = -1;
    }
    PQclear(res);
    qsort(ds, n, sizeof *ds, s_cmp);
    for (size_t i = 0; i < n; i++) {
        if (!ds[i].spec) {
            s_fail(&ds[i], S_DEAD, "the rule no longer has destination %s", ds[i].dest);
            continue;
        }
        if (s_files(r, &ds[i])) s_fail(&ds[i], S_RETRY, "database error reading the instances");
    }
    for (size_t i = 0; i < n;) {
        size_t j = i;
        while (j < n && !strcmp(ds[j].dest, ds[i].dest))
            j++;
        if (!strncmp(ds[i].dest, "dicom:", 6)) {
            s_delivery_t **group = calloc(j - i, sizeof *group);
            if (!group) abort();
            size_t m = 0;
            for (size_t k = i; k < j; k++)
                if (ds[k].outcome < 0) group[m++] = &ds[k];
            if (m) s_send_dicom(r, ds[i].dest + 6, group, m);
            free(group);
        } else {
            for (size_t k = i; k < j; k++) {
                if (ds[k].outcome < 0) s_send_stow(r, &ds[k]);
                if (r->bus) kp_bus_heartbeat(r->bus);
            }
        }
        if (r->bus) kp_bus_heartbeat(r->bus);
        i = j;
    }
    rc = 0;
    for (size_t i = 0; i < n; i++) {
        if (!rc) rc = s_record(r, &ds[i]);
        for (size_t k = 0; k < ds[i].nfiles; k++)
            free(ds[i].files[k].path);
        free(ds[i].files);
        free(ds[i].dest);
        json_decref(ds[i].spec);
    }
    free(ds);
    return rc ? rc : (int)n;
}
