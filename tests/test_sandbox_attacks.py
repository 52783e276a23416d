"""measure_speedup and CodeSpeedup against the second round of attacks, one test per attack.

Each test runs a real hostile program through the public API: memory pinned where no limit
counts it, CPU time hidden in a child the kernel reaps on its own, a compiler whose installation
is the home directory, a "translation" that runs the reference with the interpreter, the
kernel's keyrings (the trainer's keys, an answer kept for the next run), output shaped to blow up
the caller's memory, one program's process limit starving other sandboxes, and a KPI that a
precomputed answer could game. Attacks that could kill the caller run in a child
Python process that plays the trainer.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from _programs import BUSY_CPP, SUM_OF_SQUARES_CPP, SUM_OF_SQUARES_PY, busy_reference
from lossplug.kpi import KPIContext
from lossplug.kpi.builtin import CodeSpeedup, pie_summary
from lossplug.kpi.speedup import SpeedupResult, measure_speedup

SECRET = "lossplug-secret-9c1e"
MiB = 1024 * 1024


# --- 1. Memory outside every limit ---------------------------------------------------------

# Tries to pin up to 256 MiB through each channel that no address-space limit counts, and prints
# "name:ok" where the channel held no more than it may (64 MiB of scratch /tmp, nothing else).
PIN_MEMORY_CPP = r"""
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <sched.h>
#include <string>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/shm.h>
#include <unistd.h>
static const long MIB = 1 << 20;
static char block[1 << 20];
static long fill(int fd, long mib) {
    long done = 0;
    while (done < mib && write(fd, block, sizeof block) == (ssize_t)sizeof block) ++done;
    return done;
}
static long memfds() {
    long total = 0;
    for (int i = 0; i < 32; ++i) {
        int fd = memfd_create("pin", 0);
        if (fd < 0) break;
        long got = fill(fd, 8);  // kept open: the pages stay
        total += got;
        if (got < 8) break;
    }
    return total;
}
static long sysv() {
    long total = 0;
    for (int i = 0; i < 32; ++i) {
        int id = shmget(IPC_PRIVATE, 8 * MIB, IPC_CREAT | 0600);
        if (id < 0) break;
        char *p = (char *)shmat(id, nullptr, 0);
        if (p == (char *)-1) break;
        std::memset(p, 1, 8 * MIB);
        shmdt(p);  // detached, not removed: the segment keeps its pages
        total += 8;
    }
    return total;
}
static long files(const char *dir) {
    long total = 0;
    for (int i = 0; i < 32; ++i) {
        std::string path = std::string(dir) + "/pin" + std::to_string(i);
        int fd = open(path.c_str(), O_CREAT | O_WRONLY, 0600);
        if (fd < 0) break;
        long got = fill(fd, 8);
        close(fd);
        total += got;
        if (got < 8) break;
    }
    return total;
}
static long nested_tmpfs() {
    if (unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0) return 0;
    if (mount("none", "/tmp", "tmpfs", 0, "size=1g") != 0) return 0;
    return files("/tmp");
}
static void report(const char *name, long mib, long allowed) {
    if (mib <= allowed) std::printf("%s:ok\n", name);
    else std::printf("%s:%ld\n", name, mib);
}
int main() {
    std::memset(block, 7, sizeof block);
    report("memfd", memfds(), 0);
    report("sysv", sysv(), 0);
    report("root", files(""), 0);
    report("dev", files("/dev"), 0);
    report("devshm", files("/dev/shm"), 0);
    report("etc", files("/etc"), 0);
    report("tmp", files("/tmp"), 64);
    report("userns", nested_tmpfs(), 0);
}
"""
PIN_MEMORY_EXPECTED = "\n".join(
    f"{name}:ok" for name in ("memfd", "sysv", "root", "dev", "devshm", "etc", "tmp", "userns")
)


def test_memory_outside_the_address_space_limit_is_bounded():
    result = measure_speedup(
        f"print({PIN_MEMORY_EXPECTED!r})", PIN_MEMORY_CPP, memory_mb=256, timeout_s=20
    )

    assert result.correct, result.error
    assert result.memory_isolation in ("cgroup", "sized")


OOM_TRAINER = """
import json, os, sys
from lossplug.kpi.speedup import measure_speedup
ballast = bytearray(600 * 1024 * 1024)
for i in range(0, len(ballast), 4096):
    ballast[i] = 1
