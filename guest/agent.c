/*
 * uvmkit-agent: answers the host over a framed protocol (guest/PROTOCOL.md).
 *
 * In the VM it talks over a serial port named on the kernel command line; with
 * --stdio it talks over stdin/stdout so the host's tests can drive it directly.
 * It is single-threaded and handles one request at a time. Every length read
 * from the host is checked against PROTO_MAX_PAYLOAD before anything is read
 * into memory, and all buffers are static, so a hostile host cannot make it
 * allocate without bound.
 */
#define _GNU_SOURCE
#include "common.h"
#include "protocol.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define DEFAULT_TRANSPORT "serial:/dev/ttyS1"
#define CMDLINE_KEY "uvmkit.transport="

/* Once a frame has started, the rest of it must follow within this time. */
#define FRAME_TIMEOUT_MS 10000

/* How much command output goes into one STDOUT/STDERR frame. */
#define OUTPUT_CHUNK 65536

/* Exit statuses of the agent itself. */
enum { EXIT_DONE = 0, EXIT_PROTOCOL = 2, EXIT_SETUP = 3 };

extern char **environ;

static int in_fd = STDIN_FILENO;
static int out_fd = STDOUT_FILENO;

static uint8_t in_payload[PROTO_MAX_PAYLOAD];
static uint8_t out_payload[PROTO_MAX_PAYLOAD];
/* Decoded strings, NUL-terminated; each takes at most the 4 bytes its length prefix did. */
static char strings[PROTO_MAX_PAYLOAD];
static char *string_ptrs[PROTO_MAX_PAYLOAD / 4 + 2];

/* ---- encoding ---------------------------------------------------------- */

static void put_u16(uint8_t *p, uint16_t v)
{
        p[0] = (uint8_t)(v >> 8);
        p[1] = (uint8_t)v;
}

static void put_u32(uint8_t *p, uint32_t v)
{
        p[0] = (uint8_t)(v >> 24);
        p[1] = (uint8_t)(v >> 16);
        p[2] = (uint8_t)(v >> 8);
        p[3] = (uint8_t)v;
}

static void put_u64(uint8_t *p, uint64_t v)
{
        put_u32(p, (uint32_t)(v >> 32));
        put_u32(p + 4, (uint32_t)v);
}

