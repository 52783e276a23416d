"""Keep a KPI call out of the run it measures: random streams, module modes, late calls.

A KPI runs between two training steps. Whatever it samples, reseeds or switches must not reach
training: the random streams (Python's ``random``, NumPy's global one, torch's CPU and CUDA
generators) and every module's ``training`` flag are put back as they were once the call has
ended, so that training goes on exactly as if the KPI never ran. A call past its time limit is
stopped at its next call into a module (every step of ``generate`` is one) by a global forward
pre-hook that raises :class:`KPICancelled` in that call's thread only; the hook is installed
only while a KPI thread is alive, so training pays nothing for it otherwise.

Framework-free: plain PyTorch and the standard library (NumPy only when already imported).
"""

from __future__ import annotations

import _thread
import random
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.utils.hooks import RemovableHandle

__all__ = [
    "STOP_GRACE_S",
    "KPICancelled",
    "KPIThread",
    "ModuleModes",
    "RandomStreams",
    "isolated",
    "stop_hook_installed",
]

#: How long training waits, after a KPI call ran past its time limit and was cancelled, for the
#: call to reach its next module call and end. Training resumes only then, so that the call never
#: uses the model while training changes it; a call still running after this (one that never
#: calls the model, such as a pure-Python loop) is warned about and left running.
STOP_GRACE_S = 10.0


class KPICancelled(BaseException):
    """Raised in a KPI's worker thread at its next module call once it is past its time limit.

    A ``BaseException``, as ``KeyboardInterrupt`` is, so that a KPI's ``except Exception`` does
    not swallow it; a KPI that catches it anyway gets it again at its next module call, since
    its thread stays cancelled until it ends.
    """


