/* kp_errors: error codes of the whole system, generated from kp_errors.def.
 * Functions return 0 on success or a negative KP_E* code; these helpers map a code to its
 * message, slug, HTTP status and DIMSE status. Unknown codes map to KP_EINTERNAL. */
#ifndef KP_ERRORS_H
#define KP_ERRORS_H

enum {
    KP_OK = 0,
#define KP_ERR(name, code, slug, http, dimse, msg) KP_E##name = (code),
#include "kp_errors.def"
#undef KP_ERR
};

/* Human-readable message (static string). */
const char *kp_strerror(int code);
/* Stable machine-readable slug for JSON bodies (static string). */
const char *kp_error_slug(int code);
/* HTTP status for the code (200 for KP_OK). */
int kp_error_http(int code);
/* DIMSE status for the code (0x0000 for KP_OK). */
unsigned kp_error_dimse(int code);

#endif
