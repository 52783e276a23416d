"""measure_speedup on real programs: compiled with the system compiler, run under real limits."""

from __future__ import annotations

import shutil
import time

import pytest

from _programs import (
    ALLOCATES_1_GIB_CPP,
    DOES_NOT_COMPILE_CPP,
    LOOPS_FOREVER_CPP,
    OFF_BY_ONE_CPP,
    SUM_OF_SQUARES_CPP,
    SUM_OF_SQUARES_PY,
)
from lossplug.kpi.speedup import SpeedupResult, measure_speedup

SEGFAULTS_CPP = r"""
int main() {
    volatile int *nowhere = nullptr;
    *nowhere = 1;
}
"""

SMALL_INPUT = "1000\n"
SMALL_ANSWER = "332833500"  # sum of i*i for i < 1000


def test_correct_translation_is_faster():
    result = measure_speedup(SUM_OF_SQUARES_PY, SUM_OF_SQUARES_CPP, stdin="2000000\n")

    assert isinstance(result, SpeedupResult)
    assert result.compiled
    assert result.correct, result.error
    assert result.error is None
    assert result.python_seconds is not None and result.python_seconds > 0
    assert result.cpp_seconds is not None and result.cpp_seconds > 0
    assert result.speedup == pytest.approx(result.python_seconds / result.cpp_seconds)
    assert result.speedup > 1


def test_repeats_keep_the_fastest_run():
    result = measure_speedup(SUM_OF_SQUARES_PY, SUM_OF_SQUARES_CPP, stdin=SMALL_INPUT, repeats=3)

    assert result.correct, result.error
    assert result.speedup is not None and result.speedup > 0


def test_wrong_answer():
    result = measure_speedup(SUM_OF_SQUARES_PY, OFF_BY_ONE_CPP, stdin=SMALL_INPUT)

    assert result.compiled
    assert not result.correct
    assert result.speedup is None
    assert result.error is not None
    assert result.error.startswith(f"wrong answer: expected '{SMALL_ANSWER}', got '")
    # Both programs finished, so both were timed.
    assert result.python_seconds is not None and result.cpp_seconds is not None


def test_wrong_number_of_lines_names_the_line():
    result = measure_speedup("print(1)\nprint(2)", '#include <cstdio>\nint main() { puts("1"); }')

    assert not result.correct
    assert result.error == "wrong answer on line 2: expected '2', got end of output"


def test_compile_error():
    result = measure_speedup(SUM_OF_SQUARES_PY, DOES_NOT_COMPILE_CPP, stdin=SMALL_INPUT)

    assert not result.compiled
    assert not result.correct
    assert result.speedup is None
    assert result.error is not None
    assert result.error.startswith("compile error: ")
    assert "totl" in result.error
    # The temporary directory means nothing to the caller and is not quoted.
    assert "lossplug-speedup-" not in result.error


def test_missing_compiler():
    result = measure_speedup(SUM_OF_SQUARES_PY, SUM_OF_SQUARES_CPP, compiler="no-such-compiler-x")

    assert not result.compiled
    assert result.error == "no C++ compiler found (tried 'no-such-compiler-x')"


def test_infinite_loop_is_stopped_at_the_time_limit():
    start = time.perf_counter()
    result = measure_speedup(SUM_OF_SQUARES_PY, LOOPS_FOREVER_CPP, stdin=SMALL_INPUT, timeout_s=2)
    elapsed = time.perf_counter() - start

    assert elapsed < 5.0  # compiling, the Python run and two seconds of looping
    assert result.compiled
    assert not result.correct
    assert result.speedup is None
    assert result.cpp_seconds is None
    assert result.error == "C++ timed out after 2.0 s"


def test_endless_output_is_cut_off():
    # Without a cap, this would fill the caller's memory until the time limit.
    cpp_source = (
        "#include <cstdio>\n"
        'int main() { for (;;) std::fputs("yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy\\n", stdout); }'
    )

    result = measure_speedup("print(1)", cpp_source, timeout_s=5)

    assert not result.correct
    assert result.error == "C++ printed more than 16 MiB"


FORKS_CPP = r"""
#include <cstdio>
#include <unistd.h>
int main() {
    if (fork() == 0) for (;;) pause();
    std::puts("1");
}
"""
# In the sandbox only the reference may start a process: the translation gets threads only.
FORKS_PY = "import os, signal\nif os.fork() == 0:\n    signal.pause()\nprint(1)\n"


@pytest.mark.parametrize(
    ("sandbox", "python_source", "cpp_source"),
    [
        ("none", "print(1)", FORKS_CPP),
        ("bwrap", FORKS_PY, '#include <cstdio>\nint main() { puts("1"); }'),
    ],
)
def test_process_left_behind_is_killed(sandbox, python_source, cpp_source):
    # The forked child holds stdout open forever; waiting for end of output would hang.
    start = time.perf_counter()
    result = measure_speedup(python_source, cpp_source, timeout_s=5, sandbox=sandbox)

    assert time.perf_counter() - start < 3.0
    assert result.correct, result.error