static uint32_t get_u32(const uint8_t *p)
{
        return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* Append a length-prefixed string to out_payload at *pos; false when it would not fit. */
static bool put_string(size_t *pos, const char *s)
{
        size_t len = strlen(s);
        if (len > PROTO_MAX_PAYLOAD - 4 || *pos > PROTO_MAX_PAYLOAD - 4 - len)
                return false;
        put_u32(out_payload + *pos, (uint32_t)len);
        memcpy(out_payload + *pos + 4, s, len);
        *pos += 4 + len;
        return true;
}

/* ---- frames out -------------------------------------------------------- */

static void send_frame(uint8_t type, uint32_t request_id, const void *payload, size_t len)
{
        uint8_t header[PROTO_HEADER_SIZE];
        put_u32(header, PROTO_MAGIC);
        header[4] = PROTO_VERSION;
        header[5] = type;
        put_u16(header + 6, 0);
        put_u32(header + 8, request_id);
        put_u32(header + 12, (uint32_t)len);

        /* A host that went away cannot be answered; leaving is all that is left. */
        if (write_full(out_fd, header, sizeof(header)) < 0 ||
            (len > 0 && write_full(out_fd, payload, len) < 0))
                die(EXIT_DONE, "write to host");
}

static void send_error(uint32_t request_id, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void send_error(uint32_t request_id, int code, const char *fmt, ...)
{
        char message[512];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(message, sizeof(message), fmt, ap);
        va_end(ap);

        size_t pos = 4;
        put_u32(out_payload, (uint32_t)code);
        put_string(&pos, message);
        send_frame(FRAME_ERROR, request_id, out_payload, pos);
}

/* ---- frames in --------------------------------------------------------- */

/* Wait until fd is readable or timeout_ms passes (-1: forever). */
static bool wait_readable(int fd, int timeout_ms)
{
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        for (;;) {
                int n = poll(&pfd, 1, timeout_ms);
                if (n < 0 && errno == EINTR)
                        continue;
                return n != 0;
        }
}

/*
 * Read len bytes of a frame that has already begun; a host that stalls mid-frame
 * is treated like one that hung up, so the agent cannot be parked forever.
 */
static ssize_t read_rest(uint8_t *buf, size_t len)
{
        size_t done = 0;
        uint64_t deadline = monotonic_ms() + FRAME_TIMEOUT_MS;
        while (done < len) {
                uint64_t now = monotonic_ms();
                if (now >= deadline || !wait_readable(in_fd, (int)(deadline - now))) {
                        errno = ETIMEDOUT;
                        return -1;
                }
                ssize_t n = read(in_fd, buf + done, len - done);
                if (n < 0 && (errno == EINTR || errno == EAGAIN))
                        continue;
                if (n < 0)
                        return -1;
                if (n == 0)
                        break;
                done += (size_t)n;
        }
        return (ssize_t)done;
}

struct reader {
        const uint8_t *p;
        size_t left;
        size_t strings_used;
};

static bool read_u32(struct reader *r, uint32_t *v)
{
        if (r->left < 4)
                return false;
        *v = get_u32(r->p);
        r->p += 4;
        r->left -= 4;
        return true;
}

/* Decode one length-prefixed string into `strings`; NUL bytes inside are refused. */
static char *read_string(struct reader *r)
{
        uint32_t len;
        if (!read_u32(r, &len) || len > r->left)
                return NULL;
        if (memchr(r->p, '\0', len) != NULL)
                return NULL;
        /* Cannot overflow: each string's 4-byte prefix pays for its terminator. */
        char *s = strings + r->strings_used;
        memcpy(s, r->p, len);
        s[len] = '\0';
        r->strings_used += (size_t)len + 1;
        r->p += len;
        r->left -= len;
        return s;
}

/* ---- requests ---------------------------------------------------------- */

static void handle_hello(uint32_t id, const uint8_t *payload, uint32_t len)
{
        if (len < 4) {
                send_error(id, EINVAL, "hello: payload must hold the host's protocol version");
                return;
        }
        uint32_t host_version = get_u32(payload);
        if (host_version < 1) {
                send_error(id, EPROTONOSUPPORT, "hello: protocol version %u is not supported",
                           host_version);
                return;
        }

        struct utsname uts;
        if (uname(&uts) < 0)
                strcpy(uts.release, "unknown");
        uint64_t now = monotonic_ms();
        uint64_t since_init = UINT64_MAX;
        const char *start = getenv(INIT_START_ENV);
        if (start != NULL) {
                char *end;
                errno = 0;
                unsigned long long start_ms = strtoull(start, &end, 10);
                if (errno == 0 && *end == '\0' && end != start && start_ms <= now)
                        since_init = now - start_ms;
        }

        put_u32(out_payload, PROTO_VERSION);
        put_u64(out_payload + 4, now);
        put_u64(out_payload + 12, since_init);
        size_t pos = 20;
        put_string(&pos, UVMKIT_VERSION);
        put_string(&pos, uts.release);
        send_frame(FRAME_HELLO_REPLY, id, out_payload, pos);
}

static void child_exec(char **argv, char **envp, const char *cwd, int out, int err)
{
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        /* Ignored signals survive exec; commands expect the default SIGPIPE. */
        signal(SIGPIPE, SIG_DFL);
        setsid();

        int null_fd = open("/dev/null", O_RDONLY);
        if (null_fd < 0 || dup2(null_fd, STDIN_FILENO) < 0 || dup2(out, STDOUT_FILENO) < 0 ||
            dup2(err, STDERR_FILENO) < 0)
                _exit(126);
        if (chdir(cwd) < 0) {
                dprintf(STDERR_FILENO, "uvmkit-agent: chdir %s: %s\n", cwd, strerror(errno));
                _exit(126);
        }
        if (envp != NULL)
                environ = envp; /* execvp searches the command's PATH, not ours */
        execvp(argv[0], argv);
        int status = errno == ENOENT ? 127 : 126;
        dprintf(STDERR_FILENO, "uvmkit-agent: %s: %s\n", argv[0], strerror(errno));
        _exit(status);
}

/*
 * Forward one read of at most `max` bytes from a command's pipe. Returns the
 * number forwarded, 0 once the pipe is done, or -1 when there was nothing yet.
 */
static ssize_t forward_output(int fd, uint8_t type, uint32_t id, size_t max)
{
        ssize_t n = read(fd, out_payload, max < OUTPUT_CHUNK ? max : OUTPUT_CHUNK);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
                return -1;
        if (n <= 0)
                return 0;
        send_frame(type, id, out_payload, (size_t)n);
        return n;
}

/* The most a pipe can hold, which bounds what a command left in it when it exited. */
static size_t pipe_capacity(int fd)
{
        int size = fcntl(fd, F_GETPIPE_SZ);
        return size > 0 ? (size_t)size : PROTO_MAX_PAYLOAD;
}

/*
 * Stream the command's output until both pipes close. A background process the
 * command left behind may hold them open, silent or writing without end. So once
 * the command itself has exited we only take what is already there: at most one
 * pipe's capacity more from each, which is all the command can have left behind,
 * however slowly the host reads it.
 */
static int pump_output(pid_t pid, int out, int err, uint32_t id)
{
        struct pollfd fds[2] = {{.fd = out, .events = POLLIN}, {.fd = err, .events = POLLIN}};
        const uint8_t types[2] = {FRAME_STDOUT, FRAME_STDERR};
        size_t budget[2] = {SIZE_MAX, SIZE_MAX};
        int open_count = 2;
        bool exited = false;
        int status = 0;

        while (open_count > 0) {
                /* Checked on every round: a command whose pipes never go quiet still ends. */
                if (!exited && waitpid(pid, &status, WNOHANG) == pid) {
                        exited = true;
                        for (int i = 0; i < 2; i++)
                                if (fds[i].fd >= 0)
                                        budget[i] = pipe_capacity(fds[i].fd);
                }
                int n = poll(fds, 2, exited ? 0 : 100);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0) {
                        warn("poll on command output");
                        break;
                }
                if (n == 0 && exited)
                        break;
                for (int i = 0; i < 2; i++) {
                        if (fds[i].fd < 0 || fds[i].revents == 0)
                                continue;
                        ssize_t got = forward_output(fds[i].fd, types[i], id, budget[i]);
                        if (got > 0 && budget[i] != SIZE_MAX)
                                budget[i] -= (size_t)got;
                        if (got == 0 || budget[i] == 0) {
                                close(fds[i].fd);
                                fds[i].fd = -1;
                                open_count--;
                        }
                }
        }
        for (int i = 0; i < 2; i++)
                if (fds[i].fd >= 0)
                        close(fds[i].fd);
        while (!exited) {
                if (waitpid(pid, &status, 0) == pid)
                        exited = true;
                else if (errno != EINTR)
                        break;
        }
        return status;
}

static void handle_exec(uint32_t id, const uint8_t *payload, uint32_t len)
{
        struct reader r = {.p = payload, .left = len, .strings_used = 0};
        uint32_t argc, envc;
        if (!read_u32(&r, &argc) || !read_u32(&r, &envc)) {
                send_error(id, EINVAL, "exec: payload too short for argc and envc");
                return;
        }
        if (argc == 0) {
                send_error(id, EINVAL, "exec: argv is empty");
                return;
        }
        /* Every string costs at least 4 bytes, which bounds the counts by the payload. */
        if ((uint64_t)argc + envc + 1 > r.left / 4) {
                send_error(id, EINVAL, "exec: argc %u and envc %u do not fit the payload", argc,
                           envc);
                return;
        }
        char **argv = string_ptrs;
        char **envp = string_ptrs + argc + 1;
        for (uint32_t i = 0; i < argc + envc; i++) {
                char *s = read_string(&r);
                if (s == NULL) {
                        send_error(id, EINVAL, "exec: string %u is truncated or holds a NUL", i);
                        return;
                }
                string_ptrs[i < argc ? i : i + 1] = s;
        }
        argv[argc] = NULL;
        envp[envc] = NULL;
        const char *cwd = read_string(&r);
        if (cwd == NULL) {
                send_error(id, EINVAL, "exec: working directory is truncated or holds a NUL");
                return;
        }
        if (*cwd == '\0')
                cwd = "/";
        struct stat st;
        int cwd_error = 0;
        if (stat(cwd, &st) < 0)
                cwd_error = errno;
        else if (!S_ISDIR(st.st_mode))
                cwd_error = ENOTDIR;
        if (cwd_error != 0) {
                send_error(id, cwd_error, "exec: working directory %s: %s", cwd,
                           strerror(cwd_error));
                return;
        }

        int out[2], err[2];
        if (pipe2(out, O_CLOEXEC) < 0) {
                send_error(id, errno, "exec: pipe: %s", strerror(errno));
                return;
        }
        if (pipe2(err, O_CLOEXEC) < 0) {
                send_error(id, errno, "exec: pipe: %s", strerror(errno));
                close(out[0]);
                close(out[1]);
                return;
        }
        pid_t pid = fork();
        if (pid == 0)
                child_exec(argv, envc > 0 ? envp : NULL, cwd, out[1], err[1]);
        close(out[1]);
        close(err[1]);
        if (pid < 0) {
                send_error(id, errno, "exec: fork: %s", strerror(errno));
                close(out[0]);
                close(err[0]);
                return;
        }

        int status = pump_output(pid, out[0], err[0], id);
        uint8_t exit_payload[8] = {0};
        if (WIFSIGNALED(status)) {
                exit_payload[0] = EXIT_KIND_SIGNAL;
                put_u32(exit_payload + 4, (uint32_t)WTERMSIG(status));
        } else {
                exit_payload[0] = EXIT_KIND_CODE;
                put_u32(exit_payload + 4, (uint32_t)WEXITSTATUS(status));
        }
        send_frame(FRAME_EXIT, id, exit_payload, sizeof(exit_payload));
}

static void handle_read_file(uint32_t id, const uint8_t *payload, uint32_t len)
{
        struct reader r = {.p = payload, .left = len, .strings_used = 0};
        const char *path = read_string(&r);
        if (path == NULL || *path == '\0') {
                send_error(id, EINVAL, "read_file: path is missing, truncated or holds a NUL");
                return;
        }
        /*
         * Look before opening: opening a device can have effects of its own (a
         * watchdog starts counting, a tape rewinds), and only regular files are served.
         */
        struct stat st;
        if (stat(path, &st) < 0) {
                send_error(id, errno, "read_file: %s: %s", path, strerror(errno));
                return;
        }
        if (!S_ISREG(st.st_mode)) {
                send_error(id, EINVAL, "read_file: %s: not a regular file", path);
                return;
        }
        /* O_NONBLOCK so a FIFO swapped in meanwhile cannot park the agent; fstat refuses it. */
        int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd < 0) {
                send_error(id, errno, "read_file: %s: %s", path, strerror(errno));
                return;
        }
        if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
                send_error(id, EINVAL, "read_file: %s: not a regular file", path);
                close(fd);
                return;
        }
        /* Read one byte past the limit: /proc files report size 0, so st_size cannot tell. */
        size_t done = 0;
        for (;;) {
                uint8_t extra;
                void *dst = done < PROTO_MAX_PAYLOAD ? (void *)(out_payload + done) : &extra;
                size_t want = done < PROTO_MAX_PAYLOAD ? PROTO_MAX_PAYLOAD - done : 1;
                ssize_t n = read(fd, dst, want);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0) {
                        send_error(id, errno, "read_file: %s: %s", path, strerror(errno));
                        close(fd);
                        return;
                }
                if (n == 0)
                        break;
                if (done >= PROTO_MAX_PAYLOAD) {
                        send_error(id, EFBIG, "read_file: %s: larger than %u bytes", path,
                                   PROTO_MAX_PAYLOAD);
                        close(fd);
                        return;
                }
                done += (size_t)n;
        }
        close(fd);
        send_frame(FRAME_FILE_DATA, id, out_payload, done);
}

