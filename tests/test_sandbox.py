"""measure_speedup against hostile programs: each attack a model-generated program could make.

Every test runs a real program through the public API and checks that the attack is contained:
the caller survives and is not stopped, its environment and files stay private, nothing outside
the sandbox is written or reached, nothing is left running, limits hold for the compiler too, and
the CPU time counts the program's whole process tree. Attacks that would kill or freeze the
caller run in a child Python process that plays the trainer.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from _programs import BUSY_CPP, busy_reference
from lossplug.kpi.speedup import SandboxUnavailableError, measure_speedup

SECRET = "lossplug-secret-7f3a"


KILL_CPP = r"""
#include <csignal>
#include <cstdio>
#include <unistd.h>
int main() {
    long trainer;
    if (std::scanf("%ld", &trainer) != 1) return 1;
    int failures = 0;
    failures += kill((pid_t)trainer, SIGSTOP) != 0;
    failures += kill(getppid(), SIGKILL) != 0 || getppid() == 0;
    failures += kill((pid_t)trainer, SIGKILL) != 0;
    std::printf("%d\n", failures >= 2 ? 1 : 0);
}
"""

READ_SECRETS_CPP = r"""
#include <cstdio>
#include <cstdlib>
#include <string>
static std::string slurp(const std::string &path) {
    std::FILE *file = std::fopen(path.c_str(), "rb");
    if (!file) return "";
    std::string text;
    int c;
    while ((c = std::fgetc(file)) != EOF) text += (char)(c ? c : ' ');
    std::fclose(file);
    return text;
}
int main() {
    char trainer[32], secret_path[4096];
    if (std::scanf("%31s %4095s", trainer, secret_path) != 2) return 1;
    std::string seen = slurp(std::string("/proc/") + trainer + "/environ");
    seen += slurp("/proc/1/environ") + slurp(secret_path) + slurp("/etc/passwd");
    seen += slurp("/root/.bashrc");
    const char *env = std::getenv("LOSSPLUG_TEST_SECRET");
    if (env) seen += env;
    std::printf("%s\n", seen.empty() ? "nothing" : seen.c_str());
}
"""

TRAINER_SCRIPT = """
import dataclasses, json, os, sys
from lossplug.kpi.speedup import measure_speedup
for arguments in json.loads(sys.stdin.read()):
    arguments["stdin"] = arguments["stdin"].replace("TRAINER_PID", str(os.getpid()))
    result = measure_speedup(**arguments)
    print("RESULT " + json.dumps(dataclasses.asdict(result)), flush=True)
"""


@pytest.fixture(scope="module")
def attacks_on_the_trainer(tmp_path_factory):
    """Programs that attack the process calling measure_speedup, run from a child "trainer".

    One child runs them all (importing lossplug is most of its cost); it must survive each one,
    unstopped, and print every result.
    """
    secret_file = tmp_path_factory.mktemp("trainer") / "credentials"
    secret_file.write_text(SECRET)
    cases = [
        dict(python_source="print(1)", cpp_source=KILL_CPP, stdin="TRAINER_PID\n"),
        dict(
            python_source="print('nothing')",
            cpp_source=READ_SECRETS_CPP,
            stdin=f"TRAINER_PID {secret_file}\n",
        ),
    ]
    child = subprocess.Popen(
        [sys.executable, "-c", TRAINER_SCRIPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "LOSSPLUG_TEST_SECRET": SECRET},
        text=True,
    )
    try:
        stdout, stderr = child.communicate(json.dumps(cases), timeout=120)
    except subprocess.TimeoutExpired:
        child.kill()
        stdout, stderr = child.communicate()
        pytest.fail(f"the trainer hung (stopped?): {stdout[-500:]} {stderr[-500:]}")
    results = [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert child.returncode == 0 and len(results) == len(cases), (
        child.returncode,
        stdout[-500:],
        stderr[-2000:],
    )
    return results


def test_program_cannot_kill_or_stop_the_trainer(attacks_on_the_trainer):
    result = attacks_on_the_trainer[0]

    assert result["isolation"] == "bwrap"
    assert result["correct"], result["error"]


def test_program_cannot_read_the_trainer_environment_or_files(attacks_on_the_trainer):
    result = attacks_on_the_trainer[1]

    assert result["correct"], result["error"]
    assert SECRET not in json.dumps(result)


def test_include_of_a_file_outside_does_not_quote_it(tmp_path):
    secret_file = tmp_path / "secret.h"
    secret_file.write_text(f"{SECRET} is not C++\n")
    cpp_source = f'#include "{secret_file}"\nint main() {{}}\n'

    result = measure_speedup("print(1)", cpp_source)

    assert not result.compiled
    assert SECRET not in (result.error or "")
    assert "No such file or directory" in result.error


def test_program_cannot_write_outside_its_scratch_directory(tmp_path):
    target = tmp_path / "written-by-the-program"
    cpp_source = r"""
