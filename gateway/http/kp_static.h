/* kp_static: the OHIF viewer's files at / (loop thread, no database).
 *
 * Files come from http.ohif_dir (what `make` fetched from npm: build/ohif/dist). app-config.js is
 * not read from there: it is generated at start (the DICOMweb data source on the page's own
 * origin) and served from memory. Paths that are no file and not under /dicom-web, /api or /app
 * get index.html (OHIF's client-side routes such as /viewer?StudyInstanceUIDs=...). Hashed
 * bundles are cached for a year (immutable); index.html and app-config.js are revalidated. */
#ifndef KP_STATIC_H
#define KP_STATIC_H

#include "kp_config.h"

#include <stdbool.h>
#include <stddef.h>

#include <h2o.h>

/* Resolves http.ohif_dir and builds app-config.js; registers the MIME types the viewer needs in
 * gc's mimemap (wasm, woff2, ...). Logs a warning when the viewer is unavailable (the gateway
 * still serves DICOMweb). Returns whether the viewer is available. */
bool kp_static_init(const kp_config_t *cfg, h2o_globalconf_t *gc);

/* Whether path belongs to the API side (/dicom-web, /api, /app and below), not to the viewer. */
bool kp_static_is_api_path(const char *path, size_t len);

/* The generated app-config.js (NUL-terminated), for tests. */
const char *kp_static_app_config(void);

/* Whether a file name is a content-hashed bundle (cached as immutable). */
bool kp_static_is_hashed(const char *name, size_t len);

/* The Content-Type for a file name, by extension. */
const char *kp_static_mime(const char *name, size_t len);

/* Serves req (GET/HEAD of a viewer path). headers(req) adds the gateway's security headers;
 * log(req, status, bytes) writes the access log line. */
void kp_static_serve(h2o_req_t *req, void (*headers)(h2o_req_t *),
                     void (*log)(h2o_req_t *, int, size_t));

#endif
