/* PID 1 of a lossplug sandbox: runs one program under limits, then ends every process it left.
 *
 * Usage: launcher REPORT_FD LIFELINE_FD [--NAME=SOFT:HARD ...] -- PROGRAM [ARGS...]
 *
 * The limits are spelled as prlimit(1) spells them (as, cpu, fsize, core, nproc), so the caller
 * builds one list of limits for both this launcher and, without a sandbox, prlimit.
 *
 * Started by bwrap as the first process of a new PID namespace. It starts PROGRAM with the
 * resource limits, waits for it, kills every other process of the namespace (daemons, workers the
 * program did not wait for), reaps them all, and writes one line to REPORT_FD:
 *
 *     <"exit" or "signal"> <code or signal number> <user+system CPU seconds of the whole tree>
 *
 * The CPU time is RUSAGE_CHILDREN of this process: every process of the namespace ends as a child
 * of PID 1 (orphans are re-parented to it) and is reaped here, so the program cannot hide work in
 * a child it never waits for, and the sandbox's own start-up is not counted. This process is made
 * non-dumpable so that the program, which runs as the same user, can neither ptrace it nor reach
 * REPORT_FD through /proc/1/fd.
 *
 * LIFELINE_FD is the read end of a pipe whose write end only the caller holds: when it closes
 * (the caller's time limit, or the caller died) the launcher kills everything and exits at once.
 * The kernel's parent-death signal cannot do this job: it is subject to the permission check of
 * kill(2), and when the caller is root the sandbox runs as another user than bwrap.
 *
 * Written in the common subset of C and C++ so that the C++ compiler lossplug already needs can
 * build it.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static int set_limit(int resource, rlim_t soft, rlim_t hard) {
    struct rlimit limit;
    limit.rlim_cur = soft;
    limit.rlim_max = hard;
    return setrlimit(resource, &limit);
}

struct named_limit {
    const char *name;
    int resource;
};

static const struct named_limit NAMED_LIMITS[] = {
    {"as", RLIMIT_AS},     {"cpu", RLIMIT_CPU},     {"fsize", RLIMIT_FSIZE},
    {"core", RLIMIT_CORE}, {"nproc", RLIMIT_NPROC},
};

/* Apply "--NAME=SOFT:HARD"; 0 on success, -1 for a malformed option or a refused limit. */
static int apply_limit(const char *option, int dry_run) {
    const char *equals = strchr(option, '=');
    if (strncmp(option, "--", 2) != 0 || equals == NULL) return -1;
    size_t length = (size_t)(equals - option) - 2;
    for (size_t i = 0; i < sizeof NAMED_LIMITS / sizeof NAMED_LIMITS[0]; ++i) {
        if (strlen(NAMED_LIMITS[i].name) != length ||
            strncmp(option + 2, NAMED_LIMITS[i].name, length) != 0) {
            continue;
        }
        char *end;
        rlim_t soft = (rlim_t)strtoull(equals + 1, &end, 10);
        if (*end != ':') return -1;
        rlim_t hard = (rlim_t)strtoull(end + 1, &end, 10);
        if (*end != '\0') return -1;
        return dry_run ? 0 : set_limit(NAMED_LIMITS[i].resource, soft, hard);
    }
    return -1;
}

