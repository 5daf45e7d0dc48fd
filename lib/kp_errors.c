/* kp_errors: lookups into the error catalogue kp_errors.def. */
#include "kp_errors.h"

#include <stddef.h>

struct s_err {
    int code;
    const char *slug;
    int http;
    unsigned dimse;
    const char *msg;
};

static const struct s_err s_table[] = {
    {KP_OK, "ok", 200, 0x0000, "success"},
#define KP_ERR(name, code, slug, http, dimse, msg) {(code), (slug), (http), (dimse), (msg)},
#include "kp_errors.def"
#undef KP_ERR
};

static const struct s_err *s_find(int code)
{
    for (size_t i = 0; i < sizeof s_table / sizeof s_table[0]; i++)
        if (s_table[i].code == code) return &s_table[i];
    for (size_t i = 0; i < sizeof s_table / sizeof s_table[0]; i++)
        if (s_table[i].code == KP_EINTERNAL) return &s_table[i];
    return &s_table[0];
}

const char *kp_strerror(int code)
{
    return s_find(code)->msg;
}
const char *kp_error_slug(int code)
{
    return s_find(code)->slug;
}
int kp_error_http(int code)
{
    return s_find(code)->http;
}
unsigned kp_error_dimse(int code)
{
    return s_find(code)->dimse;
}
