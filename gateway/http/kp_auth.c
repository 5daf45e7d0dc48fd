/* kp_auth: token verification, permission checks, session liveness (see kp_auth.h). */
#include "kp_auth.h"

#include "kp_errors.h"
#include "kp_log.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define S_SESSION_SLOTS 4096
#define S_ALIVE_SECONDS 5

typedef struct {
    char role[64];
    char perm[64];
} s_pair_t;

typedef struct {
    char sid[48];
    bool alive;
    time_t checked;
} s_slot_t;

struct kp_auth {
    const kp_config_t *cfg;
    kp_jwt_t *jwt;
    kp_password_policy_t *policy;
    pthread_rwlock_t lock; /* guards pairs */
    s_pair_t *pairs;
    size_t npairs;
    bool ready;
    pthread_mutex_t smu; /* guards slots */
    s_slot_t *slots;
};

kp_auth_t *kp_auth_new(const kp_config_t *cfg)
{
    if (kp_jwt_keygen(cfg)) return NULL;
    kp_auth_t *a = calloc(1, sizeof *a);
    if (!a) abort();
    a->cfg = cfg;
    a->jwt = kp_jwt_new(cfg);
    if (!a->jwt) {
        free(a);
        return NULL;
    }
    a->policy = kp_password_policy_new(cfg);
    pthread_rwlock_init(&a->lock, NULL);
    pthread_mutex_init(&a->smu, NULL);
    a->slots = calloc(S_SESSION_SLOTS, sizeof *a->slots);
    if (!a->slots) abort();
    return a;
}

void kp_auth_destroy(kp_auth_t **pa)
{
    kp_auth_t *a = pa ? *pa : NULL;
    if (!a) return;
    kp_jwt_destroy(&a->jwt);
    kp_password_policy_destroy(&a->policy);
    pthread_rwlock_destroy(&a->lock);
    pthread_mutex_destroy(&a->smu);
    free(a->pairs);
    free(a->slots);
    free(a);
    *pa = NULL;
}

const kp_jwt_t *kp_auth_jwt(const kp_auth_t *a)
{
    return a->jwt;
}

const kp_password_policy_t *kp_auth_policy(const kp_auth_t *a)
{
    return a->policy;
}

int kp_auth_reload(kp_auth_t *a, kp_db_t *db)
{
    PGresult *r = NULL;
    int rc = kp_db_exec(db, &r,
                        "SELECT role, permission FROM role_permissions ORDER BY role, permission",
                        0, NULL);
    if (rc) return rc;
    size_t n = (size_t)PQntuples(r);
    s_pair_t *pairs = calloc(n ? n : 1, sizeof *pairs);
    if (!pairs) abort();
    for (size_t i = 0; i < n; i++) {
        snprintf(pairs[i].role, sizeof pairs[i].role, "%s", PQgetvalue(r, (int)i, 0));
        snprintf(pairs[i].perm, sizeof pairs[i].perm, "%s", PQgetvalue(r, (int)i, 1));
    }
    PQclear(r);
    pthread_rwlock_wrlock(&a->lock);
    free(a->pairs);
    a->pairs = pairs;
    a->npairs = n;
    a->ready = true;
    pthread_rwlock_unlock(&a->lock);
    return 0;
}

bool kp_auth_ready(const kp_auth_t *a)
{
    return __atomic_load_n(&a->ready, __ATOMIC_ACQUIRE);
}

/* With the read lock held. */
static bool s_role_has(const kp_auth_t *a, const char *role, const char *perm)
{
    for (size_t i = 0; i < a->npairs; i++)
        if (!strcmp(a->pairs[i].role, role) && !strcmp(a->pairs[i].perm, perm)) return true;
    return false;
}

bool kp_auth_allows(kp_auth_t *a, const kp_identity_t *id, const char *perm)
{
    if (!perm || !strcmp(perm, KP_PERM_PUBLIC)) return true;
    if (!id->authenticated) return false;
    if (!strcmp(perm, KP_PERM_AUTHENTICATED)) return true;
    bool ok = false;
    pthread_rwlock_rdlock(&a->lock);
    for (int i = 0; i < id->nroles && !ok; i++) ok = s_role_has(a, id->roles[i], perm);
    pthread_rwlock_unlock(&a->lock);
    return ok;
}