int main(int argc, char **argv) {
    int separator = 3;
    while (separator < argc && strcmp(argv[separator], "--") != 0) {
        if (apply_limit(argv[separator], 1) != 0) {
            fprintf(stderr, "lossplug launcher: bad limit %s\n", argv[separator]);
            return 125;
        }
        ++separator;
    }
    if (argc < 4 || separator + 1 >= argc) {
        fprintf(stderr, "lossplug launcher: bad arguments\n");
        return 125;
    }
    /* kill(-1) below would reach every process of the user outside a PID namespace. */
    if (getpid() != 1) {
        fprintf(stderr, "lossplug launcher: must run as PID 1 of its own PID namespace\n");
        return 125;
    }
    int report_fd = atoi(argv[1]);
    int lifeline_fd = atoi(argv[2]);
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    /* Descriptors bwrap passed on (a user namespace, the pipes) must not reach the program. */
    long max_fd = sysconf(_SC_OPEN_MAX);
    for (long fd = 3; fd < (max_fd > 0 ? max_fd : 1024) && fd < 65536; ++fd) {
        if (fd != report_fd && fd != lifeline_fd) close((int)fd);
    }
    fcntl(report_fd, F_SETFD, FD_CLOEXEC);
    fcntl(lifeline_fd, F_SETFD, FD_CLOEXEC);

    /* SIGCHLD arrives through a descriptor, so one poll() waits for the program and the
     * lifeline together. */
    sigset_t child_signals;
    sigemptyset(&child_signals);
    sigaddset(&child_signals, SIGCHLD);
    sigprocmask(SIG_BLOCK, &child_signals, NULL);
    int child_fd = signalfd(-1, &child_signals, SFD_CLOEXEC | SFD_NONBLOCK);
    if (child_fd < 0) {
        perror("lossplug launcher: signalfd");
        return 125;
    }

    pid_t child = fork();
    if (child < 0) {
        perror("lossplug launcher: fork");
        return 125;
    }
    if (child == 0) {
        /* A blocked signal mask survives exec: the program starts with the default one. */
        sigprocmask(SIG_UNBLOCK, &child_signals, NULL);
        signal(SIGPIPE, SIG_DFL);
        for (int i = 3; i < separator; ++i) {
            if (apply_limit(argv[i], 0) != 0) {
                perror("lossplug launcher: setrlimit");
                _exit(126);
            }
        }
        char **program = argv + separator + 1;
        execv(program[0], program);
        fprintf(stderr, "lossplug launcher: cannot run %s: %s\n", program[0], strerror(errno));
        _exit(127);
    }

    int status = 0;
    int finished = 0;
    while (!finished) {
        /* Reap whatever has ended: the program, or an orphan re-parented here (so that zombies
         * do not count against the process limit). */
        for (;;) {
            int child_status;
            pid_t ended = waitpid(-1, &child_status, WNOHANG);
            if (ended <= 0) break;
            if (ended == child) {
                status = child_status;
                finished = 1;
            }
        }
        if (finished) break;
        struct pollfd waits[2];
        waits[0].fd = child_fd;
        waits[0].events = POLLIN;
        waits[1].fd = lifeline_fd;
        waits[1].events = POLLIN;
        if (poll(waits, 2, -1) < 0) {
            if (errno == EINTR) continue;
            perror("lossplug launcher: poll");
            kill(-1, SIGKILL);
            return 125;
        }
        if (waits[1].revents != 0) {
            /* The caller stopped waiting (time limit) or is gone: end everything now. */
            kill(-1, SIGKILL);
            return 124;
        }
        struct signalfd_siginfo info;
        while (read(child_fd, &info, sizeof info) > 0) {
        }
    }
    /* The program is done: whatever it started goes too, and is reaped so its time counts. */
    kill(-1, SIGKILL);
    for (;;) {
        if (wait(NULL) < 0 && errno != EINTR) break;
    }
    struct rusage usage;
    getrusage(RUSAGE_CHILDREN, &usage);
    double seconds = (double)usage.ru_utime.tv_sec + (double)usage.ru_utime.tv_usec / 1e6 +
                     (double)usage.ru_stime.tv_sec + (double)usage.ru_stime.tv_usec / 1e6;
    char line[128];
    int length;
    if (WIFSIGNALED(status)) {
        length = snprintf(line, sizeof line, "signal %d %.6f\n", WTERMSIG(status), seconds);
    } else {
        length = snprintf(line, sizeof line, "exit %d %.6f\n", WEXITSTATUS(status), seconds);
    }
    if (write(report_fd, line, (size_t)length) != length) return 125;
    return 0;
}
