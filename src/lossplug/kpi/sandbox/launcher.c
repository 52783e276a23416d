/* PID 1 of a lossplug sandbox: runs one program under limits, then ends every process it left.
 *
 * Usage: launcher EXIT_FD LIFELINE_FD [--join=FD] [--uid=ID] [--threads-only]
 *                 [--NAME=SOFT:HARD ...] -- PROGRAM [ARGS...]
 *
 * The limits are spelled as prlimit(1) spells them (as, cpu, fsize, core, nproc, nofile,
 * msgqueue), so the caller builds one list of limits for both this launcher and, without a
 * sandbox, prlimit.
 *
 * Started by bwrap as the first process of a new PID namespace. It starts PROGRAM with the
 * resource limits, waits for it, kills every other process of the namespace (daemons, workers the
 * program did not wait for), reaps them all, and writes one line to EXIT_FD:
 *
 *     <"exit" or "signal"> <code or signal number> <CPU seconds> <wall seconds>
 *
 * The CPU time is user + system time of RUSAGE_CHILDREN of this process: every process of the
 * namespace ends as a child of PID 1 (orphans are re-parented to it) and is reaped here, and the
 * sandbox's own start-up is not counted. That alone is not enough: a process that ignores SIGCHLD
 * has its children reaped by the kernel, and their time never reaches any RUSAGE_CHILDREN. So with
 * --threads-only (the measured run) a seccomp filter lets the program start threads but no
 * process: fork, vfork and a clone without CLONE_THREAD end the program with SIGSYS. The whole
 * tree is then one process, and its threads' time is in its own usage. Threads-only rather than a
 * cgroup's cpu.stat because it holds for every caller, unprivileged ones included, costs nothing
 * and also takes away system() and exec'd helpers; compiled translations of Python programs do
 * not start processes.
 *
 * Every step also gets a filter against memory that no limit counts and against escape routes:
 * memfd_create, SysV shared memory and message queues fail with EPERM, and so do unshare, setns
 * and a clone that asks for a namespace (a nested user namespace could mount a tmpfs of any size),
 * socket (no network, whatever the namespace: socketpair still works), io_uring (whose
 * operations, socket creation among them, would pass by this filter), the kernel's keyrings
 * (not namespaced: a program could read the caller's session keyring, or keep a result there
 * for its next run) and bpf (maps hold kernel memory that no rlimit counts).
 * clone3 fails with ENOSYS, so the C library falls back to clone, whose flags a filter can read.
 * A system call of another ABI (32-bit, x32) ends the program: the filter knows this ABI only.
 *
 * With --uid=ID (the caller is root) this process starts as root of a user namespace with
 * CAP_SETUID and CAP_SETGID, and becomes ID for good before anything else: every sandbox of the
 * machine gets its own ID, so one program's process limit (RLIMIT_NPROC counts per user) never
 * starves another sandbox. Changing the uid clears the parent-death signal, which is set again.
 *
 * With --join=FD, a descriptor of a memory cgroup's cgroup.procs that the caller opened, this
 * process moves itself into that cgroup first, so that the program and everything it starts are
 * counted there.
 *
 * This process and so the program get oom_score_adj 1000: when memory runs out, the kernel kills
 * a sandbox before the trainer. It is made non-dumpable so that the program, which runs as the
 * same user, can neither ptrace it nor reach EXIT_FD through /proc/1/fd.
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
#include <grp.h>
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__)
#define NATIVE_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define NATIVE_ARCH AUDIT_ARCH_AARCH64
#endif

#ifndef CLONE_NEWTIME
#define CLONE_NEWTIME 0x00000080
#endif
#define NAMESPACE_FLAGS                                                                       \
    (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | \
     CLONE_NEWNET | CLONE_NEWTIME)

struct named_limit {
    const char *name;
    int resource;
};

static const struct named_limit NAMED_LIMITS[] = {
    {"as", RLIMIT_AS},       {"cpu", RLIMIT_CPU},       {"fsize", RLIMIT_FSIZE},
    {"core", RLIMIT_CORE},   {"nproc", RLIMIT_NPROC},   {"nofile", RLIMIT_NOFILE},
    {"msgqueue", RLIMIT_MSGQUEUE},
};

struct limit_setting {
    int resource;
    struct rlimit value;
};

/* The most limit options one command line may carry. */
#define MAX_LIMITS 32

/* Parse "--NAME=SOFT:HARD" into *setting; 0 on success, -1 for a malformed option. */
static int parse_limit(const char *option, struct limit_setting *setting) {
    const char *equals = strchr(option, '=');
    if (strncmp(option, "--", 2) != 0 || equals == NULL) return -1;
    size_t length = (size_t)(equals - option) - 2;
    for (size_t i = 0; i < sizeof NAMED_LIMITS / sizeof NAMED_LIMITS[0]; ++i) {
        if (strlen(NAMED_LIMITS[i].name) != length ||
            strncmp(option + 2, NAMED_LIMITS[i].name, length) != 0) {
            continue;
        }
        char *end;
        setting->resource = NAMED_LIMITS[i].resource;
        setting->value.rlim_cur = (rlim_t)strtoull(equals + 1, &end, 10);
        if (*end != ':') return -1;
        setting->value.rlim_max = (rlim_t)strtoull(end + 1, &end, 10);
        return *end == '\0' ? 0 : -1;
    }
    return -1;
}

