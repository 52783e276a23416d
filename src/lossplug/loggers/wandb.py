"""A Lightning ``WandbLogger`` that works with or without a W&B account.

Online when the user is logged in, offline otherwise (a real run on disk that ``wandb sync``
uploads later), ``WANDB_MODE`` winning when set. Whether the user is logged in is decided from
local files and environment variables only, the way wandb itself finds an API key
(``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, then the netrc entry for the W&B host);
nothing here touches the network.

Also what lossplug's callbacks write to a run beyond plain values: the KPI descriptions in its
config (:func:`write_kpi_config`) and the table and scatter plots that link perplexity to the
outcome KPIs (:func:`log_link_table`).
"""

from __future__ import annotations

import importlib
import netrc
import os
import secrets
import string
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

__all__ = [
    "KPI_CONFIG_KEY",
    "LINK_TABLE_KEY",
    "ModeChoice",
    "RunLocation",
    "api_key_source",
    "define_metric",
    "describe_run",
    "log_link_table",
    "resolve_mode",
    "wandb_logger",
    "write_kpi_config",
]

#: The run config entry that describes the run's KPIs (``KPISession.describe()``).
KPI_CONFIG_KEY = "lossplug_kpis"
#: The key of the table linking the model-centric value to the outcome KPIs; each KPI's scatter
#: plot is logged under ``link/<kpi key>``.
LINK_TABLE_KEY = "link/table"

_DEFAULT_BASE_URL = "https://api.wandb.ai"
# What wandb's settings accept for WANDB_MODE, mapped to the mode it means.
_MODES = {
    "online": "online",
    "run": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
    "shared": "shared",
}
_NAMESPACES = {
    "lightning": "lightning.pytorch",
    "lightning.pytorch": "lightning.pytorch",
    "pytorch_lightning": "pytorch_lightning",
}
# Characters W&B refuses in project names.
_BAD_PROJECT_CHARS = set("/\\#?%:")
_ID_ALPHABET = string.ascii_lowercase + string.digits


class ModeChoice(NamedTuple):
    """The W&B mode a run will use and why, in words fit for the user.

    Attributes:
        mode: ``"online"``, ``"offline"``, ``"disabled"`` or ``"shared"``.
        reason: Why, e.g. ``"not logged in: no WANDB_API_KEY, no key for api.wandb.ai in
            ~/.netrc"``.
    """

    mode: str
    reason: str


@dataclass(frozen=True)
class RunLocation:
    """Where a started run writes, and how to upload it if it is offline.

    Attributes:
        mode: The run's W&B mode (``"online"``, ``"offline"``, ``"disabled"``, …), or
            ``"not started"`` when the logger has not created its run yet.
        run_id: The run id, when known.
        run_dir: The run folder (``.../wandb/offline-run-<time>-<id>``), when there is one.
        sync_command: ``wandb sync <run_dir>`` for an offline run, else ``None``.
        url: The run's web page for an online run, else ``None``.
    """

    mode: str
    run_id: str | None = None
    run_dir: Path | None = None
    sync_command: str | None = None
    url: str | None = None

    def __str__(self) -> str:
        if self.mode == "offline":
            return f"W&B offline run in {self.run_dir}; upload with: {self.sync_command}"
        if self.mode == "disabled":
            return "W&B disabled: nothing was logged"
        if self.mode == "not started":
            return "W&B run not started yet"
        where = f" at {self.url}" if self.url else ""
        local = f" (local copy in {self.run_dir})" if self.run_dir else ""
        return f"W&B {self.mode} run{where}{local}"


def api_key_source(
    env: Mapping[str, str] | None = None, netrc_path: str | os.PathLike[str] | None = None
) -> str | None:
    """Where a W&B API key would be found, or ``None`` when the user is not logged in.

    Looks, in wandb's order, at ``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE`` and the netrc
    entry for the W&B host (``WANDB_BASE_URL``, default ``https://api.wandb.ai``). Reads no key
    over the network and never returns the key itself. A host set only in wandb's settings
    file (not in ``WANDB_BASE_URL``) is not looked at.

    Args:
        env: Environment variables to consult; ``None`` for ``os.environ``.
        netrc_path: The netrc file; ``None`` for ``$NETRC``, else ``~/.netrc`` or ``~/_netrc``
            (home taken from ``env``'s ``HOME``/``USERPROFILE`` when given).

    Returns:
        A description of the source, e.g. ``"WANDB_API_KEY"`` or ``"/home/me/.netrc"``.

    Example:
        >>> api_key_source({"WANDB_API_KEY": "x" * 40}, netrc_path="/nonexistent")
        'WANDB_API_KEY'
        >>> api_key_source({}, netrc_path="/nonexistent") is None
        True
    """
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY", "").strip():
        return "WANDB_API_KEY"
    if env.get("WANDB_IDENTITY_TOKEN_FILE", "").strip():
        return "WANDB_IDENTITY_TOKEN_FILE"
    path = _netrc_path(env, netrc_path)
    try:
        entry = netrc.netrc(os.fspath(path)).authenticators(_host(env))
    except (OSError, netrc.NetrcParseError):
        # Unreadable or malformed: wandb itself then carries on as if no key were there.
        return None
    if entry and entry[2]:
        return os.fspath(path)
    return None


