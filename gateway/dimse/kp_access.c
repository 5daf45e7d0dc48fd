/* kp_access: the calling AE's rights from the modality registry (see kp_access.h). */
#include "kp_access.h"

#include "kp_errors.h"
#include "kp_log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int kp_access_lookup(kp_db_t *db, const char *ae, kp_access_op_t op, kp_access_t *out)
{
    memset(out, 0, sizeof *out);
    PGresult *r = NULL;
    const char *params[] = {ae ? ae : ""};
    int rc = kp_db_exec(db, &r,
                        "SELECT m.allow_store, m.allow_find, m.allow_retrieve, m.site, "
                        "CASE WHEN m.site = '' THEN 0 ELSE coalesce(s.id, -1) END "
                        "FROM modalities m LEFT JOIN sites s ON s.name = m.site "
                        "WHERE m.ae_title = $1",
                        1, params);
    if (rc) return rc;
    if (PQntuples(r) == 1) {
        out->registered = true;
        int col = op == KP_ACCESS_STORE ? 0 : op == KP_ACCESS_FIND ? 1 : 2;
        out->allowed = !strcmp(PQgetvalue(r, 0, col), "t");
        snprintf(out->site, sizeof out->site, "%s", PQgetvalue(r, 0, 3));
        out->site_id = atoi(PQgetvalue(r, 0, 4));
        if (out->site_id < 0)
            kp_warn("access",
                    "AE %s is scoped to site '%s', which does not exist: it sees no study", ae,
                    out->site);
    }
    PQclear(r);
    return 0;
}
