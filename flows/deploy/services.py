"""systemd unit files for the long-running parts of cohortflow: the dashboard, the DICOM
listener, the project's own Orthanc, a Prefect server and a Prefect worker.

The templates (``systemd/*.service``, shipped in the wheel; ``string.Template``: ``$$`` is a
dollar sign) are filled in with the installed executables (the ``cohortflow`` and ``prefect``
beside this interpreter) and the settings the installing command ran with:
``COHORTFLOW_HOME``, the config file, and an optional
``$COHORTFLOW_HOME/cohortflow.env`` for what the environment must add (a key in
``COHORTFLOW_PROJECT_KEY``, say: never written into a unit file, which others may read)."""

from __future__ import annotations

import getpass
import shutil
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

from cohortflow.models.errors import ConfigurationError
from cohortflow.models.settings import Settings

#: the units, in the order they start
UNITS = (
    "cohortflow-orthanc.service",
    "cohortflow-prefect-server.service",
    "cohortflow-worker.service",
    "cohortflow-listen.service",
    "cohortflow-dashboard.service",
)
#: the work pool of prefect.yaml's deployments
DEFAULT_POOL = "cohortflow-local"
PREFECT_PORT = 4200


@dataclass(frozen=True)
class UnitOptions:
    """What the units are filled in with."""

    cohortflow: Path
    prefect: Path
    home: Path
    #: the folder holding flows/ (prefect.yaml's entrypoints): the installed package's
    code: Path
    config: Path | None = None
    #: a user unit (``systemctl --user``) rather than a system one run as ``user``
    user_unit: bool = False
    user: str | None = None
    pool: str = DEFAULT_POOL
    prefect_api: str = f"http://127.0.0.1:{PREFECT_PORT}/api"


def executable(name: str) -> Path:
    """The installed ``name`` beside this interpreter (a virtual environment's), else on the
    PATH; ConfigurationError when neither."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return beside
    found = shutil.which(name)
    if found is None:
        raise ConfigurationError(
            f"cannot find the {name} executable beside {sys.executable} or on the PATH: "
            "install cohortflow (pip install cohortflow) in the environment the services use"
        )
    return Path(found)


def code_folder() -> Path:
    """The folder holding ``flows/`` as the installed package sees it."""
    import cohortflow

    return Path(cohortflow.__file__).resolve().parent


def options_for(
    settings: Settings,
    config: Path | None,
    *,
    user_unit: bool,
    user: str | None = None,
    pool: str = DEFAULT_POOL,
    prefect_api: str | None = None,
) -> UnitOptions:
    """The options of the units for ``settings`` (system units run as ``user``, default the
    one installing them)."""
    return UnitOptions(
        cohortflow=executable("cohortflow"),
        prefect=executable("prefect"),
        home=settings.home,
        code=code_folder(),
        config=config.resolve() if config is not None else None,
        user_unit=user_unit,
        user=None if user_unit else (user or getpass.getuser()),
        pool=pool,
        prefect_api=prefect_api or f"http://127.0.0.1:{PREFECT_PORT}/api",
    )


def _quoted(value: object) -> str:
    text = str(value)
    if any(c in text for c in '\n"\\'):
        raise ConfigurationError(f"{text!r} cannot be written into a systemd unit")
    return text


def render(name: str, options: UnitOptions) -> str:
    """The text of the unit ``name`` (one of :data:`UNITS`)."""
    template = resources.files("cohortflow.flows.deploy").joinpath("systemd", name)
    environment = [
        f"COHORTFLOW_HOME={_quoted(options.home)}",
        f"PREFECT_HOME={_quoted(options.home / 'prefect')}",
        "PREFECT_SERVER_ANALYTICS_ENABLED=false",
        "DO_NOT_TRACK=1",
    ]
    if options.config is not None:
        environment.append(f"COHORTFLOW_CONFIG={_quoted(options.config)}")
    lines = "".join(f'Environment="{e}"\n' for e in environment)
    lines += f"EnvironmentFile=-{_quoted(options.home / 'cohortflow.env')}\n"
    return Template(template.read_text(encoding="utf-8")).substitute(
        service_user="" if options.user is None else f"User={_quoted(options.user)}\n",
        environment=lines,
        home=_quoted(options.home),
        cohortflow=_quoted(options.cohortflow),
        prefect=_quoted(options.prefect),
        code=_quoted(options.code),
        pool=_quoted(options.pool),
        prefect_api=_quoted(options.prefect_api),
        prefect_port=PREFECT_PORT,
        wanted_by="default.target" if options.user_unit else "multi-user.target",
    )


def install(folder: Path, options: UnitOptions, *, overwrite: bool = False) -> list[Path]:
    """Write every unit into ``folder`` (readable by all, as systemd's own are: they hold
    paths, never a secret). A unit already there that differs is refused unless
    ``overwrite``; the files written are returned."""
    texts = {name: render(name, options) for name in UNITS}
    clashes = [
        name
        for name, text in texts.items()
        if (folder / name).exists() and (folder / name).read_text(encoding="utf-8") != text
    ]
    if clashes and not overwrite:
        raise ConfigurationError(
            f"{', '.join(clashes)} in {folder} differ from what would be written: "
            "--overwrite replaces them"
        )
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in texts.items():
        path = folder / name
        part = folder / f".{name}.part"
        part.write_text(text, encoding="utf-8")
        part.chmod(0o644)
        part.replace(path)
        written.append(path)
    return written
