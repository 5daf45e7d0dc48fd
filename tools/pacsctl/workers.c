/* pacsctl workers [--kind K] [--json]: the live workers the broker knows, by kind, with what
 * their heartbeats announce (jobs done and failed, the job in hand) and when the broker last
 * heard from each. A worker the broker declared lost (no heartbeat for heartbeat_liveness x
 * heartbeat_ms) is not listed: its jobs were dispatched again. Exit 0, or 1 when the broker
 * cannot be reached. */
#include "kp_bus.h"
#include "pacsctl.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *s_str(json_t *o, const char *k, const char *dflt)
{
    const char *v = json_string_value(json_object_get(o, k));
    return v ? v : dflt;
}

static long long s_int(json_t *o, const char *k)
{
    return (long long)json_integer_value(json_object_get(o, k));
}

static int s_by_kind(const void *a, const void *b)
{
    json_t *x = *(json_t *const *)a, *y = *(json_t *const *)b;
    int c = strcmp(s_str(x, "kind", "~"), s_str(y, "kind", "~"));
    if (!c) c = strcmp(s_str(x, "host", ""), s_str(y, "host", ""));
    if (!c) c = (s_int(x, "pid") > s_int(y, "pid")) - (s_int(x, "pid") < s_int(y, "pid"));
    return c;
}

static void s_age(char *out, size_t n, long long ms)
{
    if (ms < 10000)
        snprintf(out, n, "%.1f s", (double)ms / 1000.0);
    else if (ms < 3600000)
        snprintf(out, n, "%lld min %lld s", ms / 60000, ms / 1000 % 60);
    else
        snprintf(out, n, "%lld h %lld min", ms / 3600000, ms / 60000 % 60);
}

int pacsctl_workers(const kp_config_t *cfg, int argc, char **argv)
{
    const char *kind = NULL;
    bool as_json = false;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--json"))
            as_json = true;
        else if (!strcmp(argv[i], "--kind") && i + 1 < argc)
            kind = argv[++i];
        else {
            fprintf(stderr, "usage: pacsctl workers [--kind KIND] [--json]\n");
            return 2;
        }
    }
    kp_bus_t *bus = kp_bus_new(cfg, "pacsctl");
    json_t *js = NULL;
    if (!bus || kp_bus_stats(bus, &js, 2000) || !js) {
        fprintf(stderr, "pacsctl: the broker is not reachable at %s\n", cfg->bus_jobs_endpoint);
        kp_bus_destroy(&bus);
        return 1;
    }
    kp_bus_destroy(&bus);
    json_t *all = json_object_get(js, "workers");
    size_t n = 0, i;
    json_t *w, **list = calloc(json_array_size(all) + 1, sizeof *list);
    if (!list) abort();
    json_array_foreach(all, i, w)
    {
        if (!kind || !strcmp(s_str(w, "kind", ""), kind)) list[n++] = w;
    }
    qsort(list, n, sizeof *list, s_by_kind);
    if (as_json) {
        json_t *out = json_array();
        for (i = 0; i < n; i++)
            json_array_append(out, list[i]);
        char *text = json_dumps(out, JSON_INDENT(2));
        printf("%s\n", text ? text : "[]");
        free(text);
        json_decref(out);
    } else {
        printf("%-12s %-20s %-8s %-9s %-7s %-9s %-28s %s\n", "kind", "host", "pid", "done",
               "failed", "in flight", "current job", "last heartbeat");
        for (i = 0; i < n; i++) {
            w = list[i];
            char cur[64] = "-", seen[32];
            json_t *c = json_object_get(w, "current");
            if (c) {
                char run[32];
                s_age(run, sizeof run, s_int(c, "running_ms"));
                snprintf(cur, sizeof cur, "%s #%lld (%s)", s_str(c, "type", "?"), s_int(c, "id"),
                         run);
            }
            s_age(seen, sizeof seen, s_int(w, "last_seen_ms"));
            char pid[16] = "-";
            if (s_int(w, "pid") > 0) snprintf(pid, sizeof pid, "%lld", s_int(w, "pid"));
            printf("%-12s %-20s %-8s %-9lld %-7lld %-9lld %-28s %s ago\n", s_str(w, "kind", "?"),
                   s_str(w, "host", s_str(w, "name", "?")), pid, s_int(w, "done"),
                   s_int(w, "failed"), s_int(w, "inflight"), cur, seen);
        }
        /* a summary per kind, for the eye and for scripts that count */
        printf("\n");
        if (!n) printf("no live worker%s%s\n", kind ? " of kind " : "", kind ? kind : "");
        for (i = 0; i < n;) {
            const char *k = s_str(list[i], "kind", "?");
            size_t j = i;
            long long done = 0;
            while (j < n && !strcmp(s_str(list[j], "kind", "?"), k))
                done += s_int(list[j++], "done");
            printf("%s: %zu live, %lld job(s) done\n", k, j - i, done);
            i = j;
        }
    }
    free(list);
    json_decref(js);
    return 0;
}