def resolve_mode(
    offline: bool | None = None,
    *,
    env: Mapping[str, str] | None = None,
    netrc_path: str | os.PathLike[str] | None = None,
) -> ModeChoice:
    """Decide the W&B mode: ``WANDB_MODE`` if set, else ``offline``, else whether logged in.

    ``WANDB_MODE`` (``online``/``offline``/``disabled``, or wandb's aliases ``run``, ``dryrun``,
    ``shared``) wins over everything, the ``offline`` argument included, so that one script runs
    unchanged in CI (``WANDB_MODE=disabled``) and on a laptop. Without it, ``offline=True`` or
    ``False`` decides; with ``offline=None`` the run is online when an API key is found
    (:func:`api_key_source`) and offline otherwise. Pure: reads only ``env`` and the netrc file.

    Args:
        offline: Force offline (``True``) or online (``False``); ``None`` to detect.
        env: Environment variables; ``None`` for ``os.environ``.
        netrc_path: The netrc file to look in; see :func:`api_key_source`.

    Returns:
        The mode and the reason for it.

    Raises:
        ValueError: ``WANDB_MODE`` holds something that is not a W&B mode.
        TypeError: ``offline`` is not a bool or ``None``.

    Example:
        >>> resolve_mode(env={}, netrc_path="/nonexistent").mode
        'offline'
        >>> resolve_mode(env={"WANDB_API_KEY": "k" * 40}).mode
        'online'
        >>> resolve_mode(offline=False, env={"WANDB_MODE": "disabled"})
        ModeChoice(mode='disabled', reason='WANDB_MODE=disabled is set (overrides offline=False)')
    """
    if offline is not None and not isinstance(offline, bool):
        raise TypeError(f"offline must be True, False or None, got {offline!r}")
    env = os.environ if env is None else env
    raw = env.get("WANDB_MODE")
    if raw is not None and not raw.strip():
        # wandb.init itself fails on an empty WANDB_MODE, whatever mode it is given.
        raise ValueError("WANDB_MODE is set but empty: unset it, or use online, offline, disabled")
    if raw is not None:
        raw = raw.strip()
        mode = _MODES.get(raw.lower())
        if mode is None:
            raise ValueError(
                f"WANDB_MODE={raw!r} is not a W&B mode: use online, offline or disabled"
            )
        reason = f"WANDB_MODE={raw} is set"
        wanted = None if offline is None else ("offline" if offline else "online")
        if wanted is not None and wanted != ("online" if mode == "shared" else mode):
            reason += f" (overrides offline={offline})"
        return ModeChoice(mode, reason)
    if offline is True:
        return ModeChoice("offline", "offline=True")
    source = api_key_source(env, netrc_path)
    if offline is False:
        if source is None:
            return ModeChoice("online", "offline=False; no API key found: wandb will ask for one")
        return ModeChoice("online", f"offline=False; API key from {source}")
    if source is not None:
        return ModeChoice("online", f"logged in: API key from {source}")
    netrc_file = _netrc_path(env, netrc_path)
    return ModeChoice(
        "offline", f"not logged in: no WANDB_API_KEY, no key for {_host(env)} in {netrc_file}"
    )