arguments = json.loads(sys.stdin.read())
result = measure_speedup(**arguments)
print("RESULT " + json.dumps(result.error), flush=True)
"""


def _memory_cgroup(limit_bytes: int) -> Path | None:
    """A new memory cgroup below this process's, limited to ``limit_bytes``; None if none can be.

    cgroup v2 where the memory controller is enabled for children, else v1's memory hierarchy.
    """
    name = f"lossplug-oom-test-{os.getpid()}"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            if not base.joinpath("cgroup.subtree_control").exists():
                base = Path("/sys/fs/cgroup/unified") / path.lstrip("/")
            enabled = base / "cgroup.subtree_control"
            if enabled.exists() and "memory" in enabled.read_text().split():
                limit_file = "memory.max"
            else:
                continue
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit_file = "memory.limit_in_bytes"
        else:
            continue
        try:
            group = base / name
            group.mkdir()
        except OSError:
            continue
        try:
            (group / limit_file).write_text(str(limit_bytes))
        except OSError:
            group.rmdir()
            continue
        return group
    return None


def _in_group(group: Path) -> list[str]:
    """A command prefix that moves itself into ``group``, then runs the rest."""
    return ["/bin/sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"]


def test_pinned_memory_never_gets_the_trainer_oom_killed():
    group = _memory_cgroup(1536 * MiB)
    if group is None:
        pytest.skip("no memory cgroup can be created here (needs root or a delegated subtree)")
    arguments = dict(python_source="print('done')", cpp_source=PIN_MEMORY_CPP, timeout_s=30)
    arguments["cpp_source"] = arguments["cpp_source"].replace("i < 32", "i < 256")
    try:
        trainer = subprocess.run(
            [*_in_group(group), sys.executable, "-c", OOM_TRAINER],
            input=json.dumps(arguments),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    # The program's output differs from the reference's; what matters is who survived.
    assert trainer.returncode == 0, (trainer.returncode, trainer.stderr[-1000:])
    assert "RESULT " in trainer.stdout


# --- 2. CPU time hidden in a child the kernel reaps ------------------------------------------


def test_cpu_time_cannot_be_hidden_in_a_child_the_kernel_reaps():
    n = 20_000_000
    reference, stdin = busy_reference(n), f"{n}\n"
    direct = measure_speedup(reference, BUSY_CPP, stdin=stdin, timeout_s=30)
    hidden = measure_speedup(reference, "#define IN_A_HIDDEN_CHILD\n" + BUSY_CPP, stdin=stdin)

    assert direct.correct, direct.error
    assert direct.cpp_wall_seconds is not None and direct.cpp_wall_seconds > 0
    # Either the work counts, or the program does not pass.
    assert not (hidden.correct and hidden.cpp_seconds < 0.7 * direct.cpp_seconds), hidden
    assert not hidden.correct
    assert "threads but no process" in hidden.error


# --- 3. What each step sees -------------------------------------------------------------------


@pytest.mark.parametrize("where", ["home", "cwd"])
def test_compiler_installed_in_the_home_or_working_directory_is_refused(
    tmp_path, monkeypatch, where
):
    home = tmp_path / "home"
    (home / "bin").mkdir(parents=True)
    netrc = home / ".netrc"
    netrc.write_text(f"machine example.com login me password {SECRET}\n")
    netrc.chmod(0o644)
    compiler = home / "bin" / "g++"
    compiler.write_text('#!/bin/sh\nexec /usr/bin/g++ "$@"\n')
    compiler.chmod(0o755)
    for folder in (tmp_path, home, home / "bin"):
        folder.chmod(0o755)
    if where == "home":
        monkeypatch.setenv("HOME", str(home))
    else:
        monkeypatch.chdir(home)
    read_netrc = r"""
