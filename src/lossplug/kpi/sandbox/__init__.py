"""Running untrusted programs: the code a model wrote, its compiler and its reference.

Every such program runs in a :class:`Sandbox`, one per step, where it sees only what the step
needs and every resource it can pin is bounded and counted; running without one takes an explicit
``sandbox="none"``. :func:`lossplug.kpi.speedup.measure_speedup` is built on this package.

The modules, from the call down:

- :mod:`~lossplug.kpi.sandbox.steps`: the steps of one measurement (compile, run the reference,
  run the binary), what each sees, and why a run failed, in one line;
- :mod:`~lossplug.kpi.sandbox.bwrap`: the :class:`Sandbox` (bubblewrap), built once per process,
  and the :class:`View` of one step;
- :mod:`~lossplug.kpi.sandbox.launcher` and ``launcher.c``: PID 1 of every sandbox, which applies
  the limits and the seccomp filter, ends whatever the program left behind and reports its CPU
  and wall time;
- :mod:`~lossplug.kpi.sandbox.process`: one child process with a wall-clock limit and bounded
  output; :mod:`~lossplug.kpi.sandbox.limits`: the resource limits, with or without a sandbox;
- :mod:`~lossplug.kpi.sandbox.cgroup`: a memory cgroup per sandbox, where one can be made;
  :mod:`~lossplug.kpi.sandbox.identity`: the uids a root caller's sandboxes run as;
  :mod:`~lossplug.kpi.sandbox.elf`: the shared libraries a binary needs, read without running it;
- :mod:`~lossplug.kpi.sandbox.output`: comparing and quoting outputs within bounded memory;
- :mod:`~lossplug.kpi.sandbox.choice`: the isolation asked for, and
  :class:`SandboxUnavailableError`.
"""

from lossplug.kpi.sandbox.bwrap import Sandbox, View, check_installation
from lossplug.kpi.sandbox.choice import SANDBOX_ENV, SandboxUnavailableError, resolve_sandbox
from lossplug.kpi.sandbox.limits import resource
from lossplug.kpi.sandbox.output import compare, normalise, shorten
from lossplug.kpi.sandbox.process import Run
from lossplug.kpi.sandbox.steps import (
    StepLimits,
    Steps,
    check_toolchain,
    find_compiler,
    python_interpreter,
    run_problem,
)

__all__ = [
    "SANDBOX_ENV",
    "Run",
    "Sandbox",
    "SandboxUnavailableError",
    "StepLimits",
    "Steps",
    "View",
    "check_installation",
    "check_toolchain",
    "compare",
    "find_compiler",
    "normalise",
    "python_interpreter",
    "resolve_sandbox",
    "resource",
    "run_problem",
    "shorten",
]
