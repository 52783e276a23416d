"""Real programs for the code speed-up KPI tests: a Python reference and C++ translations."""

# The reference: a loop slow enough in Python (a few million iterations) that the C++ version's
# advantage is far beyond timing noise and process start-up.
SUM_OF_SQUARES_PY = """\
n = int(input())
total = 0
for i in range(n):
    total = (total + i * i) % 1_000_000_007
print(total)
"""

# Trailing spaces and blank lines are not a difference.
SUM_OF_SQUARES_CPP = r"""
#include <cstdio>
int main() {
    long long n, total = 0;
    if (std::scanf("%lld", &n) != 1) return 1;
    for (long long i = 0; i < n; ++i) total = (total + i * i) % 1000000007;
    std::printf("%lld   \n\n", total);
}
"""

# An off-by-one: the loop includes n itself.
OFF_BY_ONE_CPP = r"""
#include <cstdio>
int main() {
    long long n, total = 0;
    if (std::scanf("%lld", &n) != 1) return 1;
    for (long long i = 0; i <= n; ++i) total = (total + i * i) % 1000000007;
    std::printf("%lld\n", total);
}
"""

DOES_NOT_COMPILE_CPP = r"""
#include <cstdio>
int main() {
    std::printf("%lld\n", totl);
}
"""

# volatile: an empty infinite loop is undefined behaviour the optimiser may delete.
LOOPS_FOREVER_CPP = r"""
int main() {
    volatile unsigned long counter = 0;
    for (;;) counter = counter + 1;
}
"""

# The size depends on the input so the compiler cannot prove anything about the allocation.
ALLOCATES_1_GIB_CPP = r"""
#include <cstdio>
#include <vector>
int main() {
    long long n;
    if (std::scanf("%lld", &n) != 1) return 1;
    std::vector<char> block(static_cast<size_t>(n) << 20, 1);
    std::printf("%d\n", block[n]);
}
"""

# CPU-bound work on the n read from stdin, done in main, in a thread (IN_A_THREAD), or in a child
# whose time no one would count (IN_A_HIDDEN_CHILD: SIGCHLD ignored, so the kernel reaps it).
BUSY_CPP = r"""
#include <csignal>
#include <cstdio>
#include <thread>
#include <unistd.h>
static long long work(long long n) {
    volatile long long total = 0;
    for (long long i = 0; i < n; ++i) total = (total + i * i) % 1000000007;
    return total;
}
int main() {
    long long n;
    if (std::scanf("%lld", &n) != 1) return 1;
#if defined(IN_A_THREAD)
    long long result = 0;
    std::thread worker([&] { result = work(n); });
    worker.join();  // the main thread waits, using no CPU
    std::printf("%lld\n", result);
#elif defined(IN_A_HIDDEN_CHILD)
    std::signal(SIGCHLD, SIG_IGN);  // the kernel reaps the worker: its time reaches no one
    int done[2];
    if (pipe(done) != 0) return 1;
    if (fork() == 0) {
        std::printf("%lld\n", work(n));
        std::fflush(stdout);
        _exit(0);
    }
    close(done[1]);
    char byte;
    read(done[0], &byte, 1);  // returns when the worker has exited
    return 0;
#else
    std::printf("%lld\n", work(n));
#endif
}
"""


def busy_reference(n: int) -> str:
    """A Python reference for BUSY_CPP on input ``n`` that prints the answer without the work."""
    return f"print({(n - 1) * n * (2 * n - 1) // 6 % 1_000_000_007})"