def wandb_logger(
    project: str | None = None,
    *,
    offline: bool | None = None,
    save_dir: str | os.PathLike[str] = ".",
    namespace: str | None = None,
    verbose: bool = True,
    **kwargs: Any,
) -> Any:
    """A Lightning ``WandbLogger``, online when logged in to W&B and offline otherwise.

    The mode comes from :func:`resolve_mode`: ``WANDB_MODE`` if set, else ``offline`` if given,
    else online exactly when an API key is found locally (no network call). An offline run is a
    real run under ``<save_dir>/wandb/offline-run-<time>-<id>/`` that ``wandb sync`` uploads
    later and :func:`lossplug.loggers.read_run` reads back. One line on stderr (rank 0 only)
    says which mode and why; after training, :func:`describe_run` gives the run folder and the
    sync command.

    Unlike ``WandbLogger(offline=True)``, the mode is passed to ``wandb.init`` and the process
    environment is left alone (Lightning sets ``WANDB_MODE`` for the whole process).

    Args:
        project: W&B project; ``None`` for ``$WANDB_PROJECT``, else Lightning's
            ``"lightning_logs"``.
        offline: ``True``/``False`` to force the mode, ``None`` to detect it.
        save_dir: Folder that receives ``wandb/``; created if missing.
        namespace: ``"lightning"`` for ``lightning.pytorch.loggers.WandbLogger`` or
            ``"pytorch_lightning"`` for ``pytorch_lightning.loggers.WandbLogger`` (each Trainer
            accepts only its own); ``None`` for ``lightning`` when importable, else
            ``pytorch_lightning``.
        verbose: Print the one-line mode message.
        **kwargs: Passed on to ``WandbLogger`` and from there to ``wandb.init`` (``name``,
            ``config``, ``tags``, ``id``, ``log_model``, …). A run id is generated when neither
            ``id``/``version`` nor ``$WANDB_RUN_ID`` gives one, so the message can name the
            run folder before the run starts.

    Returns:
        A ``WandbLogger`` of the chosen namespace, its run not yet started.

    Raises:
        ValueError: A bad ``project``, ``save_dir``, ``namespace`` or ``WANDB_MODE``; ``mode``
            or ``dir`` in ``kwargs``; ``log_model`` with an offline run.
        TypeError: An argument of the wrong type.
        ImportError: The requested Lightning namespace is not installed.

    Example:
        Log to W&B whether or not the user has an account::

            from lightning.pytorch import Trainer
            from lossplug.loggers import describe_run, wandb_logger

            logger = wandb_logger("my-finetune", save_dir="runs")
            Trainer(logger=logger, max_steps=100).fit(model, data)
            print(describe_run(logger))  # folder and `wandb sync` command when offline
    """
    if project is not None:
        _check_project(project)
    if not isinstance(save_dir, (str, os.PathLike)):
        raise TypeError(f"save_dir must be a str or path, got {type(save_dir).__name__}")
    if not isinstance(verbose, bool):
        raise TypeError(f"verbose must be True or False, got {verbose!r}")
    for key, hint in (("mode", "offline=True/False or WANDB_MODE"), ("dir", "save_dir")):
        if key in kwargs:
            raise ValueError(f"pass {hint} instead of {key}={kwargs[key]!r}")
    choice = resolve_mode(offline)
    if kwargs.get("log_model") and choice.mode == "offline":
        raise ValueError(
            f"log_model={kwargs['log_model']!r} needs an online run, but this run is offline "
            f"({choice.reason}); log in with `wandb login`, or pass log_model=False"
        )
    logger_cls = _logger_class(namespace)
    save_path = Path(save_dir)
    if save_path.exists() and not save_path.is_dir():
        raise ValueError(f"save_dir={os.fspath(save_dir)!r} is a file, not a folder")
    save_path.mkdir(parents=True, exist_ok=True)

    run_id = kwargs.get("id") or kwargs.get("version") or os.environ.get("WANDB_RUN_ID")
    if run_id is None:
        run_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))
        kwargs["id"] = run_id
    logger = logger_cls(project=project, save_dir=os.fspath(save_dir), mode=choice.mode, **kwargs)
    init_args = getattr(logger, "_wandb_init", None)
    if isinstance(init_args, dict) and "anonymous" in init_args and init_args["anonymous"] is None:
        # Lightning always passes anonymous=None, and wandb >= 0.19 warns about the mere key.
        del init_args["anonymous"]
    if verbose and _is_rank_zero():
        print(_mode_line(choice, save_path, run_id, logger.name), file=sys.stderr, flush=True)
    return logger