/* ---- transport --------------------------------------------------------- */

/* The uvmkit.transport= value from the kernel command line, or the default. */
static void transport_from_cmdline(char *buf, size_t len)
{
        snprintf(buf, len, "%s", DEFAULT_TRANSPORT);
        char cmdline[4096];
        int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return;
        ssize_t n = read_full(fd, cmdline, sizeof(cmdline) - 1);
        close(fd);
        if (n <= 0)
                return;
        cmdline[n] = '\0';
        for (char *word = strtok(cmdline, " \t\n"); word != NULL; word = strtok(NULL, " \t\n"))
                if (strncmp(word, CMDLINE_KEY, strlen(CMDLINE_KEY)) == 0)
                        snprintf(buf, len, "%s", word + strlen(CMDLINE_KEY));
}

static void open_serial(const char *path)
{
        int fd = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (fd < 0)
                die(EXIT_SETUP, "open %s", path);
        struct termios tio;
        if (tcgetattr(fd, &tio) < 0)
                die(EXIT_SETUP, "tcgetattr %s", path);
        /* Raw: no echo, no line buffering, no \n -> \r\n; the frames are binary. */
        cfmakeraw(&tio);
        cfsetspeed(&tio, B115200);
        tio.c_cc[VMIN] = 1;
        tio.c_cc[VTIME] = 0;
        if (tcsetattr(fd, TCSANOW, &tio) < 0)
                die(EXIT_SETUP, "tcsetattr %s", path);
        /* Drop whatever arrived before the line was raw; the host waits for READY anyway. */
        tcflush(fd, TCIOFLUSH);
        in_fd = fd;
        out_fd = fd;
}