@dataclass
class RandomStreams:
    """The global random streams training draws from, saved to be put back exactly.

    Attributes:
        python: the state of Python's ``random`` module.
        numpy: the state of NumPy's global ``np.random``, or ``None`` when ``numpy.random`` was
            never imported (nothing drew from it then).
        torch_cpu: torch's default CPU generator state.
        cuda: the state of every CUDA device's default generator, or ``None`` when CUDA is not
            initialised (its generators were never used).
    """

    python: Any
    numpy: Any
    torch_cpu: torch.Tensor
    cuda: list[torch.Tensor] | None

    @classmethod
    def save(cls) -> RandomStreams:
        """The streams as they are now."""
        np_random = sys.modules.get("numpy.random")
        return cls(
            python=random.getstate(),
            numpy=np_random.get_state() if np_random is not None else None,
            torch_cpu=torch.get_rng_state(),
            # reading the states of an uninitialised CUDA would initialise it
            cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        )

    def restore(self) -> None:
        """Put every saved stream back where it was."""
        random.setstate(self.python)
        if self.numpy is not None:
            sys.modules["numpy.random"].set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class ModuleModes:
    """Every module's own ``training`` flag, saved to be put back exactly.

    ``model.train()`` would also switch on the submodules the user keeps in eval mode (a frozen
    encoder, a teacher): each module gets its own flag back instead, set directly, so that no
    overridden ``train()`` runs either.

    Args:
        model: the module whose flags (its own and every submodule's) to save.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._flags = [(module, module.training) for module in model.modules()]

    def restore(self) -> None:
        """Give every module the flag it had when saved."""
        for module, training in self._flags:
            module.training = training


@contextmanager
def isolated(model: torch.nn.Module | None = None) -> Iterator[None]:
    """Run the body as if it never happened, for training's random streams and module modes.

    The streams are saved on entry and put back on exit; ``model`` (when given) is put in eval
    mode for the body and every one of its modules gets its own flag back on exit. Leave the
    body only once the KPI call has ended (or can no longer call the model), so that nothing
    it does afterwards reaches training.

    Args:
        model: the model the KPI uses, or ``None`` when it does not use one.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
        >>> model[1].eval()  # doctest: +ELLIPSIS
        Dropout(...)
        >>> before = torch.get_rng_state()
        >>> with isolated(model):
        ...     _ = torch.randn(3)
        ...     model.training
        False
        >>> torch.equal(torch.get_rng_state(), before), model.training, model[1].training
        (True, True, False)
    """
    streams = RandomStreams.save()
    modes = ModuleModes(model) if model is not None else None
    try:
        if model is not None:
            model.eval()
        yield
    finally:
        if modes is not None:
            modes.restore()
        streams.restore()


# ------------------------------------------------------------------------------ stopping calls
# The KPI threads alive now, the idents of those cancelled, and the hook that stops them. The
# lock makes "a thread ends" and "a thread is cancelled" exclusive, so that the ident of an
# ended thread, which the OS may give a new thread, never stays in the cancelled set.
_lock = threading.Lock()
_live: set[KPIThread] = set()
_cancelled: dict[int, KPIThread] = {}
_hook: RemovableHandle | None = None


def _stop_cancelled(module: torch.nn.Module, args: Any, _ident: Any = threading.get_ident) -> None:
    """The global forward pre-hook: stop a cancelled KPI thread at its module call."""
    # every module call of every thread comes here while the hook is installed: an empty-dict
    # test first, then one lookup
    call = _cancelled.get(_ident()) if _cancelled else None
    if call is not None:
        if call.told:
            # it caught the KPICancelled of its last model call and called the model again: held
            # here for good, it can no longer use the model, the CPU or the random streams, nor
            # be inside torch's C++ code when the interpreter exits
            call._hold()
        call.told = True
        raise KPICancelled(
            f"this KPI call ran past its time limit and is stopped at its call to "
            f"{type(module).__name__}"
        )


def stop_hook_installed() -> bool:
    """Whether the hook that stops late KPI calls is installed (only while a KPI thread lives)."""
    return _hook is not None


class KPIThread:
    """A KPI call on a worker thread, which can be stopped at its next module call.

    Starting it installs the global forward pre-hook (if not already there); the last KPI
    thread to end removes it, whether it ended by itself or was stopped. Like a daemon thread,
    it never keeps the interpreter from exiting.

    Args:
        fn: the call, with no arguments; what it returns is kept in :attr:`returned`, what it
            raises in :attr:`error`.
        name: the thread's name.

    Example:
        >>> call = KPIThread(lambda: 6 * 7, name="kpi-answer")
        >>> call.wait(5.0), call.returned, stop_hook_installed()
        (True, 42, False)
    """

    def __init__(self, fn: Callable[[], Any], *, name: str) -> None:
        self.returned: Any = None
        self.error: BaseException | None = None
        self.name = name
        self._fn = fn
        self._ended = False
        self._done = threading.Event()  # the call has ended
        self._halted = threading.Event()  # the call has ended, or is held for good
        #: whether :meth:`cancel` was called: the call ran past its time limit
        self.cancelled = False
        #: whether the thread got its KPICancelled (at its first model call once cancelled)
        self.told = False
        #: whether the thread is held for good in the hook (it swallowed its KPICancelled)
        self.held = False
        self.ident: int | None = None
        global _hook
        with _lock:
            _live.add(self)
            if _hook is None:
                _hook = register_module_forward_pre_hook(_stop_cancelled)
        try:
            # threading.Thread.start waits for the new thread to be scheduled: one more hand-over
            # between threads per call, a millisecond on a machine whose cores training keeps
            # busy, on top of the one that tells the caller the call has ended
            with _lock:
                self.ident = _thread.start_new_thread(self._run, ())
        except BaseException:
            self._end()
            raise

    def is_alive(self) -> bool:
        return not self._done.is_set()

    def join(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds (forever for ``None``) for the call to end."""
        self._done.wait(timeout)

    def wait(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds for the call to end; return whether it did."""
        return self._done.wait(timeout)

    def cancel(self) -> None:
        """Make the thread's next module call (and every later one) raise :class:`KPICancelled`."""
        self.cancelled = True
        with _lock:
            if not self._ended and self.ident is not None:
                _cancelled[self.ident] = self

    def stop(self, grace: float) -> bool:
        """Cancel the call and wait up to ``grace`` seconds for it to end or be held for good at
        its next model call; return whether it is stopped."""
        self.cancel()
        return self._halted.wait(grace)

    @property
    def stopped(self) -> bool:
        """The call has ended, or is held for good and will never run again."""
        return self._halted.is_set()

    def _hold(self) -> None:
        """Hold the calling thread (this call's) forever, out of every KPI bookkeeping."""
        global _hook
        with _lock:
            self.held = True
            _live.discard(self)
            _cancelled.pop(self.ident, None)
            if not _live and _hook is not None:
                _hook.remove()
                _hook = None
        self._halted.set()
        threading.Event().wait()  # never set: the thread stays here until the process ends

    def _run(self) -> None:
        with _lock:  # the ident is known once the starting thread has stored it
            pass
        try:
            self.returned = self._fn()
        except BaseException as exc:  # the caller reads it, on its own thread
            self.error = exc
        finally:
            self._end()

    def _end(self) -> None:
        global _hook
        with _lock:
            self._ended = True
            _live.discard(self)
            if self.ident is not None:
                _cancelled.pop(self.ident, None)
            if not _live and _hook is not None:
                _hook.remove()
                _hook = None
        self._done.set()
        self._halted.set()