def describe_run(logger_or_run: Any) -> RunLocation:
    """Where a ``WandbLogger``'s (or a ``wandb`` run's) files are, and how to upload them.

    Never starts a run: for a logger whose experiment has not been created yet the result says
    ``mode="not started"``.

    Args:
        logger_or_run: A ``WandbLogger`` of either Lightning namespace, or a ``wandb`` run.

    Returns:
        A :class:`RunLocation`; ``str()`` of it is a one-line summary for the user.

    Raises:
        TypeError: The object is neither a ``WandbLogger`` nor a ``wandb`` run.

    Example:
        At the end of training::

            info = describe_run(trainer.logger)
            print(info)  # W&B offline run in runs/wandb/offline-run-...; upload with: ...
    """
    run = logger_or_run
    if hasattr(logger_or_run, "_wandb_init"):  # a WandbLogger; its .experiment would start a run
        run = logger_or_run._experiment
        if run is None:
            return RunLocation(mode="not started", run_id=logger_or_run._wandb_init.get("id"))
    settings = getattr(run, "settings", None)
    if settings is None or not hasattr(settings, "mode"):
        raise TypeError(
            f"describe_run needs a WandbLogger or a wandb run, got {type(logger_or_run).__name__}"
        )
    mode = _MODES.get(settings.mode, settings.mode)
    run_id = getattr(run, "id", None)
    if mode == "disabled":
        return RunLocation(mode=mode, run_id=run_id)
    run_dir = Path(settings.sync_dir) if getattr(settings, "sync_dir", None) else None
    sync = f"wandb sync {run_dir}" if mode == "offline" and run_dir is not None else None
    url = getattr(run, "url", None) if mode != "offline" else None
    return RunLocation(mode=mode, run_id=run_id, run_dir=run_dir, sync_command=sync, url=url)


def define_metric(run: Any, key: str, *, summary: str | None, step_key: str) -> None:
    """Declare ``key`` on ``run``: plotted against ``step_key``, summarised by ``summary``.

    Args:
        run: a ``wandb`` run.
        key: the logged key; a ``"."`` in it is escaped, since W&B reads an unescaped one as
            nesting (the summary of ``kpi/pass.rate`` would be asked of a ``rate`` inside
            ``kpi/pass``, and never computed).
        summary: ``"min"``, ``"max"``, ``"last"``, or ``None`` for W&B's default.
        step_key: the trainer's x-axis (``trainer/global_step``, ``train/global_step``).
    """
    kwargs = {"summary": summary} if summary else {}
    run.define_metric(key.replace(".", "\\."), step_metric=step_key, **kwargs)


