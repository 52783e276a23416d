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
