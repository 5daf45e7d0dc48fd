/* kp_log: one line per event on stderr.
 *
 * Every process logs through these macros. A line carries the UTC time, the process name and
 * pid, the level, a category (a short word such as "store", "db", "bus") and the message, plus
 * an optional context (a job id or a Study Instance UID) in square brackets at the end. The
 * level is checked before any formatting happens, so disabled debug lines cost one compare.
 * A line is written with a single write(2), so lines from threads never interleave. With
 * log.format = json each line is a JSON object instead (kp_log_set_format). */
#ifndef KP_LOG_H
#define KP_LOG_H

#include <stdarg.h>

typedef enum {
    KP_LOG_DEBUG = 0,
    KP_LOG_INFO,
    KP_LOG_WARN,
    KP_LOG_ERROR,
    KP_LOG_OFF
} kp_log_level_t;

/* The current threshold; lines below it are skipped. */
extern kp_log_level_t kp_log_threshold;

/* Sets the process name shown in each line (borrowed; must outlive logging). */
void kp_log_init(const char *process);
/* Sets the line format: "text" (the default) or "json" (one JSON object per line, for log
 * shippers: ts, process, pid, level, cat, msg, ctx). -1 for an unknown name. */
int kp_log_set_format(const char *name);
/* Sets the threshold by name ("debug", "info", "warn", "error", "off"); -1 for an unknown name. */
int kp_log_set_level(const char *name);
/* Writes one line; use the macros below rather than calling this directly. ctx may be NULL. */
void kp_log_write(kp_log_level_t level, const char *category, const char *ctx, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void kp_log_vwrite(kp_log_level_t level, const char *category, const char *ctx, const char *fmt,
                   va_list ap);

#define kp_logc(level, cat, ctx, ...)                                                              \
    do {                                                                                           \
        if ((level) >= kp_log_threshold) kp_log_write((level), (cat), (ctx), __VA_ARGS__);         \
    } while (0)

#define kp_debug(cat, ...) kp_logc(KP_LOG_DEBUG, cat, NULL, __VA_ARGS__)
#define kp_info(cat, ...)  kp_logc(KP_LOG_INFO, cat, NULL, __VA_ARGS__)
#define kp_warn(cat, ...)  kp_logc(KP_LOG_WARN, cat, NULL, __VA_ARGS__)
#define kp_error(cat, ...) kp_logc(KP_LOG_ERROR, cat, NULL, __VA_ARGS__)

#endif
