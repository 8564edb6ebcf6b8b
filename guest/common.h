/*
 * Helpers shared by /init and the guest agent: logging that keeps errno, and
 * reads and writes that finish or say why not.
 */
#ifndef UVMKIT_COMMON_H
#define UVMKIT_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifndef UVMKIT_VERSION
#define UVMKIT_VERSION "unknown"
#endif

/* Environment variable through which /init hands its start time to the agent. */
#define INIT_START_ENV "UVMKIT_INIT_START_MS"

/* Kernel log levels, as understood by /dev/kmsg. */
enum log_level { LOG_ERR = 3, LOG_WARNING = 4, LOG_INFO = 6, LOG_DEBUG = 7 };

/* Name to prefix messages with; set once at start. */
void log_init(const char *name);

/* Send messages to /dev/kmsg from now on (falls back to stderr when it cannot). */
void log_use_kmsg(void);

void log_msg(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Log a warning ending in strerror(errno); errno is unchanged afterwards. */
void warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Like warn(), then exit(status). */
void die(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));

/* Milliseconds on CLOCK_MONOTONIC, which in a guest counts from kernel start. */
uint64_t monotonic_ms(void);

/*
 * Read exactly `len` bytes unless end of file comes first. Returns the number read
 * (less than len only at end of file), or -1 with errno set. Retries on EINTR.
 */
ssize_t read_full(int fd, void *buf, size_t len);

/* Write all of `len` bytes; 0 on success, -1 with errno set. Retries on EINTR. */
int write_full(int fd, const void *buf, size_t len);

#endif