@pytest.fixture(params=["sandbox", "prlimit", "preexec_fn"])
def limits_via(request, monkeypatch):
    """The sandbox to run under: the namespace sandbox's launcher applies the limits; without a
    sandbox, prlimit does, else the preexec_fn fallback."""
    if request.param == "sandbox":
        return "bwrap"
    if request.param == "prlimit":
        assert shutil.which("prlimit"), "util-linux's prlimit is expected on Linux test machines"
    else:
        # Hide prlimit from the lookup in limits.unsandboxed; every other command is still found.
        which = shutil.which
        monkeypatch.setattr(
            shutil,
            "which",
            lambda name, *args, **kwargs: (
                None if name == "prlimit" else which(name, *args, **kwargs)
            ),
        )
    return "none"


def test_memory_limit(limits_via):
    result = measure_speedup(
        SUM_OF_SQUARES_PY, ALLOCATES_1_GIB_CPP, stdin=SMALL_INPUT, memory_mb=64, sandbox=limits_via
    )

    assert result.compiled
    assert not result.correct
    assert result.speedup is None
    assert result.error == "C++ memory limit exceeded (64 MiB)"


def test_crash_names_the_signal():
    result = measure_speedup("print(1)", SEGFAULTS_CPP)

    assert result.compiled
    assert not result.correct
    assert result.error == "C++ exited with code -11 (SIGSEGV)"


def test_python_reference_that_raises():
    result = measure_speedup(
        'raise ValueError("broken reference")', SUM_OF_SQUARES_CPP, stdin=SMALL_INPUT
    )

    assert result.compiled
    assert not result.correct
    assert result.speedup is None
    assert result.python_seconds is None
    assert result.error == (
        "Python reference failed: exited with code 1: ValueError: broken reference"
    )


def test_children_get_a_minimal_environment(monkeypatch):
    monkeypatch.setenv("LOSSPLUG_SECRET", "leaked")
    monkeypatch.setenv("LANG", "en_US.UTF-8")
    # Each program prints what it sees on one line and what the other should see on the other,
    # so a leak into either one is a wrong answer.
    python_source = (
        "import os\n"
        "print(os.environ.get('LOSSPLUG_SECRET', 'none'), os.environ.get('LANG'))\n"
        "print('none C')\n"
    )
    cpp_source = r"""
#include <cstdio>
#include <cstdlib>
int main() {
    std::puts("none C");
    const char *secret = std::getenv("LOSSPLUG_SECRET"), *lang = std::getenv("LANG");
    std::printf("%s %s\n", secret ? secret : "none", lang ? lang : "unset");
}
"""

    result = measure_speedup(python_source, cpp_source)

    assert result.correct, result.error


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(python_source=b"print(1)"), TypeError, r"python_source must be a str, got bytes"),
        (dict(cpp_source=None), TypeError, r"cpp_source must be a str, got NoneType"),
        (dict(stdin=42), TypeError, r"stdin must be a str or a list of str, got int"),
        (dict(stdin=[]), ValueError, r"stdin must hold at least one input, got an empty list"),
        (dict(timeout_s=0), ValueError, r"timeout_s must be a finite number > 0, got 0"),
        (dict(timeout_s=-1.5), ValueError, r"timeout_s .* got -1.5"),
        (dict(timeout_s=float("inf")), ValueError, r"timeout_s .* got inf"),
        (dict(timeout_s=float("nan")), ValueError, r"timeout_s .* got nan"),
        (dict(timeout_s="10"), TypeError, r"timeout_s must be a number, got str"),
        (dict(timeout_s=True), TypeError, r"timeout_s must be a number, got bool"),
        (dict(memory_mb=8), ValueError, r"memory_mb must be >= 16, got 8"),
        (dict(memory_mb=512.0), TypeError, r"memory_mb must be an int, got float"),
        (dict(compile_memory_mb=32), ValueError, r"compile_memory_mb must be >= 64, got 32"),
        (dict(compile_memory_mb="2G"), TypeError, r"compile_memory_mb must be an int, got str"),
        (dict(repeats=0), ValueError, r"repeats must be >= 1, got 0"),
        (dict(repeats=None), TypeError, r"repeats must be an int, got NoneType"),
        (dict(compiler=["g++"]), TypeError, r"compiler must be a str or None, got list"),
        (dict(compiler="  "), ValueError, r"compiler must name a command, got '  '"),
    ],
)
def test_bad_arguments_raise(kwargs, error, pattern):
    arguments = dict(python_source="print(1)", cpp_source="int main() {}") | kwargs
    python_source = arguments.pop("python_source")
    cpp_source = arguments.pop("cpp_source")

    with pytest.raises(error, match=pattern):
        measure_speedup(python_source, cpp_source, **arguments)
