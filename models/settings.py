"""The one typed settings object of cohortflow.

Read once at the edge (the CLI, flow parameters) and passed down; library code never reads the
environment itself. Sources, strongest first: environment variables (``COHORTFLOW_*``, nested
fields with ``__``, e.g. ``COHORTFLOW_ORTHANC__DICOM_PORT``), the YAML config file
(``COHORTFLOW_CONFIG``, else ``$COHORTFLOW_HOME/cohortflow.yaml`` when it exists), the embedded
defaults. Every default lives under one data folder, ``COHORTFLOW_HOME`` (``./cohortflow-data``),
so a new user configures nothing and several installations can live side by side.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from cohortflow.models.errors import ConfigurationError

DEFAULT_HOME = Path("cohortflow-data")


class OrthancSettings(BaseModel):
    """The PACS cohortflow talks to; by default the Orthanc it starts itself on loopback."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    http_port: int = Field(8042, ge=1, le=65535)
    dicom_port: int = Field(4242, ge=1, le=65535)
    aet: str = Field("ORTHANC", min_length=1, max_length=16)
    username: str = "cohortflow"
    password: SecretStr | None = None


class PacsSettings(BaseModel):
    """Another DICOM node to select and retrieve from (unset: the project's own Orthanc)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    aet: str = Field(min_length=1, max_length=16)
    host: str
    port: int = Field(ge=1, le=65535)
    #: DICOMweb root for ``retrieve.method: dicomweb``, e.g. https://pacs.example.org/dicom-web
    dicomweb_url: str | None = Field(None, pattern=r"^https?://")
    #: HTTP basic authentication ...
    dicomweb_username: str | None = None
    dicomweb_password: SecretStr | None = None
    #: ... or a bearer token, read at every request from ``file:PATH`` (owner-only) or
    #: ``env:VARIABLE``: a token another process renews is used, and none is written here
    dicomweb_token_source: str | None = Field(None, pattern=r"^(file|env):.+")
    #: TLS: the certificate authorities (PEM bundle) the server's certificate is checked
    #: against (unset: the system's); mutual TLS: this node's certificate chain and key (PEM;
    #: the key may be in the certificate's file)
    dicomweb_ca_bundle: Path | None = None
    dicomweb_client_certificate: Path | None = None
    dicomweb_client_key: Path | None = None
    #: ``package.module:function`` called with the ``requests.Session`` before any request:
    #: any other authentication (OAuth, Kerberos, a proxy)
    dicomweb_session_hook: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"
    )

    @model_validator(mode="after")
    def _one_authentication(self) -> PacsSettings:
        if self.dicomweb_username is not None and self.dicomweb_token_source is not None:
            raise ValueError("pacs.dicomweb_username and dicomweb_token_source: give one")
        if self.dicomweb_client_key is not None and self.dicomweb_client_certificate is None:
            raise ValueError("pacs.dicomweb_client_key needs dicomweb_client_certificate")
        return self


class RetrieveSettings(BaseModel):
    """How cohortflow fetches from the PACS, and how gently (see pipelines/retrieve/throttle)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str = Field("move", pattern="^(move|get|dicomweb)$")
    #: cohortflow's storage SCP (C-MOVE destination, ``cohortflow listen``); its AE title is
    #: ``local_aet``. The PACS must know this AE title, host and port.
    scp_host: str = "127.0.0.1"
    scp_port: int = Field(11112, ge=1, le=65535)
    #: calling AE titles the storage SCP accepts associations from; empty: the configured PACS
    #: only (``pacs.aet``, else ``orthanc.aet``); ``["*"]``: any caller (an open port on a
    #: hospital network takes whatever is pushed to it)
    calling_aets: tuple[str, ...] = ()
    #: DICOM TLS on the storage SCP (PS3.15 B.1; TLS 1.2 or later): its certificate chain and
    #: private key (PEM files; the key must be owner-only). Unset: plain DICOM. With
    #: ``scp_tls_client_ca`` (PEM bundle) a caller must also present a certificate issued by
    #: it (mutual TLS); the calling AE title is checked as well.
    scp_tls_certificate: Path | None = None
    scp_tls_key: Path | None = None
    scp_tls_client_ca: Path | None = None
    max_associations: int = Field(1, ge=1, le=32)
    studies_per_hour: float | None = Field(None, gt=0)
    #: e.g. ["Mon-Fri 19:00-07:00", "Sat-Sun"]; empty: any time
    windows: tuple[str, ...] = ()
    outside_window: str = Field("wait", pattern="^(wait|stop)$")
    retries: int = Field(3, ge=0, le=100)
    backoff_seconds: float = Field(5.0, ge=0)
    backoff_max_seconds: float = Field(300.0, ge=0)
    #: DIMSE timeout per response (a C-MOVE of a large series answers when it is done)
    timeout_seconds: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _tls_pairs(self) -> RetrieveSettings:
        if (self.scp_tls_certificate is None) != (self.scp_tls_key is None):
            raise ValueError("retrieve.scp_tls_certificate and scp_tls_key are set together")
        if self.scp_tls_client_ca is not None and self.scp_tls_certificate is None:
            raise ValueError("retrieve.scp_tls_client_ca needs scp_tls_certificate and key")
        return self