#include <cstdio>
#include <string>
static int writes(const std::string &path) {
    std::FILE *file = std::fopen(path.c_str(), "w");
    if (!file) return 0;
    std::fputs("x", file);
    return std::fclose(file) == 0;
}
int main() {
    char path[4096];
    if (std::scanf("%4095s", path) != 1) return 1;
    // The private scratch directory is writable; the caller's files and the source are not.
    std::printf("%d %d %d\n", writes("scratch.txt"), writes(path), writes("/src/main.cpp"));
}
"""
    result = measure_speedup("print(1, 0, 0)", cpp_source, stdin=f"{target}\n")

    assert result.correct, result.error
    assert not target.exists()


def test_program_cannot_reach_the_network():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    cpp_source = r"""
#include <arpa/inet.h>
#include <cstdio>
#include <netinet/in.h>
#include <sys/socket.h>
int main() {
    int port;
    if (std::scanf("%d", &port) != 1) return 1;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(port);
    address.sin_addr.s_addr = inet_addr("127.0.0.1");
    std::printf("%s\n", connect(fd, (sockaddr *)&address, sizeof address) == 0 ? "reached" : "no");
}
"""
    try:
        result = measure_speedup("print('no')", cpp_source, stdin=f"{port}\n")
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()

    assert result.correct, result.error


def _processes_running(marker: str, *, kill: bool = False) -> list[str]:
    """Command lines of the live processes whose command line holds ``marker``; kill them."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in command and state != "Z":
            found.append(command)
            if kill:
                os.kill(int(entry.name), signal.SIGKILL)
    return found


# The translation may start no process; the reference may, so it plays the daemon-maker here.
# The daemon leaves the session, and the reference ends only once the daemon's exec succeeded.
DAEMON_PY = """\
import os
read_end, write_end = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.close(read_end)
        os.set_inheritable(write_end, False)
        os.execv("/bin/sleep", ["sleep", "%MARKER%"])
    os._exit(0)
os.close(write_end)
os.read(read_end, 1)
print(1)
"""
PRINTS_1_CPP = '#include <cstdio>\nint main() { std::puts("1"); }\n'


def test_no_daemon_outlives_the_call():
    marker = "4321.5"
    result = measure_speedup(DAEMON_PY.replace("%MARKER%", marker), PRINTS_1_CPP)

    assert result.correct, result.error
    assert _processes_running(f"sleep {marker}", kill=True) == []


