/* kp_log: formatting and writing of log lines (see kp_log.h). */
#include "kp_log.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

kp_log_level_t kp_log_threshold = KP_LOG_INFO;
static const char *s_process = "klinika";
static const char *const s_names[] = {"DEBUG", "INFO", "WARN", "ERROR", "OFF"};

void kp_log_init(const char *process)
{
    if (process) s_process = process;
}

int kp_log_set_level(const char *name)
{
    for (int i = 0; i <= KP_LOG_OFF; i++) {
        if (name && strcasecmp(name, s_names[i]) == 0) {
            kp_log_threshold = (kp_log_level_t)i;
            return 0;
        }
    }
    if (name && strcasecmp(name, "warning") == 0) {
        kp_log_threshold = KP_LOG_WARN;
        return 0;
    }
    return -1;
}

void kp_log_vwrite(kp_log_level_t level, const char *category, const char *ctx, const char *fmt,
                   va_list ap)
{
    char line[4096];
    struct timeval tv;
    struct tm tm;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    if (level < KP_LOG_DEBUG || level > KP_LOG_ERROR) level = KP_LOG_ERROR;
    int n = snprintf(
        line, sizeof line, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ %s[%d] %s %s: ", tm.tm_year + 1900,
        tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(tv.tv_usec / 1000),
        s_process, (int)getpid(), s_names[level], category ? category : "-");
    if (n < 0) return;
    size_t len = (size_t)n < sizeof line ? (size_t)n : sizeof line - 1;
    int m = vsnprintf(line + len, sizeof line - len, fmt, ap);
    if (m > 0) len += (size_t)m < sizeof line - len ? (size_t)m : sizeof line - len - 1;
    /* Control characters from client input must not forge extra log lines. */
    for (size_t i = (size_t)n; i < len; i++)
        if ((unsigned char)line[i] < 0x20) line[i] = ' ';
    if (ctx && *ctx && len < sizeof line - 8) {
        m = snprintf(line + len, sizeof line - len, " [%s]", ctx);
        if (m > 0) len += (size_t)m < sizeof line - len ? (size_t)m : sizeof line - len - 1;
    }
    if (len >= sizeof line - 1) len = sizeof line - 2;
    line[len++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, len);
    (void)w;
}

void kp_log_write(kp_log_level_t level, const char *category, const char *ctx, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kp_log_vwrite(level, category, ctx, fmt, ap);
    va_end(ap);
}