/* One BPF statement or jump, without the casts that C++ and C disagree on. */
static struct sock_filter statement(unsigned short code, unsigned int k) {
    struct sock_filter op;
    op.code = code;
    op.jt = 0;
    op.jf = 0;
    op.k = k;
    return op;
}

static struct sock_filter jump(unsigned short code, unsigned int k, unsigned char jt,
                               unsigned char jf) {
    struct sock_filter op = statement(code, k);
    op.jt = jt;
    op.jf = jf;
    return op;
}

#define ERRNO(e) (SECCOMP_RET_ERRNO | ((e) & SECCOMP_RET_DATA))

/* The seccomp filter described at the top; 0 once installed. */
static int install_filter(int threads_only) {
#ifndef NATIVE_ARCH
    (void)threads_only;
    errno = ENOSYS; /* an architecture the filter does not know: refuse to run at all */
    return -1;
#else
    struct sock_filter program[64];
    unsigned int n = 0;
    const unsigned int nr = (unsigned int)offsetof(struct seccomp_data, nr);
    const unsigned int arch = (unsigned int)offsetof(struct seccomp_data, arch);
    const unsigned int flags = (unsigned int)offsetof(struct seccomp_data, args[0]);
    const unsigned int kill_action = SECCOMP_RET_KILL_PROCESS;
    /* Calls that fail with EPERM in every step. */
    static const long refused[] = {
        SYS_memfd_create, SYS_shmget, SYS_msgget, SYS_unshare, SYS_setns, SYS_socket,
        SYS_add_key, SYS_request_key, SYS_keyctl, SYS_bpf,
#ifdef SYS_io_uring_setup
        SYS_io_uring_setup, SYS_io_uring_enter, SYS_io_uring_register,
#endif
    };
    program[n++] = statement(BPF_LD | BPF_W | BPF_ABS, arch);
    program[n++] = jump(BPF_JMP | BPF_JEQ | BPF_K, NATIVE_ARCH, 1, 0);
    program[n++] = statement(BPF_RET | BPF_K, kill_action);
    program[n++] = statement(BPF_LD | BPF_W | BPF_ABS, nr);
#if defined(__x86_64__)
    /* x32 system calls share the architecture value and set this bit of the number. */
    program[n++] = jump(BPF_JMP | BPF_JGE | BPF_K, 0x40000000u, 0, 1);
    program[n++] = statement(BPF_RET | BPF_K, kill_action);
#endif
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; ++i) {
        program[n++] = jump(BPF_JMP | BPF_JEQ | BPF_K, (unsigned int)refused[i], 0, 1);
        program[n++] = statement(BPF_RET | BPF_K, ERRNO(EPERM));
    }
#ifdef SYS_clone3
    program[n++] = jump(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone3, 0, 1);
    program[n++] = statement(BPF_RET | BPF_K, ERRNO(ENOSYS));
#endif
    if (threads_only) {
#ifdef SYS_fork
        program[n++] = jump(BPF_JMP | BPF_JEQ | BPF_K, SYS_fork, 0, 1);
        program[n++] = statement(BPF_RET | BPF_K, kill_action);
#endif
#ifdef SYS_vfork
        program[n++] = jump(BPF_JMP | BPF_JEQ | BPF_K, SYS_vfork, 0, 1);
        program[n++] = statement(BPF_RET | BPF_K, kill_action);
#endif
    }
    /* clone: no namespace ever; with threads_only, a thread or nothing. */
    program[n++] = jump(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone, 0, threads_only ? 6 : 4);
    program[n++] = statement(BPF_LD | BPF_W | BPF_ABS, flags);
    program[n++] = jump(BPF_JMP | BPF_JSET | BPF_K, NAMESPACE_FLAGS, 0, 1);
    program[n++] = statement(BPF_RET | BPF_K, ERRNO(EPERM));
    if (threads_only) {
        program[n++] = jump(BPF_JMP | BPF_JSET | BPF_K, CLONE_THREAD, 1, 0);
        program[n++] = statement(BPF_RET | BPF_K, kill_action);
    }
    program[n++] = statement(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    program[n++] = statement(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    struct sock_fprog filter;
    filter.len = (unsigned short)n;
    filter.filter = program;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return -1;
    return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &filter, 0, 0);
#endif
}

/* Become ID for good: groups, gid, uid; the kernel drops every capability with uid 0. */
static int become(const char *option) {
    char *end;
    unsigned long id = strtoul(option + strlen("--uid="), &end, 10);
    if (*end != '\0' || id == 0) return -1;
    if (setgroups(0, NULL) != 0 || setresgid((gid_t)id, (gid_t)id, (gid_t)id) != 0 ||
        setresuid((uid_t)id, (uid_t)id, (uid_t)id) != 0) {
        return -1;
    }
    if (getuid() != (uid_t)id || geteuid() != (uid_t)id) return -1;
    return prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
}