def write_kpi_config(run: Any, description: Mapping[str, Any], *, writer: str = "lossplug") -> bool:
    """Put the run's KPI descriptions in its config, under :data:`KPI_CONFIG_KEY`.

    What each KPI is (direction, target, unit, whether it measures the model's outcome) then
    travels with the run, for ``lossplug report`` and for anyone reading it on W&B. Written
    again over an earlier value (a resumed run, a KPI given a new target). A failure is warned
    about and never raised: the config is lost, not the run.

    Args:
        run: a ``wandb`` run; ``None`` or a disabled run is skipped.
        description: ``{kpi key: KPI.describe()}``, as ``KPISession.describe()`` gives it.
        writer: who writes it, named in the warning.

    Returns:
        Whether the config was written.

    Example:
        >>> write_kpi_config(None, {"kpi/pass_rate": {"target": 0.8}})
        False
    """
    if not _is_live(run):
        return False
    try:
        run.config.update({KPI_CONFIG_KEY: dict(description)}, allow_val_change=True)
    except Exception as exc:
        warnings.warn(
            f"{writer}: the KPI descriptions could not be written into the W&B run's config "
            f"({type(exc).__name__}: {exc}); training goes on",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def log_link_table(
    run: Any,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    kpi_keys: Sequence[str],
    step: int,
    *,
    x_key: str = "val/perplexity",
    step_key: str = "trainer/global_step",
) -> bool:
    """Log the link between a model-centric value and the KPIs: one table, one scatter per KPI.

    In one ``run.log`` row, at ``step`` on the trainer's x-axis: a ``wandb.Table`` under
    :data:`LINK_TABLE_KEY` (``link/table``), and for each KPI key a
    ``wandb.plot.scatter(table, x_key, key, title="<key> vs <x_key>")`` under
    ``link/<key>`` (its own copy of the table goes under ``link/<key>_table``, as W&B
    writes a custom chart). The step goes in the row as ``step_key``, never as ``step=``,
    which would drop rows whose step goes back.

    Args:
        run: a ``wandb`` run; ``None`` or a disabled run is skipped.
        columns: ``step``, ``x_key``, then the KPI keys.
        rows: one row per evaluation, as ``columns`` names its cells.
        kpi_keys: the KPI keys to plot against ``x_key`` (columns of the table).
        step: the trainer's step the row is logged at.
        x_key: the column on the scatter plots' x-axis.
        step_key: the trainer's x-axis: ``trainer/global_step`` (Lightning) or
            ``train/global_step`` (``transformers.Trainer``).

    Returns:
        Whether the row was logged.

    Raises:
        ValueError: ``x_key`` or a KPI key is not a column.

    Example:
        After an evaluation::

            log_link_table(
                run,
                ["step", "val/perplexity", "kpi/pass_rate"],
                [[100, 9.5, 0.25], [200, 7.25, 0.5]],
                ["kpi/pass_rate"],
                step=200,
            )
    """
    missing = [key for key in (x_key, *kpi_keys) if key not in columns]
    if missing:
        raise ValueError(f"{', '.join(missing)} not among the table's columns {list(columns)}")
    if not _is_live(run):
        return False
    import wandb

    def table() -> Any:
        # a table object per chart: W&B binds each logged table to its own file
        return wandb.Table(columns=list(columns), data=[list(row) for row in rows])

    payload: dict[str, Any] = {LINK_TABLE_KEY: table()}
    for key in kpi_keys:
        title = f"{key} vs {x_key}"
        payload[f"link/{key}"] = wandb.plot.scatter(table(), x_key, key, title=title)
    payload[step_key] = step
    run.log(payload)
    return True


def _is_live(run: Any) -> bool:
    """A run that records: not ``None``, not a disabled (no-op) one."""
    return run is not None and not getattr(run, "disabled", False)


def _check_project(project: object) -> None:
    if not isinstance(project, str):
        raise TypeError(f"project must be a str or None, got {type(project).__name__}")
    if not project.strip():
        raise ValueError(f"project must not be empty, got {project!r}")
    if len(project) > 128:
        raise ValueError(f"project must be at most 128 characters, got {len(project)}")
    bad = sorted(_BAD_PROJECT_CHARS.intersection(project))
    if bad:
        raise ValueError(f"project={project!r} contains {''.join(bad)!r}, which W&B refuses")


def _logger_class(namespace: str | None) -> type:
    if namespace is not None and namespace not in _NAMESPACES:
        raise ValueError(
            f"namespace={namespace!r} is not supported: use 'lightning' or 'pytorch_lightning'"
        )
    if namespace is None:
        try:
            module = importlib.import_module("lightning.pytorch.loggers")
        except ImportError:
            module = _import_loggers("pytorch_lightning")
    else:
        module = _import_loggers(_NAMESPACES[namespace])
    return module.WandbLogger


def _import_loggers(package: str) -> Any:
    try:
        return importlib.import_module(f"{package}.loggers")
    except ImportError as exc:
        dist = "lightning" if package.startswith("lightning") else "pytorch-lightning"
        raise ImportError(
            f"{package} is not installed ({exc}); install it with `pip install {dist}`"
        ) from exc


def _host(env: Mapping[str, str]) -> str:
    base = env.get("WANDB_BASE_URL", "").strip() or _DEFAULT_BASE_URL
    return urlsplit(base).netloc or base


def _netrc_path(env: Mapping[str, str], netrc_path: str | os.PathLike[str] | None) -> Path:
    if netrc_path is not None:
        return Path(netrc_path)
    if env.get("NETRC"):
        return Path(env["NETRC"]).expanduser()
    home_var = env.get("HOME") or env.get("USERPROFILE")
    home = Path(home_var) if home_var else Path.home()
    unix, windows = home / ".netrc", home / "_netrc"
    if not unix.exists() and windows.exists():
        return windows
    return unix


def _is_rank_zero() -> bool:
    # The same variables, in the same order, as Lightning's rank_zero_only.
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(var)
        if value is not None:
            return value.strip() == "0"
    return True


def _mode_line(choice: ModeChoice, save_dir: Path, run_id: str, project: str | None) -> str:
    if choice.mode == "disabled":
        return f"lossplug: W&B disabled ({choice.reason}): nothing is logged to W&B"
    if choice.mode == "offline":
        run_dir = save_dir / "wandb" / f"offline-run-*-{run_id}"
        return (
            f"lossplug: W&B offline ({choice.reason}) -> {run_dir}; "
            f"upload later with: wandb sync {run_dir}"
        )
    run_dir = save_dir / "wandb" / f"run-*-{run_id}"
    return (
        f"lossplug: W&B {choice.mode} ({choice.reason}) -> project {project!r}, "
        f"run {run_id}; local copy in {run_dir}"
    )