int kp_auth_verify(kp_auth_t *a, const char *token, kp_identity_t *id, const char **why)
{
    memset(id, 0, sizeof *id);
    kp_jwt_claims_t c = {0};
    kp_jwt_reason_t reason = KP_JWT_OK;
    if (kp_jwt_verify(a->jwt, token, time(NULL), &c, &reason)) {
        if (why) *why = kp_jwt_reason_str(reason);
        return KP_EUNAUTH;
    }
    const char *dot = strchr(c.jti, '.');
    size_t sl = dot ? (size_t)(dot - c.jti) : 0;
    if (!sl || sl >= sizeof id->sid || strlen(c.sub) >= sizeof id->user ||
        c.n_roles > KP_AUTH_MAX_ROLES || c.n_sites > KP_AUTH_MAX_SITES) {
        kp_jwt_claims_clear(&c);
        if (why) *why = "malformed";
        return KP_EUNAUTH;
    }
    memcpy(id->sid, c.jti, sl);
    id->sid[sl] = 0;
    snprintf(id->user, sizeof id->user, "%s", c.sub);
    for (size_t i = 0; i < c.n_roles; i++)
        if (strlen(c.roles[i]) < sizeof id->roles[0])
            snprintf(id->roles[id->nroles++], sizeof id->roles[0], "%s", c.roles[i]);
    for (size_t i = 0; i < c.n_sites; i++)
        if (strlen(c.sites[i]) < sizeof id->sites[0])
            snprintf(id->sites[id->nsites++], sizeof id->sites[0], "%s", c.sites[i]);
    kp_jwt_claims_clear(&c);
    id->authenticated = true;
    id->site_all = kp_auth_allows(a, id, "site.all");
    return 0;
}

char *kp_auth_permissions_json(kp_auth_t *a, const char *const *roles, int nroles)
{
    size_t cap = 64, len = 1;
    char *out = malloc(cap);
    if (!out) abort();
    out[0] = '[';
    const char *last = NULL;
    pthread_rwlock_rdlock(&a->lock);
    /* pairs are sorted by role then permission; collect distinct permissions in sorted order */
    for (;;) {
        const char *next = NULL;
        for (size_t i = 0; i < a->npairs; i++) {
            bool mine = false;
            for (int k = 0; k < nroles && !mine; k++) mine = !strcmp(roles[k], a->pairs[i].role);
            if (!mine) continue;
            const char *p = a->pairs[i].perm;
            if (last && strcmp(p, last) <= 0) continue;
            if (!next || strcmp(p, next) < 0) next = p;
        }
        if (!next) break;
        size_t need = len + strlen(next) + 4;
        if (need > cap) {
            while (need > cap) cap *= 2;
            out = realloc(out, cap);
            if (!out) abort();
        }
        len += (size_t)sprintf(out + len, "%s\"%s\"", last ? "," : "", next);
        last = next;
    }
    pthread_rwlock_unlock(&a->lock);
    out = realloc(out, len + 2);
    if (!out) abort();
    out[len++] = ']';
    out[len] = 0;
    return out;
}

static size_t s_slot(const char *sid)
{
    size_t h = 5381;
    for (const char *p = sid; *p; p++) h = h * 33 + (unsigned char)*p;
    return h % S_SESSION_SLOTS;
}

int kp_auth_session_alive(kp_auth_t *a, kp_db_t *db, const char *sid)
{
    size_t k = s_slot(sid);
    time_t now = time(NULL);
    pthread_mutex_lock(&a->smu);
    s_slot_t *s = &a->slots[k];
    if (!strcmp(s->sid, sid) && (!s->alive || now - s->checked < S_ALIVE_SECONDS)) {
        bool alive = s->alive;
        pthread_mutex_unlock(&a->smu);
        return alive ? 1 : 0;
    }
    pthread_mutex_unlock(&a->smu);
    PGresult *r = NULL;
    const char *p[] = {sid};
    int rc = kp_db_exec(db, &r,
                        "SELECT 1 FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.id = "
                        "$1 AND s.revoked_at IS NULL AND s.expires_at > now() AND NOT u.disabled",
                        1, p);
    if (rc) return rc;
    bool alive = PQntuples(r) == 1;
    PQclear(r);
    pthread_mutex_lock(&a->smu);
    snprintf(s->sid, sizeof s->sid, "%s", sid);
    s->alive = alive;
    s->checked = now;
    pthread_mutex_unlock(&a->smu);
    return alive ? 1 : 0;
}

void kp_auth_session_dead(kp_auth_t *a, const char *sid)
{
    pthread_mutex_lock(&a->smu);
    s_slot_t *s = &a->slots[s_slot(sid)];
    snprintf(s->sid, sizeof s->sid, "%s", sid);
    s->alive = false;
    s->checked = time(NULL);
    pthread_mutex_unlock(&a->smu);
}

bool kp_auth_cookie(const char *h, size_t len, const char *name, char *out, size_t outlen)
{
    size_t nl = strlen(name);
    size_t i = 0;
    while (i < len) {
        while (i < len && (h[i] == ' ' || h[i] == ';' || h[i] == '\t')) i++;
        size_t start = i;
        while (i < len && h[i] != ';') i++;
        size_t end = i;
        if (end - start > nl && h[start + nl] == '=' && !memcmp(h + start, name, nl)) {
            size_t vl = end - start - nl - 1;
            const char *v = h + start + nl + 1;
            while (vl && (v[vl - 1] == ' ' || v[vl - 1] == '\t')) vl--;
            if (vl >= 2 && v[0] == '"' && v[vl - 1] == '"') v++, vl -= 2;
            if (!vl || vl >= outlen) return false;
            memcpy(out, v, vl);
            out[vl] = 0;
            return true;
        }
    }
    return false;
}