/* No capability left in any set: the inheritable one bwrap leaves would otherwise stay. */
static int drop_capabilities(void) {
    struct __user_cap_header_struct header;
    struct __user_cap_data_struct data[2];
    memset(&header, 0, sizeof header);
    memset(data, 0, sizeof data);
    header.version = _LINUX_CAPABILITY_VERSION_3;
    return (int)syscall(SYS_capset, &header, data);
}

static double seconds_between(const struct timespec *start, const struct timespec *end) {
    return (double)(end->tv_sec - start->tv_sec) + (double)(end->tv_nsec - start->tv_nsec) / 1e9;
}

static void close_other_descriptors(int keep_low, int keep_high) {
    /* Descriptors bwrap passed on (a user namespace) must not reach the program. */
    for (int fd = 3; fd < keep_low; ++fd) close(fd);
    for (int fd = keep_low + 1; fd < keep_high; ++fd) close(fd);
#ifdef SYS_close_range
    if (syscall(SYS_close_range, (unsigned int)keep_high + 1, ~0u, 0) == 0) return;
#endif
    long max_fd = sysconf(_SC_OPEN_MAX);
    for (long fd = keep_high + 1; fd < (max_fd > 0 ? max_fd : 1024) && fd < 65536; ++fd) {
        close((int)fd);
    }
}

int main(int argc, char **argv) {
    int separator = 3;
    int threads_only = 0;
    const char *uid_option = NULL;
    int join_fd = -1;
    struct limit_setting limits[MAX_LIMITS];
    int limit_count = 0;
    while (separator < argc && strcmp(argv[separator], "--") != 0) {
        const char *option = argv[separator];
        if (strcmp(option, "--threads-only") == 0) {
            threads_only = 1;
        } else if (strncmp(option, "--uid=", 6) == 0) {
            uid_option = option;
        } else if (strncmp(option, "--join=", 7) == 0) {
            join_fd = atoi(option + 7);
        } else if (limit_count == MAX_LIMITS || parse_limit(option, &limits[limit_count]) != 0) {
            fprintf(stderr, "lossplug launcher: bad option %s\n", option);
            return 125;
        } else {
            ++limit_count;
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
    int exit_fd = atoi(argv[1]);
    int lifeline_fd = atoi(argv[2]);
    if (exit_fd < 3 || lifeline_fd < 3 || exit_fd == lifeline_fd) {
        fprintf(stderr, "lossplug launcher: bad descriptors\n");
        return 125;
    }
    /* Into the memory cgroup before anything else, so that nothing escapes its count. */
    if (join_fd >= 0) {
        if (join_fd < 3 || write(join_fd, "0\n", 2) != 2) {
            perror("lossplug launcher: cannot join the memory cgroup");
            return 125;
        }
        close(join_fd);
    }
    close_other_descriptors(exit_fd < lifeline_fd ? exit_fd : lifeline_fd,
                            exit_fd < lifeline_fd ? lifeline_fd : exit_fd);
    fcntl(exit_fd, F_SETFD, FD_CLOEXEC);
    fcntl(lifeline_fd, F_SETFD, FD_CLOEXEC);
    /* Raising one's own oom_score_adj needs no privilege, but a process that changed its uid is
     * not dumpable and its /proc files belong to root: first this, then the uid. */
    int oom = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (oom < 0 || write(oom, "1000", 4) != 4) {
        perror("lossplug launcher: oom_score_adj");
        return 125;
    }
    close(oom);
    if (uid_option != NULL && become(uid_option) != 0) {
        perror("lossplug launcher: cannot change user");
        return 125;
    }
    if (drop_capabilities() != 0) {
        perror("lossplug launcher: capset");
        return 125;
    }
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);

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

    struct timespec started, ended_at;
    clock_gettime(CLOCK_MONOTONIC, &started);
    pid_t child = fork();
    if (child < 0) {
        perror("lossplug launcher: fork");
        return 125;
    }
    if (child == 0) {
        /* A blocked signal mask survives exec: the program starts with the default one. */
        sigprocmask(SIG_UNBLOCK, &child_signals, NULL);
        signal(SIGPIPE, SIG_DFL);
        for (int i = 0; i < limit_count; ++i) {
            if (setrlimit(limits[i].resource, &limits[i].value) != 0) {
                perror("lossplug launcher: setrlimit");
                _exit(126);
            }
        }
        if (install_filter(threads_only) != 0) {
            perror("lossplug launcher: seccomp");
            _exit(126);
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
                clock_gettime(CLOCK_MONOTONIC, &ended_at);
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
    double wall = seconds_between(&started, &ended_at);
    char line[160];
    int length;
    if (WIFSIGNALED(status)) {
        length = snprintf(line, sizeof line, "signal %d %.6f %.6f\n", WTERMSIG(status), seconds,
                          wall);
    } else {
        length = snprintf(line, sizeof line, "exit %d %.6f %.6f\n", WEXITSTATUS(status), seconds,
                          wall);
    }
    if (write(exit_fd, line, (size_t)length) != length) return 125;
    return 0;
}
