/* Shared helpers for /init and the guest agent; see common.h. */
#define _GNU_SOURCE
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *log_name = "uvmkit";
static int kmsg_fd = -1;

void log_init(const char *name)
{
        log_name = name;
}

void log_use_kmsg(void)
{
        int saved = errno;
        if (kmsg_fd < 0)
                kmsg_fd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC | O_NOCTTY);
        errno = saved;
}

/* One record per call: /dev/kmsg treats each write() as one log line. */
static void log_vmsg(enum log_level level, const char *suffix, const char *fmt, va_list ap)
{
        char line[1024];
        int saved = errno;
        int n;

        if (kmsg_fd >= 0)
                n = snprintf(line, sizeof(line), "<%d>%s: ", (int)level, log_name);
        else
                n = snprintf(line, sizeof(line), "%s: ", log_name);
        if (n < 0 || (size_t)n >= sizeof(line))
                n = 0;
        int m = vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
        if (m > 0)
                n = (size_t)(n + m) >= sizeof(line) ? (int)sizeof(line) - 1 : n + m;
        if (suffix != NULL) {
                m = snprintf(line + n, sizeof(line) - (size_t)n, ": %s", suffix);
                if (m > 0)
                        n = (size_t)(n + m) >= sizeof(line) ? (int)sizeof(line) - 1 : n + m;
        }
        if ((size_t)n < sizeof(line) - 1)
                line[n++] = '\n';
        if (kmsg_fd < 0 || write(kmsg_fd, line, (size_t)n) < 0)
                (void)!write(STDERR_FILENO, line, (size_t)n);
        errno = saved;
}

void log_msg(enum log_level level, const char *fmt, ...)
{
        va_list ap;
        va_start(ap, fmt);
        log_vmsg(level, NULL, fmt, ap);
        va_end(ap);
}

void warn(const char *fmt, ...)
{
        int saved = errno;
        va_list ap;
        va_start(ap, fmt);
        log_vmsg(LOG_WARNING, strerror(saved), fmt, ap);
        va_end(ap);
        errno = saved;
}

void die(int status, const char *fmt, ...)
{
        int saved = errno;
        va_list ap;
        va_start(ap, fmt);
        log_vmsg(LOG_ERR, strerror(saved), fmt, ap);
        va_end(ap);
        exit(status);
}

uint64_t monotonic_ms(void)
{
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

ssize_t read_full(int fd, void *buf, size_t len)
{
        size_t done = 0;
        while (done < len) {
                ssize_t n = read(fd, (char *)buf + done, len - done);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return -1;
                if (n == 0)
                        break;
                done += (size_t)n;
        }
        return (ssize_t)done;
}

int write_full(int fd, const void *buf, size_t len)
{
        size_t done = 0;
        while (done < len) {
                ssize_t n = write(fd, (const char *)buf + done, len - done);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return -1;
                done += (size_t)n;
        }
        return 0;
}