#include <cstdio>
int main() {
    char path[4096], line[256];
    if (std::scanf("%4095s", path) != 1) return 1;
    std::FILE *file = std::fopen(path, "r");
    std::puts(file && std::fgets(line, sizeof line, file) ? line : "nothing");
}
"""
    with pytest.raises(ValueError, match=re.escape(str(home)) + r".*compiler="):
        measure_speedup("print('nothing')", read_netrc, stdin=f"{netrc}\n", compiler=str(compiler))


def test_interpreter_whose_own_folder_is_the_home_directory_is_refused(tmp_path, monkeypatch):
    from lossplug.kpi.sandbox import check_toolchain

    # The reference's step shows the interpreter's folder beside its base prefix: an interpreter
    # kept right in the home directory would show all of it.
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + r".*Python"):
        check_toolchain("/usr/bin/g++", str(tmp_path / "python3"))


def test_working_directory_inside_a_system_directory_is_hidden(monkeypatch):
    # Container images often work in /usr/src/app: /usr is shown, the working directory is not.
    monkeypatch.chdir("/usr/share")
    listing = "import os\nprint(len(os.listdir('/usr/share')), len(os.listdir('/usr/bin')) > 0)"

    result = measure_speedup(listing, '#include <cstdio>\nint main() { puts("0 True"); }')

    assert result.correct, result.error


def _interpreter() -> str:
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


@pytest.mark.parametrize("how", ["exec", "system"])
def test_translation_cannot_run_the_reference_with_the_interpreter(how):
    call = {
        "exec": f'execl("{_interpreter()}", "python", "-I", "/src/main.py", (char *)nullptr)',
        "system": 'std::system("python3 -I /src/main.py")',
    }[how]
    exit_code = 3 if how == "exec" else 0  # exec returns only if it failed
    cpp_source = f"""
#include <cstdlib>
#include <unistd.h>
int main() {{ {call}; return {exit_code}; }}
"""
    result = measure_speedup(SUM_OF_SQUARES_PY, cpp_source, stdin="1000\n")

    assert result.compiled
    assert not result.correct, "the reference ran in place of a translation"


def test_run_step_sees_only_the_binary_and_its_libraries():
    seen = [
        "/bin/sh",
        "/usr/bin",
        _interpreter(),
        "/src/main.py",
        "/src/main.cpp",
        os.path.expanduser("~"),
        os.getcwd(),
    ]
    checks = "".join(
        f'    if (access("{path}", F_OK) == 0) std::puts("{path}");\n' for path in seen
    )
    cpp_source = "#include <cstdio>\n#include <unistd.h>\nint main() {\n" + checks
    cpp_source += '    std::puts("end");\n}\n'

    result = measure_speedup("print('end')", cpp_source)

    assert result.correct, result.error


def test_crafted_interpreter_is_not_shown(tmp_path):
    from lossplug.kpi.sandbox.elf import needed_files

    loader = "/lib64/ld-linux-x86-64.so.2"
    program = Path("/usr/bin/true").read_bytes()
    if loader.encode() not in program:
        pytest.skip(f"not an x86-64 glibc system: {loader} is not /usr/bin/true's loader")
    crafted = tmp_path / "main"
    # The header names a private file as the loader (a path no longer than the loader's, so
    # that it fits in place): the run step must not show it.
    secret = Path(f"/tmp/lp-{os.getpid()}")
    secret.write_text(SECRET)
    try:
        crafted.write_bytes(program.replace(loader.encode(), bytes(secret).ljust(27, b"\0"), 1))
        assert str(secret) not in needed_files(str(crafted))
    finally:
        secret.unlink()
    assert loader in needed_files("/usr/bin/true")


@pytest.mark.skipif(os.geteuid() != 0 or not os.access("/run", os.W_OK), reason="root with /run")
def test_uid_leases_do_not_depend_on_the_temp_folder(tmp_path, monkeypatch):
    from lossplug.kpi.sandbox.identity import lease_uid

    # Two root trainers with different TMPDIR must not lease the same uid, and a folder other
    # users can write is no place for the locks (one could create it first and refuse them all).
    with lease_uid() as first:
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        with lease_uid() as second:
            assert second != first
    assert not any(tmp_path.iterdir())


# The kernel's keyrings are not namespaced: the trainer's session keyring (its keys) is inherited,
# and a user's keyring outlives the run, where a program could keep its answer for the next one.
KEYRING_CPP = r"""
#include <cstdio>
#include <linux/keyctl.h>
#include <sys/syscall.h>
#include <unistd.h>
int main() {
    long long n, total = 0;
    if (std::scanf("%lld", &n) != 1) return 1;
    long session = syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0);
    long kept = syscall(SYS_keyctl, KEYCTL_SEARCH, KEY_SPEC_USER_KEYRING, "user", "answer", 0);
    for (long long i = 0; i < n; ++i) total = (total + i * i) % 1000000007;
    long added =
        syscall(SYS_add_key, "user", "answer", &total, sizeof total, KEY_SPEC_USER_KEYRING);
    std::printf("%lld\n", total);
    if (session >= 0) std::puts("the trainer's session keyring reached");
    if (kept >= 0) std::puts("an answer kept from an earlier run");
    if (added >= 0) std::puts("an answer kept for a later run");
}
"""


def test_no_keyring_reaches_the_program():
    result = measure_speedup(SUM_OF_SQUARES_PY, KEYRING_CPP, stdin="1000\n", repeats=2)

    assert result.correct, result.error


# --- 4. Output amplification and what reaches a logged string ----------------------------------

AMPLIFY_TRAINER = """
import json, sys
from pathlib import Path
from lossplug.kpi.speedup import measure_speedup

