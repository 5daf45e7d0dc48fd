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
static const char *const s_json_names[] = {"debug", "info", "warn", "error", "off"};
static int s_json; /* log.format = json */

int kp_log_set_format(const char *name)
{
    if (name && !strcasecmp(name, "text"))
        s_json = 0;
    else if (name && !strcasecmp(name, "json"))
        s_json = 1;
    else
        return -1;
    return 0;
}

/* Length of the valid UTF-8 sequence at p (at most n bytes), or 0 when it is not one. */
static size_t s_utf8_len(const unsigned char *p, size_t n)
{
    size_t len = p[0] < 0x80             ? 1
                 : (p[0] & 0xe0) == 0xc0 ? 2
                 : (p[0] & 0xf0) == 0xe0 ? 3
                 : (p[0] & 0xf8) == 0xf0 ? 4
                                         : 0;
    if (!len || len > n || (len == 2 && p[0] < 0xc2) || (len == 4 && p[0] > 0xf4)) return 0;
    for (size_t i = 1; i < len; i++)
        if ((p[i] & 0xc0) != 0x80) return 0;
    if (len == 3 && ((p[0] == 0xe0 && p[1] < 0xa0) || (p[0] == 0xed && p[1] >= 0xa0))) return 0;
    if (len == 4 && ((p[0] == 0xf0 && p[1] < 0x90) || (p[0] == 0xf4 && p[1] >= 0x90))) return 0;
    return len;
}

/* Appends s (n bytes) to out as the inside of a JSON string: quotes, backslashes and control
 * characters escaped, invalid UTF-8 replaced by U+FFFD. Returns the new length (never past cap
 * minus the room the caller keeps for the closing characters). */
static size_t s_json_str(char *out, size_t len, size_t cap, const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    for (size_t i = 0; i < n && len + 8 < cap;) {
        unsigned char c = p[i];
        if (c == '"' || c == '\\') {
            out[len++] = '\\';
            out[len++] = (char)c;
            i++;
        } else if (c < 0x20) {
            len += (size_t)snprintf(out + len, cap - len, "\\u%04x", c);
            i++;
        } else {
            size_t l = s_utf8_len(p + i, n - i);
            if (!l) {
                memcpy(out + len, "\xef\xbf\xbd", 3);
                len += 3;
                i++;
            } else {
                memcpy(out + len, p + i, l);
                len += l;
                i += l;
            }
        }
    }
    return len;
}

/* One JSON object per line: ts, process, pid, level, cat, msg and ctx when there is one. */
static void s_write_json(const struct timeval *tv, const struct tm *tm, kp_log_level_t level,
                         const char *category, const char *ctx, const char *msg, size_t msglen)
{
    char line[8192];
    size_t cap = sizeof line - 4, len = 0;
    int n = snprintf(line, cap, "{\"ts\":\"%04d-%02d-%02dT%02d:%02d:%02d.%03dZ\",\"process\":\"",
                     tm->tm_year + 1900, tm->tm_mon + 1, tm->tm_mday, tm->tm_hour, tm->tm_min,
                     tm->tm_sec, (int)(tv->tv_usec / 1000));
    if (n < 0) return;
    len = (size_t)n;
    len = s_json_str(line, len, cap, s_process, strlen(s_process));
    len += (size_t)snprintf(line + len, cap - len, "\",\"pid\":%d,\"level\":\"%s\",\"cat\":\"",
                            (int)getpid(), s_json_names[level]);
    const char *cat = category ? category : "-";
    len = s_json_str(line, len, cap, cat, strlen(cat));
    if (len + 10 < cap) {
        memcpy(line + len, "\",\"msg\":\"", 9);
        len += 9;
    }
    len = s_json_str(line, len, cap, msg, msglen);
    if (ctx && *ctx && len + 12 < cap) {
        memcpy(line + len, "\",\"ctx\":\"", 9);
        len += 9;
        len = s_json_str(line, len, cap, ctx, strlen(ctx));
    }
    line[len++] = '"';
    line[len++] = '}';
    line[len++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, len);
    (void)w;
}

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
    if (s_json) {
        char msg[4096];
        int m = vsnprintf(msg, sizeof msg, fmt, ap);
        if (m < 0) return;
        s_write_json(&tv, &tm, level, category, ctx, msg,
                     (size_t)m < sizeof msg ? (size_t)m : sizeof msg - 1);
        return;
    }
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