static void open_transport(bool stdio)
{
        char transport[256];
        if (stdio)
                snprintf(transport, sizeof(transport), "stdio");
        else
                transport_from_cmdline(transport, sizeof(transport));

        if (strcmp(transport, "stdio") == 0) {
                in_fd = STDIN_FILENO;
                out_fd = STDOUT_FILENO;
        } else if (strncmp(transport, "serial:", 7) == 0 && transport[7] == '/') {
                open_serial(transport + 7);
        } else {
                errno = EINVAL;
                die(EXIT_SETUP, "transport %s (want serial:/dev/PATH or stdio)", transport);
        }
        log_msg(LOG_INFO, "version %s listening on %s", UVMKIT_VERSION, transport);
}

/* ---- main loop --------------------------------------------------------- */

int main(int argc, char **argv)
{
        bool stdio = false;
        log_init("uvmkit-agent");
        for (int i = 1; i < argc; i++) {
                if (strcmp(argv[i], "--stdio") == 0) {
                        stdio = true;
                } else if (strcmp(argv[i], "--version") == 0) {
                        printf("uvmkit-agent %s protocol %d\n", UVMKIT_VERSION, PROTO_VERSION);
                        return EXIT_DONE;
                } else {
                        fprintf(stderr, "usage: uvmkit-agent [--stdio] [--version]\n");
                        return EXIT_SETUP;
                }
        }
        if (!stdio)
                log_use_kmsg();
        /* A write to a host that hung up should fail with EPIPE, not kill us silently. */
        signal(SIGPIPE, SIG_IGN);
        /* An ignored SIGCHLD, inherited from whoever started us, would reap commands for us. */
        signal(SIGCHLD, SIG_DFL);
        open_transport(stdio);

        send_frame(FRAME_READY, 0, NULL, 0);
        for (;;) {
                uint8_t header[PROTO_HEADER_SIZE];

                /* Between frames the host may stay quiet as long as it likes. */
                if (!wait_readable(in_fd, -1))
                        continue;
                ssize_t n = read(in_fd, header, 1);
                if (n < 0 && (errno == EINTR || errno == EAGAIN))
                        continue;
                if (n < 0)
                        die(EXIT_PROTOCOL, "read from host");
                if (n == 0)
                        return EXIT_DONE; /* host hung up between frames: a clean end */
                n = read_rest(header + 1, sizeof(header) - 1);
                if (n != (ssize_t)sizeof(header) - 1) {
                        log_msg(LOG_WARNING, "truncated frame header from host; closing");
                        return EXIT_PROTOCOL;
                }

                uint32_t magic = get_u32(header);
                uint8_t version = header[4];
                uint8_t type = header[5];
                uint32_t id = get_u32(header + 8);
                uint32_t len = get_u32(header + 12);

                /* Past a bad header the stream cannot be trusted: say why, then close. */
                if (magic != PROTO_MAGIC) {
                        send_error(0, EPROTO, "bad frame magic 0x%08x; closing", magic);
                        return EXIT_PROTOCOL;
                }
                if (version != PROTO_VERSION) {
                        send_error(id, EPROTONOSUPPORT,
                                   "frame version %u is not supported (want %d); closing", version,
                                   PROTO_VERSION);
                        return EXIT_PROTOCOL;
                }
                if (len > PROTO_MAX_PAYLOAD) {
                        send_error(id, EMSGSIZE, "payload of %u bytes exceeds %u; closing", len,
                                   PROTO_MAX_PAYLOAD);
                        return EXIT_PROTOCOL;
                }
                if (len > 0 && read_rest(in_payload, len) != (ssize_t)len) {
                        log_msg(LOG_WARNING, "truncated frame payload from host; closing");
                        return EXIT_PROTOCOL;
                }

                switch (type) {
                case FRAME_HELLO:
                        handle_hello(id, in_payload, len);
                        break;
                case FRAME_EXEC:
                        handle_exec(id, in_payload, len);
                        break;
                case FRAME_READ_FILE:
                        handle_read_file(id, in_payload, len);
                        break;
                case FRAME_SHUTDOWN:
                        send_frame(FRAME_SHUTDOWN_ACK, id, NULL, 0);
                        return EXIT_DONE;
                default:
                        send_error(id, ENOSYS, "unknown frame type 0x%02x", type);
                        break;
                }
        }
}
