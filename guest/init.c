/*
 * uvmkit /init: PID 1 of the utility VM.
 *
 * Mounts the kernel filesystems, brings up loopback, starts the guest agent and
 * reaps every process that ends up parented to us. When the agent exits the VM
 * powers off, so the host sees the guest's end as QEMU's end.
 */
#define _GNU_SOURCE
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <net/if.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define AGENT_PATH "/bin/uvmkit-agent"

struct mount_entry {
        const char *source;
        const char *target;
        const char *fstype;
        unsigned long flags;
        const char *data;
        /* Without these the agent cannot work at all, so failing to mount them is fatal. */
        bool essential;
};

/* In order: later entries live inside earlier ones. */
static const struct mount_entry mounts[] = {
    {"proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, true},
    {"sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, false},
    {"devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755", true},
    {"devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666",
     false},
    {"tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777", false},
    {"tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755", false},
    {"tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777", false},
    {"cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, false},
};

static void mount_all(void)
{
        for (size_t i = 0; i < sizeof(mounts) / sizeof(mounts[0]); i++) {
                const struct mount_entry *m = &mounts[i];

                /* Bases made from container images often lack mountpoints like /run. */
                if (mkdir(m->target, 0755) < 0 && errno != EEXIST)
                        warn("mkdir %s", m->target);
                if (mount(m->source, m->target, m->fstype, m->flags, m->data) == 0)
                        continue;
                if (errno == EBUSY)
                        continue; /* the kernel mounted it already (devtmpfs.mount=1) */
                if (m->essential)
                        die(1, "mount %s on %s", m->fstype, m->target);
                warn("mount %s on %s", m->fstype, m->target);
        }
}

/*
 * The kernel gives init /dev/console as fds 0-2 only when the initramfs has that
 * node; without it they are closed and the first files we open would take them.
 */
static void ensure_std_fds(void)
{
        for (int fd = 0; fd < 3; fd++) {
                if (fcntl(fd, F_GETFD) >= 0)
                        continue;
                int new_fd = open("/dev/console", O_RDWR | O_NOCTTY);
                if (new_fd < 0)
                        new_fd = open("/dev/null", O_RDWR | O_NOCTTY);
                if (new_fd < 0) {
                        warn("open /dev/console and /dev/null");
                        return;
                }
                if (new_fd != fd) {
                        dup2(new_fd, fd);
                        close(new_fd);
                }
        }
}

static void bring_up_loopback(void)
{
        struct ifreq ifr;
        int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (fd < 0) {
                warn("socket for lo");
                return;
        }
        memset(&ifr, 0, sizeof(ifr));
        strncpy(ifr.ifr_name, "lo", IFNAMSIZ - 1);
        if (ioctl(fd, SIOCGIFFLAGS, &ifr) < 0) {
                warn("get flags of lo");
        } else {
                ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
                if (ioctl(fd, SIOCSIFFLAGS, &ifr) < 0)
                        warn("bring up lo");
        }
        close(fd);
}

static pid_t start_agent(uint64_t start_ms)
{
        char start[32];
        snprintf(start, sizeof(start), INIT_START_ENV "=%" PRIu64, start_ms);
        char *const argv[] = {AGENT_PATH, NULL};
        char *const envp[] = {
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/root",
            "TERM=linux",
            start,
            NULL,
        };

        pid_t pid = fork();
        if (pid < 0)
                die(1, "fork for %s", AGENT_PATH);
        if (pid == 0) {
                sigset_t all;
                sigemptyset(&all);
                sigprocmask(SIG_SETMASK, &all, NULL);
                setsid();
                execve(AGENT_PATH, argv, envp);
                /* Same convention as a shell: not found is 127, found but not runnable 126. */
                int status = errno == ENOENT ? 127 : 126;
                warn("exec %s", AGENT_PATH);
                _exit(status);
        }
        log_msg(LOG_INFO, "started %s as pid %d", AGENT_PATH, (int)pid);
        return pid;
}

static void describe_status(int status, char *buf, size_t len)
{
        if (WIFEXITED(status))
                snprintf(buf, len, "exited with status %d", WEXITSTATUS(status));
        else if (WIFSIGNALED(status))
                snprintf(buf, len, "killed by signal %d", WTERMSIG(status));
        else
                snprintf(buf, len, "stopped (status 0x%x)", (unsigned)status);
}

/* Reap children until the agent is gone; orphans of any command end up here too. */
static void reap_until(pid_t agent)
{
        for (;;) {
                int status;
                pid_t pid = waitpid(-1, &status, 0);
                if (pid < 0 && errno == EINTR)
                        continue;
                if (pid < 0) {
                        warn("waitpid");
                        return;
                }
                if (pid == agent) {
                        char what[64];
                        describe_status(status, what, sizeof(what));
                        log_msg(LOG_INFO, "%s %s; powering off", AGENT_PATH, what);
                        return;
                }
        }
}

static void power_off(void)
{
        kill(-1, SIGTERM);
        usleep(100 * 1000);
        kill(-1, SIGKILL);
        sync();
        reboot(RB_POWER_OFF);
        /* Returning from init panics the kernel, which QEMU's -no-reboot also ends. */
        die(1, "reboot(RB_POWER_OFF)");
}

int main(void)
{
        uint64_t start_ms = monotonic_ms();

        log_init("uvmkit-init");
        umask(022);
        mount_all();
        ensure_std_fds();
        log_use_kmsg();
        log_msg(LOG_INFO, "version %s", UVMKIT_VERSION);

        bring_up_loopback();

        /* Ctrl-Alt-Del should reach us as SIGINT rather than reboot behind our back. */
        reboot(RB_DISABLE_CAD);

        pid_t agent = start_agent(start_ms);
        reap_until(agent);
        power_off();
        return 1;
}