def test_sandbox_dies_with_the_trainer():
    marker = "4322.5"
    python_source = DAEMON_PY.replace("%MARKER%", marker).replace(
        "print(1)", "import time\ntime.sleep(600)"
    )
    script = (
        "from lossplug.kpi.speedup import measure_speedup\n"
        f"measure_speedup({python_source!r}, {PRINTS_1_CPP!r}, timeout_s=60)\n"
    )
    trainer = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not _processes_running(f"sleep {marker}"):
            assert trainer.poll() is None and time.monotonic() < deadline, "never started"
            time.sleep(0.05)
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    deadline = time.monotonic() + 5
    while _processes_running(f"sleep {marker}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_running(f"sleep {marker}", kill=True) == []
    # What the killed trainer could not clean up goes when the next sandbox is built.
    from lossplug.kpi.sandbox.launcher import sweep_leftovers

    left = list(Path(tempfile.gettempdir()).glob(f"lossplug-*-{trainer.pid}-*"))
    assert left, "the trainer made its directories with its pid in their names"
    sweep_leftovers()
    assert not any(path.exists() for path in left)


def test_thread_storm_stops_at_the_process_limit():
    # Threads count against the process limit too; the translation may start threads only.
    cpp_source = r"""
#include <cstdio>
#include <pthread.h>
#include <unistd.h>
static void *wait_forever(void *) { for (;;) pause(); }
int main() {
    int started = 0;
    while (started < 1000) {
        pthread_t thread;
        if (pthread_create(&thread, nullptr, wait_forever, nullptr) != 0) break;
        ++started;
    }
    std::printf("%s\n", started < 100 ? "limited" : "unlimited");
    std::fflush(stdout);
    _exit(0);
}
"""
    result = measure_speedup("print('limited')", cpp_source)

    assert result.correct, result.error


# Each macro level multiplies the string by ten: the preprocessor alone needs many GiB.
MACRO_BOMB_CPP = (
    '#define A "'
    + "x" * 80
    + '"\n'
    + "".join(
        f"#define {b} {a} {a} {a} {a} {a} {a} {a} {a} {a} {a}\n"
        for a, b in zip("ABCDEFG", "BCDEFGH", strict=True)
    )
    + "const char *s = H;\nint main() { return s[0]; }\n"
)

# gcc evaluates 4e10 constexpr steps before it gives up: minutes of compiling.
SLOW_TO_COMPILE_CPP = r"""
constexpr long long spin() {
    long long total = 0;
    for (long long i = 0; i < 200000; ++i)
        for (long long j = 0; j < 200000; ++j) total += i ^ j;
    return total;
}
constexpr long long value = spin();
int main() { return value == 0; }
"""


def test_compiler_memory_is_limited():
    start = time.perf_counter()
    result = measure_speedup("print(1)", MACRO_BOMB_CPP, compile_memory_mb=256, timeout_s=30)

    assert time.perf_counter() - start < 20
    assert not result.compiled
    assert result.error.startswith("compile error: compiler memory limit exceeded (256 MiB)")


def test_compiler_time_is_limited():
    start = time.perf_counter()
    result = measure_speedup("print(1)", SLOW_TO_COMPILE_CPP, timeout_s=2)

    assert time.perf_counter() - start < 8
    assert not result.compiled
    assert result.error == "compile error: compiler timed out after 2.0 s"


def test_cpu_time_counts_the_work_of_threads():
    n = 20_000_000
    reference, stdin = busy_reference(n), f"{n}\n"
    direct = measure_speedup(reference, BUSY_CPP, stdin=stdin, timeout_s=30)
    threaded = measure_speedup(
        reference, "#define IN_A_THREAD\n" + BUSY_CPP, stdin=stdin, timeout_s=30
    )

    assert direct.correct and threaded.correct, (direct.error, threaded.error)
    # Only the worker thread computes: its time is the program's.
    assert threaded.cpp_seconds > 0.7 * direct.cpp_seconds


def test_no_silent_fallback_when_no_sandbox_can_be_built(monkeypatch):
    import lossplug.kpi.sandbox.bwrap as bwrap

    monkeypatch.setattr(bwrap, "_SANDBOXES", {})
    monkeypatch.setattr(bwrap, "_find_bwraps", list)

    with pytest.raises(SandboxUnavailableError, match=r"no bubblewrap.*sandbox='none'"):
        measure_speedup("print(1)", "int main() {}")
    # The explicit opt-out runs, and says so.
    assert measure_speedup("print(1)", "int main() {}", sandbox="none").isolation == "none"
    monkeypatch.setenv("LOSSPLUG_SANDBOX", "none")
    assert measure_speedup("print(1)", "int main() {}").isolation == "none"


@pytest.mark.parametrize(
    ("sandbox", "env", "error", "pattern"),
    [
        ("docker", None, ValueError, r"sandbox must be one of bwrap, none, got 'docker'"),
        (True, None, TypeError, r"sandbox must be a str or None, got bool"),
        (None, "off", ValueError, r"\$LOSSPLUG_SANDBOX must be one of bwrap, none, got 'off'"),
    ],
)
def test_bad_sandbox_choice(monkeypatch, sandbox, env, error, pattern):
    if env is not None:
        monkeypatch.setenv("LOSSPLUG_SANDBOX", env)
    with pytest.raises(error, match=pattern):
        measure_speedup("print(1)", "int main() {}", sandbox=sandbox)


def test_code_speedup_runs_its_samples_in_the_sandbox():
    from lossplug.kpi import KPIContext
    from lossplug.kpi.builtin import CodeSpeedup

    kpi = CodeSpeedup(
        [("print(input())", "1 /nowhere\n")],
        lambda ctx, source: READ_SECRETS_CPP,
        program_timeout_s=5,
        repeats=1,
    )
    result = kpi.fn(KPIContext(step=1))

    assert kpi.sandbox == "bwrap"
    assert [row["isolation"] for row in result.samples] == ["bwrap"]


def test_code_speedup_refuses_at_construction_when_no_sandbox_can_be_built(monkeypatch):
    import lossplug.kpi.sandbox.bwrap as bwrap
    from lossplug.kpi.builtin import CodeSpeedup

    monkeypatch.setattr(bwrap, "_SANDBOXES", {})
    monkeypatch.setattr(bwrap, "_find_bwraps", list)

    with pytest.raises(SandboxUnavailableError, match=r"LOSSPLUG_SANDBOX=none"):
        CodeSpeedup([("print(1)", "1\n")], lambda ctx, source: "int main() {}")
    assert CodeSpeedup([("print(1)", "1\n")], lambda ctx, s: "", sandbox="none").sandbox == "none"


def test_a_bwrap_that_cannot_build_the_sandbox_gives_way_to_the_next(monkeypatch, tmp_path):
    import lossplug.kpi.sandbox.bwrap as bwrap

    working = bwrap._find_bwraps()[-1]
    # An old or crippled bwrap (a distribution's, found first on PATH) that cannot run anything.
    broken = tmp_path / "bwrap"
    broken.write_text(
        "#!/bin/sh\n"
        '[ "$1" = --help ] && echo "--size --disable-userns" && exit 0\n'
        "echo 'bwrap: Creating new namespace failed' >&2\nexit 1\n"
    )
    broken.chmod(0o755)
    monkeypatch.setattr(bwrap, "_SANDBOXES", {})
    monkeypatch.setattr(bwrap, "_find_bwraps", lambda: [str(broken), working])

    result = measure_speedup("print(1)", '#include <cstdio>\nint main() { puts("1"); }')

    assert result.correct and result.isolation == "bwrap", result.error
    assert bwrap.Sandbox.get(["g++"]).bwrap == working

    monkeypatch.setattr(bwrap, "_SANDBOXES", {})
    monkeypatch.setattr(bwrap, "_find_bwraps", lambda: [str(broken)])
    with pytest.raises(SandboxUnavailableError, match=r"Creating new namespace failed.*=none"):
        measure_speedup("print(1)", "int main() {}")
