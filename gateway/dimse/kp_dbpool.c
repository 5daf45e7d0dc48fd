/* kp_dbpool: database connections shared by the association threads (see kp_dbpool.h). */
#include "kp_dbpool.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct kp_dbpool {
    char *conninfo;
    pthread_mutex_t mu;
    kp_db_t **idle;
    int nidle, cap;
};

kp_dbpool_t *kp_dbpool_new(const char *conninfo, int cap)
{
    kp_dbpool_t *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->cap = cap > 0 ? cap : 1;
    p->idle = calloc((size_t)p->cap, sizeof *p->idle);
    p->conninfo = strdup(conninfo ? conninfo : "");
    if (!p->idle || !p->conninfo) {
        free(p->idle);
        free(p->conninfo);
        free(p);
        return NULL;
    }
    pthread_mutex_init(&p->mu, NULL);
    return p;
}

void kp_dbpool_destroy(kp_dbpool_t **pp)
{
    if (!pp || !*pp) return;
    kp_dbpool_t *p = *pp;
    for (int i = 0; i < p->nidle; i++)
        kp_db_destroy(&p->idle[i]);
    free(p->idle);
    free(p->conninfo);
    pthread_mutex_destroy(&p->mu);
    free(p);
    *pp = NULL;
}

kp_db_t *kp_dbpool_acquire(kp_dbpool_t *p)
{
    kp_db_t *db = NULL;
    pthread_mutex_lock(&p->mu);
    if (p->nidle > 0) db = p->idle[--p->nidle];
    pthread_mutex_unlock(&p->mu);
    if (db) return db;
    int err = 0;
    return kp_db_connect(p->conninfo, 5, true, &err);
}

void kp_dbpool_release(kp_dbpool_t *p, kp_db_t *db)
{
    if (!db) return;
    pthread_mutex_lock(&p->mu);
    if (p->nidle < p->cap) {
        p->idle[p->nidle++] = db;
        db = NULL;
    }
    pthread_mutex_unlock(&p->mu);
    kp_db_destroy(&db);
}