class DefaceSettings(BaseModel):
    """How cohortflow removes faces (see pipelines/deface)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: the protocols.yaml include rule naming the series the template is registered to
    reference_rule: str = "t1_3d"
    #: the intracranial mask grown by this much is never altered, whatever the face mask says
    brain_margin_mm: float = Field(4.0, ge=0, le=20)
    #: pydeface's face region grown by this much is removed (outside the intracranial margin):
    #: a template a few millimetres or degrees off still takes the whole face
    face_margin_mm: float = Field(6.0, ge=0, le=20)
    #: ... and reaches this much higher in front of the forehead: pydeface's region stops at
    #: the brow line, so the eyebrows (identifying, as face recognition on renders uses them)
    #: were kept. On Colin27 heads (an anatomy apart from pydeface's) the face above the orbits
    #: lay up to 14 mm above what was removed (benchmarks/deface.py --generator colin)
    brow_mm: float = Field(12.0, ge=0, le=30)
    #: ... and there takes what lies in front of the forehead only to this depth behind the
    #: subject's own skin (the first skin a ray from the front meets on the image), whatever the
    #: template says: where its fit was a centimetre off, the brow took 7 voxels of ROBEX's brain
    #: mask at the frontal pole of a real Siemens Trio head (24 mm behind the skin there). The
    #: eyebrows lie in the skin; 10 mm left 8 % of Colin27's face in front of the brow bone
    #: (benchmarks/deface.py --generator colin: 91.7 % removed at least), 15 mm 2.2 %
    brow_depth_mm: float = Field(15.0, ge=0, le=30)
    #: a series fails unless at least this fraction of its face-mask voxels is removed
    min_face_removed: float = Field(0.95, gt=0, le=1)
    #: a registration whose template / subject correlation is lower fails the whole study: a
    #: gross failure only, as a good fit's correlation depends on the scanner's contrast.
    #: Calibrated on real heads (tests/test_realdata_heads.py): good fits 0.50 (a 2 mm Siemens
    #: XA30 MPRAGE) to 0.63; the same fits moved by 30 mm or turned by 20 degrees 0.05 to 0.38
    #: (smaller misplacements are caught by the neighbour test below)
    min_correlation: float = Field(0.4, ge=-1, le=1)
    #: ... and so does one where the template moved by 5 mm or 5 degrees correlates better by
    #: more than this (the fit stopped short of the best placement)
    max_neighbour_gain: float = Field(0.0, ge=-1, le=1)
    #: a defaced T1 whose skin surface still shows a nose standing out more than this from the
    #: face profile and the cheeks (mm) is not written (pipelines/deface/surface.py: 14 to 20
    #: on real heads with their faces, 3 or less after defacing)
    max_nose_mm: float = Field(8.0, ge=0, le=50)
    #: a registration fails when less of the warped intracranial mask lies on head tissue
    min_brain_on_tissue: float = Field(0.9, ge=0, le=1)


class FlowSettings(BaseModel):
    """How protocol flows run their studies (``cohortflow run``, the deployments)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: an existing Dask scheduler (``tcp://host:8786``); unset: a local cluster per run. Its
    #: workers need the same archive path and a PostgreSQL index.
    dask_address: str | None = None
    #: worker processes of the local cluster (one study step at a time each); 0: one per core
    workers: int = Field(0, ge=0, le=256)
    #: where the local cluster's Dask dashboard listens (``127.0.0.1:8787``); unset: no
    #: dashboard. It has no login and shows task names and timings: keep it on loopback.
    dask_dashboard: str | None = None
    #: the IANA time zone of the deployments' schedules (prefect.yaml, through the Prefect
    #: variable ``cohortflow prefect setup`` sets); unset: this machine's zone
    timezone: str | None = None

    @model_validator(mode="after")
    def _known_zone(self) -> FlowSettings:
        if self.timezone is not None:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(self.timezone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(
                    f"flow.timezone {self.timezone!r} is not an IANA time zone (e.g. Europe/London)"
                ) from None
        return self


class DashboardSettings(BaseModel):
    """The QC dashboard's web server (``cohortflow dashboard``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: the address to listen on; 127.0.0.1 keeps it on this machine (put a TLS proxy in front
    #: to serve a network)
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=1, le=65535)
    #: how long a login lasts
    session_hours: float = Field(8.0, gt=0, le=24 * 7)
    #: rows per page of the failure list
    page_size: int = Field(50, ge=5, le=1000)
    #: set when the dashboard is only ever reached over HTTPS (the session cookie is then always
    #: marked Secure; without it, it is marked Secure on every request that came over TLS)
    https: bool = False
    #: serve HTTPS directly: the certificate (chain) and its private key, PEM files
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: addresses of reverse proxies whose X-Forwarded-For / X-Forwarded-Proto headers are
    #: believed (the client's address for throttling, and whether it came over TLS); empty:
    #: none, the headers are ignored
    trusted_proxies: list[str] = Field(default_factory=list)
    #: the longest a request's database statements may run (seconds; then 503)
    request_seconds: float = Field(20.0, gt=0, le=3600)
    #: a session ends after this long without a request (minutes)
    idle_minutes: float = Field(30.0, gt=0, le=24 * 60)
    #: failed logins of an account before each further attempt waits (1 s, doubling)
    login_free_failures: int = Field(3, ge=1, le=100)
    #: the longest such wait (seconds)
    login_max_delay_seconds: float = Field(300.0, ge=1, le=86400)
    #: failed logins in a row that lock an account until an admin unlocks it
    login_lock_after: int = Field(10, ge=2, le=1000)
    #: failed logins from one client address before its attempts wait (1 s, doubling)
    client_free_failures: int = Field(10, ge=1, le=1000)


class CohortSettings(BaseModel):
    """Cohort discovery (``cohortflow cohort``, the dashboard's Cohorts page)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: in the de-identified layer, a count of fewer patients than this is suppressed, and no
    #: list, saved cohort or export of fewer patients is made
    min_cell_patients: int = Field(5, ge=1, le=1000)
    #: de-identified counts are perturbed (models/disclosure.py) and rounded to a multiple of
    #: this
    round_to: int = Field(5, ge=1, le=100)
    #: width of the age bands counts are grouped by
    age_band_years: int = Field(10, ge=1, le=50)


class BidsSettings(BaseModel):
    """What a converted folder says about itself (``dataset_description.json``, ``README.md``):
    the dataset's own facts, which cohortflow cannot know. Unset fields are left out."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field("cohortflow conversion", min_length=1)
    #: the people who made the dataset, one per entry (BIDS ``Authors``)
    authors: tuple[str, ...] = ()
    #: the licence the data are shared under, an SPDX identifier where there is one (``CC0-1.0``)
    license: str | None = None
    #: how users of the dataset should cite it (a paper, a DOI)
    how_to_acknowledge: str | None = None


class Settings(BaseSettings):
    """Where cohortflow keeps its data and how it reaches the outside world."""

    model_config = SettingsConfigDict(
        env_prefix="COHORTFLOW_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    home: Path = DEFAULT_HOME
    archive_dir: Path | None = None
    cache_dir: Path | None = None
    #: Where each head's fit to the head model is kept, by the image's content and the
    #: registration's version, so a head is registered once (a rerun, defacing then volumetry
    #: on a folder, image QC); default: <cache_dir>/fits. Transforms only, nothing of the image:
    #: a 4 x 4 matrix per head, and volumetry's deformable stage (a displacement field at 5 mm
    #: of the defaced T1, about 0.6 MB per measured T1). Deleting the folder costs only the
    #: registrations again.
    fits_dir: Path | None = None
    outputs_dir: Path | None = None
    index_url: str | None = None
    #: Where the project's pseudonymization key comes from: ``file:PATH`` or ``env:VARIABLE``.
    #: The key itself never enters the repository, the logs or Prefect parameters.
    pseudonym_key_source: str | None = None
    #: Where the archive key ring comes from (``file:PATH``, made on first use, or
    #: ``env:VARIABLE``): the identified archive's blobs are sealed with AES-256-GCM
    #: (pipelines/archive/sealed.py). ``none`` stores them as received (a disk encrypted as a
    #: whole, say); default: ``file:<home>/secrets/archive.key``.
    archive_key_source: str | None = None
    local_aet: str = Field("COHORTFLOW", min_length=1, max_length=16)
    orthanc: OrthancSettings = OrthancSettings()
    #: The PACS to select and retrieve from; unset: the project's own Orthanc (``orthanc``).
    pacs: PacsSettings | None = None
    retrieve: RetrieveSettings = RetrieveSettings()
    deface: DefaceSettings = DefaceSettings()
    flow: FlowSettings = FlowSettings()
    dashboard: DashboardSettings = DashboardSettings()
    cohort: CohortSettings = CohortSettings()
    #: What ``convert`` writes into a BIDS folder's description and README.
    bids: BidsSettings = BidsSettings()
    #: Protocol definitions; default: the file shipped in pipelines/dicom/data.
    protocols_file: Path | None = None
    #: Worker processes for CPU-bound local work (synthesis, ingest); 0 means one per core.
    workers: int = Field(0, ge=0)
    #: ITK threads per process (antspyx registration). 1 makes every registration reproducible
    #: to the bit; more threads are faster but vary in the last digits from run to run.
    itk_threads: int = Field(1, ge=1, le=256)
    #: The known-scanner knowledge base; default: the list shipped in models/data.
    known_scanners_file: Path | None = None

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        # Relative folders are resolved once, here, against the working directory: every stage
        # then compares and joins absolute paths (a relative home wrote nothing and reported
        # stale rows).
        for name in ("home", "archive_dir", "cache_dir", "fits_dir", "outputs_dir",
                     "protocols_file", "known_scanners_file"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and not Path(value).is_absolute():
                object.__setattr__(self, name, Path(os.path.abspath(value)))
        home = self.home
        derived = {
            "archive_dir": home / "archive",
            "cache_dir": home / "cache",
            "outputs_dir": home / "outputs",
            "index_url": f"sqlite:///{(home / 'index.sqlite').as_posix()}",
            "pseudonym_key_source": f"file:{(home / 'secrets' / 'project.key').as_posix()}",
            "archive_key_source": f"file:{(home / 'secrets' / 'archive.key').as_posix()}",
        }
        for name, value in derived.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if not str(self.pseudonym_key_source).startswith(("file:", "env:")):
            raise ValueError(
                "pseudonym_key_source must be 'file:PATH' or 'env:VARIABLE', "
                f"not {self.pseudonym_key_source!r}"
            )
        source = str(self.archive_key_source)
        if source != "none" and not source.startswith(("file:", "env:")):
            raise ValueError(
                "archive_key_source must be 'file:PATH', 'env:VARIABLE' or 'none', "
                f"not {self.archive_key_source!r}"
            )
        return self

    def storage_callers(self) -> tuple[str, ...] | None:
        """The calling AE titles the storage SCP accepts (None: any, ``retrieve.calling_aets``
        holds "*")."""
        listed = self.retrieve.calling_aets
        if "*" in listed:
            return None
        if listed:
            return tuple(listed)
        return (self.pacs.aet if self.pacs is not None else self.orthanc.aet,)

    def identified_paths(self) -> list[Path]:
        """Everything that holds identified data and must be the owner's only: the archive, the
        index (SQLite's file, its WAL and shared memory), the restricted side (faces, the
        anonymized but not yet defaced copy, previews), the retrieval spool, the secrets, the
        index's copies made before upgrades and the project key's file."""
        home = self.home
        paths = [self.archive, home / "restricted", home / "spool", home / "secrets"]
        paths += [home / "backups"]
        if self.index.startswith("sqlite:///"):
            database = Path(self.index.removeprefix("sqlite:///"))
            paths += [database, Path(f"{database}-wal"), Path(f"{database}-shm")]
        for source in (str(self.pseudonym_key_source), str(self.archive_key_source)):
            if source.startswith("file:"):
                paths.append(Path(source.removeprefix("file:")))
        return paths

    @property
    def index(self) -> str:
        """The archive index's database URL."""
        assert self.index_url is not None
        return self.index_url

    @property
    def archive_key(self) -> str | None:
        """The archive key ring's source, None when the archive is not encrypted."""
        return None if self.archive_key_source == "none" else self.archive_key_source

    @property
    def archive(self) -> Path:
        assert self.archive_dir is not None
        return self.archive_dir

    @property
    def cache(self) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir

    @property
    def fits(self) -> Path:
        """Where head fits are kept (``fits_dir``, else <cache>/fits)."""
        return self.fits_dir or self.cache / "fits"

    @property
    def outputs(self) -> Path:
        assert self.outputs_dir is not None
        return self.outputs_dir

    @property
    def worker_count(self) -> int:
        return self.workers or (os.cpu_count() or 1)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment beats the config file, which arrives as init arguments.
        return env_settings, init_settings


def config_file_path(environ: dict[str, str] | None = None) -> Path | None:
    """The config file: ``COHORTFLOW_CONFIG``, else ``$COHORTFLOW_HOME/cohortflow.yaml``."""
    env = os.environ if environ is None else environ
    if env.get("COHORTFLOW_CONFIG"):
        return Path(env["COHORTFLOW_CONFIG"])
    candidate = Path(env.get("COHORTFLOW_HOME", str(DEFAULT_HOME))) / "cohortflow.yaml"
    return candidate if candidate.is_file() else None


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from defaults, the config file and the environment.

    ``overrides`` (e.g. from tests or command-line options) win over the config file.
    Raises ConfigurationError naming the file and the field when something is invalid.
    """
    path = config_file or config_file_path()
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigurationError(f"cannot read the config file {path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigurationError(f"config file {path} must hold a mapping of settings")
        data = loaded
    try:
        settings = Settings(**data)
        if overrides:
            settings = Settings(**{**data, **overrides})
    except ValidationError as exc:
        where = f"config file {path} or " if path else ""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigurationError(
            f"invalid settings (from {where}COHORTFLOW_* variables): {problems}"
        ) from exc
    return settings