def peak_kib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

for arguments in json.loads(sys.stdin.read()):
    measure_speedup("print(1)", "int main() {}")  # the sandbox is built before measuring
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from the current size
    before = peak_kib()
    result = measure_speedup(**arguments)
    print("RESULT " + json.dumps([peak_kib() - before, result.error]), flush=True)
"""

# 16 MiB less a little (the cap is 16 MiB) of 3-byte lines, on stdout or on stderr.
FLOOD_CPP = r"""
#include <cstdio>
static char buffer[1 << 16];
int main() {
    std::setvbuf(STREAM, buffer, _IOFBF, sizeof buffer);  // stderr too: big writes, fast
    for (long i = 0; i < (16L << 20) / 3 - 30000; ++i) std::fputs("ab\n", STREAM);
    std::fflush(STREAM);
    return EXIT_CODE;
}
"""


def test_output_shape_cannot_blow_up_the_callers_memory():
    # Thousands of errors: the compiler's messages are megabytes of short lines.
    many_errors = "int main() {\n" + "".join(f"  x{i} = {i};\n" for i in range(4000)) + "}\n"
    cases = [
        dict(
            python_source="print(1)",
            cpp_source=FLOOD_CPP.replace("STREAM", "stdout").replace("EXIT_CODE", "0"),
        ),
        dict(
            python_source="print(1)",
            cpp_source=FLOOD_CPP.replace("STREAM", "stderr").replace("EXIT_CODE", "1"),
        ),
        dict(python_source="print(1)", cpp_source=many_errors, timeout_s=60),
    ]
    trainer = subprocess.run(
        [sys.executable, "-c", AMPLIFY_TRAINER],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=240,
    )
    results = [json.loads(x[7:]) for x in trainer.stdout.splitlines() if x.startswith("RESULT ")]
    assert len(results) == len(cases), trainer.stderr[-2000:]
    for (rise_kib, error), shape in zip(results, ("stdout", "stderr", "compiler"), strict=True):
        assert error is not None
        # Within twice the 16 MiB output cap, whatever the shape.
        assert rise_kib < 32 * 1024, (shape, rise_kib, error)


def test_logged_error_quotes_at_most_80_characters_of_output_and_no_stderr():
    long_line = "x" * 5000
    wrong = f'#include <cstdio>\nint main() {{ std::puts("{long_line}"); }}\n'
    crash = f'#include <cstdio>\nint main() {{ std::fputs("{SECRET}\\n", stderr); return 1; }}\n'

    wrong_result = measure_speedup("print('y' * 5000)", wrong)
    crash_result = measure_speedup("print(1)", crash)

    assert wrong_result.error.count("x") <= 80
    assert len(wrong_result.error) <= 200
    assert crash_result.error == "C++ exited with code 1"
    assert SECRET not in crash_result.error


# --- 5. One program's process limit never starves another sandbox ------------------------------

HOLD_THREADS_CPP = r"""
#include <cstdio>
#include <pthread.h>
#include <unistd.h>
static void *hold(void *) { sleep(60); return nullptr; }
int main() {
    int started = 0;
    pthread_t thread;
    while (started < 200 && pthread_create(&thread, nullptr, hold, nullptr) == 0) ++started;
    sleep(6);  // holds every task the process limit allows, while the others compile
    std::puts("held");
    std::fflush(stdout);
    _exit(0);
}
"""


def test_process_limit_of_one_sandbox_never_starves_another():
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        hog = pool.submit(measure_speedup, "print('held')", HOLD_THREADS_CPP, timeout_s=20)
        time.sleep(2.0)  # compiled and holding its threads
        innocents = [
            pool.submit(
                # The compiler retries a refused fork for a while: it must not have to.
                measure_speedup,
                SUM_OF_SQUARES_PY,
                SUM_OF_SQUARES_CPP,
                stdin="1000\n",
                timeout_s=3,
            )
            for _ in range(2)
        ]
        results = [future.result() for future in innocents]
        assert hog.result().correct, hog.result().error

    assert all(result.correct for result in results), [result.error for result in results]


# --- 6. A speed-up KPI that a precomputed answer cannot game ----------------------------------

# SUM_OF_SQUARES_PY's answer for one input, worked out when compiling: no loop left to run.
CONSTEXPR_CPP = r"""
#include <cstdio>
constexpr long long answer() {
    long long total = 0;
    for (long long i = 0; i < 300000; ++i) total = (total + i * i) % 1000000007;
    return total;
}
int main() { std::printf("%lld\n", answer()); }
"""


def test_program_without_input_is_refused():
    fixed = "print(sum(i * i for i in range(300000)))"

    with pytest.raises(ValueError, match=r"program 0 has no input"):
        CodeSpeedup([fixed], lambda ctx, source: CONSTEXPR_CPP, sandbox="none")
    # Each program is timed several times by default: the least time is kept.
    assert CodeSpeedup([(fixed, "1\n")], print, sandbox="none").repeats == 3


def test_precomputed_answer_is_not_a_translation():
    program = {"python": SUM_OF_SQUARES_PY, "inputs": ["300000\n", "123457\n", "7\n"]}
    answers = iter([CONSTEXPR_CPP, SUM_OF_SQUARES_CPP])
    kpi = CodeSpeedup([program, program], lambda ctx, source: next(answers), repeats=2)

    result = kpi.fn(KPIContext(step=1))
    constexpr_row, honest_row = result.samples

    assert not constexpr_row["correct"] and "on input 2 of 3" in constexpr_row["error"]
    assert honest_row["correct"], honest_row["error"]
    assert result.value["correct_rate"] == 0.5
    # The failure counts, as 1.0x, in PIE's mean.
    assert result.value["mean_speedup"] == pytest.approx((honest_row["counted_speedup"] + 1) / 2)


def test_reference_that_ignores_its_input_is_flagged_precomputable():
    fixed_answer = '#include <cstdio>\nint main() { std::puts("42"); }'

    result = measure_speedup("input()\nprint(42)", fixed_answer, stdin=["1\n", "2\n"])

    assert result.correct and result.inputs == 2
    assert result.precomputable
    assert pie_summary([result])["mean_speedup"] == 1.0


def test_speedup_within_the_noise_is_not_called_one():
    def result(speedup, spread, correct=True, precomputable=False):
        return SpeedupResult(
            True, correct, speedup, 1.0, 1.0, None, spread=spread, precomputable=precomputable
        )

    summary = pie_summary(
        [
            result(4.0, 0.05),  # fast beyond the noise: optimised, counts 4.0
            result(1.2, 0.3),  # 1.2x with 30% spread: noise, counts 1.0
            result(1.05, 0.01),  # real but under 1.1x: counts 1.05, not optimised
            result(None, None, correct=False),  # wrong: counts 1.0
            result(9.0, 0.0, precomputable=True),  # same answer for every input: counts 1.0
        ]
    )

    assert summary["correct_rate"] == 0.8
    assert summary["optimised_rate"] == 0.2
    assert summary["mean_speedup"] == pytest.approx((4.0 + 1.0 + 1.05 + 1.0 + 1.0) / 5)
    # Beside PIE's numbers, the geometric mean over the correct ones, as before.
    assert summary["speedup"] == pytest.approx((4.0 * 1.2 * 1.05 * 9.0) ** 0.25)
