"""Configuration: a TOML file plus ``SPINE_NODE_*`` environment variables.

Precedence (highest first): keyword arguments, environment variables
(``SPINE_NODE_DICOM__PORT=11113``; nested fields use ``__``), the TOML file named by
``SPINE_NODE_CONFIG`` or ``--config``, then the embedded defaults, which need no server:
SQLite, a local spool and a filesystem broker, all under ``data_dir``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from spine_node.engines import ENGINES_DIR
from spine_node.node.errors import ConfigError
from spine_node.node.uids import is_valid_uid

log = logging.getLogger(__name__)

ENV_PREFIX = "SPINE_NODE_"
CONFIG_ENV = "SPINE_NODE_CONFIG"
# SPINE_NODE_* variables that are not settings: the config file, and the test suite's own
# (tests/peers.py, tests/pipelines_for_tests.py).
_NOT_SETTINGS = frozenset({CONFIG_ENV, "SPINE_NODE_REQUIRE_PEERS", "SPINE_NODE_DCMTK_DIR"})
_TEST_ENV_PREFIX = "SPINE_NODE_TEST_"

# PS3.5 6.2: AE is up to 16 characters of the default repertoire, no backslash or
# control characters, and not only spaces.
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def validate_ae_title(value: str) -> str:
    """Return the AE title stripped of padding, or raise ValueError naming the problem."""
    if not isinstance(value, str) or not _AE_RE.match(value) or not value.strip():
        raise ValueError(
            f"invalid AE title {value!r}: expected 1-16 printable ASCII characters, "
            "no backslash, not all spaces"
        )
    return value.strip()


def _check_port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError(f"invalid port {value}: expected 0-65535 (0 picks a free port)")
    return value


class _Section(BaseModel):
    """A configuration table: a key it does not define is a typo, not something to ignore."""

    model_config = ConfigDict(extra="forbid")


class TLSSettings(_Section):
    """DICOM TLS (PS3.15 B.1). All paths are PEM files."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TLSSettings:
        if self.enabled:
            for name in ("cert_file", "key_file"):
                path = getattr(self, name)
                if path is None or not Path(path).is_file():
                    raise ValueError(f"tls.{name} must name an existing PEM file, got {path}")
            if self.require_client_cert and (self.ca_file is None or not self.ca_file.is_file()):
                raise ValueError("tls.require_client_cert needs tls.ca_file naming a PEM file")
        return self


class DicomSettings(_Section):
    """The listening Application Entity."""

    ae_title: str = "SPINE_NODE"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_ae_titles: list[str] = Field(default_factory=list)
    allowed_hosts: list[str] = Field(default_factory=list)
    max_associations: int = 16
    # Receive processes sharing the port (SO_REUSEPORT); the kernel spreads associations
    # over them. Each has its own GIL, so parallel associations use several cores.
    processes: int = 1
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    # Deadlines bound a whole phase, not each read: the A-ASSOCIATE-RQ must arrive within
    # acse_timeout_s of connecting, and each DIMSE message within dimse_timeout_s of its
    # first byte, plus one second per min_transfer_rate bytes received (a large data set
    # sent at least this fast always gets through; a trickle is cut off).
    min_transfer_rate: int = Field(default=65536, ge=1)
    # One host cannot take every association or connection slot (slow or hostile peers).
    max_associations_per_host: int = Field(default=8, ge=1, le=1000)
    # Connections that have not yet associated (no thread or buffer beyond these).
    max_pending_connections: int = Field(default=64, ge=1, le=10000)
    max_pending_per_host: int = Field(default=8, ge=1, le=10000)
    # Reject an A-ASSOCIATE-RQ whose called AE title is not ae_title.
    check_called_ae_title: bool = True
    # Refused connections (host not allowed, too many pending) are audited as one row per
    # host and reason per interval, off the accept thread.
    refusal_audit_interval_s: float = Field(default=60.0, gt=0)
    tls: TLSSettings = Field(default_factory=TLSSettings)

    _ae = field_validator("ae_title")(lambda cls, v: validate_ae_title(v))
    _port = field_validator("port")(lambda cls, v: _check_port(v))

    @field_validator("allowed_calling_ae_titles")
    @classmethod
    def _aes(cls, values: list[str]) -> list[str]:
        return [validate_ae_title(v) for v in values]

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError as exc:
                raise ValueError(
                    f"invalid allowed host {value!r}: expected an IP address or CIDR network"
                ) from exc
        return values

    @field_validator("max_associations")
    @classmethod
    def _max_assoc(cls, value: int) -> int:
        if not 1 <= value <= 1000:
            raise ValueError(f"max_associations {value} out of range 1-1000")
        return value

    @field_validator("processes")
    @classmethod
    def _processes(cls, value: int) -> int:
        if not 1 <= value <= 64:
            raise ValueError(f"processes {value} out of range 1-64")
        return value

    def host_allowed(self, address: str) -> bool:
        """True if the allowlist is off or ``address`` falls in one of its networks."""
        if not self.allowed_hosts:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(net, strict=False) for net in self.allowed_hosts)

    def calling_ae_allowed(self, ae_title: str) -> bool:
        """True if the allowlist is off or ``ae_title`` is on it."""
        return not self.allowed_calling_ae_titles or ae_title.strip() in self.allowed_calling_ae_titles


class StorageSettings(_Section):
    """Where the node keeps its files."""

    data_dir: Path = Path("spine-node-data")
    spool_dir: Path | None = None
    results_dir: Path | None = None
    # Receive answers 0xA700 (out of resources) below this much free space.
    min_free_mb: int = 512
    # Retention (both off by default): delete routed or skipped series whose jobs are all
    # finished once they are older than retention_days, and, oldest first, whenever the
    # spool volume has less than emergency_free_mb free. Every deletion is audited.
    retention_days: float = 0.0
    emergency_free_mb: int = 0
    # true: every received file is on disk (fdatasync) before its C-STORE is answered, so
    # an answered instance survives a power cut. false: answered once the operating system
    # has it, which survives a crash of the node but not of the machine (what DCMTK storescp
    # and Orthanc do by default); much faster where syncing is slow (bench/RESULTS.md).
    sync_before_answer: bool = True

    @model_validator(mode="after")
    def _derive(self) -> StorageSettings:
        if self.spool_dir is None:
            self.spool_dir = self.data_dir / "spool"
        if self.results_dir is None:
            self.results_dir = self.data_dir / "results"
        if self.min_free_mb < 0:
            raise ValueError(f"storage.min_free_mb must be >= 0, got {self.min_free_mb}")
        if self.retention_days < 0 or self.emergency_free_mb < 0:
            raise ValueError("storage.retention_days and storage.emergency_free_mb must be >= 0")
        if self.emergency_free_mb and self.emergency_free_mb <= self.min_free_mb:
            raise ValueError(
                f"storage.emergency_free_mb ({self.emergency_free_mb}) must be above storage.min_free_mb "
                f"({self.min_free_mb}), so old series are cleaned before receive refuses instances"
            )
        return self

    @property
    def spool(self) -> Path:
        assert self.spool_dir is not None
        return self.spool_dir

    @property
    def results(self) -> Path:
        assert self.results_dir is not None
        return self.results_dir


class AssemblySettings(_Section):
    """When a series counts as complete."""

    # A series is complete once no instance of it arrived for this long...
    quiet_period_s: float = 20.0
    # ...and no other series of the same study arrived for this long either, so a study
    # still streaming in is not routed half-way.
    study_quiet_period_s: float = 20.0
    # A series still receiving after this long is completed anyway.
    force_complete_s: float = 3600.0
    poll_interval_s: float = 1.0

    @model_validator(mode="after")
    def _positive(self) -> AssemblySettings:
        for name in ("quiet_period_s", "study_quiet_period_s", "force_complete_s", "poll_interval_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"assembly.{name} must be >= 0, got {getattr(self, name)}")
        if self.force_complete_s < self.quiet_period_s:
            raise ValueError("assembly.force_complete_s must be >= assembly.quiet_period_s")
        return self


class Destination(_Section):
    """A DICOM peer results are sent to with C-STORE."""

    name: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str | None = None
    tls: TLSSettings = Field(default_factory=TLSSettings)

    _ae = field_validator("ae_title")(lambda cls, v: validate_ae_title(v))
    _port = field_validator("port")(lambda cls, v: _check_port(v))

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", value):
            raise ValueError(f"invalid destination name {value!r}: use letters, digits, _ . -")
        return value


class RouteMatch(_Section):
    """Header values a series must have; each list is 'any of', matched case-insensitively.

    An empty list matches anything. Values are shell-style patterns (``LAT*``); the value
    ``""`` matches a missing or empty attribute.
    """

    modality: list[str] = Field(default_factory=list)
    body_part: list[str] = Field(default_factory=list)
    view_position: list[str] = Field(default_factory=list)
    sop_class_uid: list[str] = Field(default_factory=list)

    @field_validator("sop_class_uid")
    @classmethod
    def _uids(cls, values: list[str]) -> list[str]:
        for value in values:
            if not is_valid_uid(value):
                raise ValueError(f"invalid SOP Class UID in route: {value!r}")
        return values


class Route(_Section):
    """A rule: series matching ``match`` trigger ``pipelines``."""

    name: str
    match: RouteMatch = Field(default_factory=RouteMatch)
    pipelines: list[str]
    # "series": one job per matching series; "study": one job per study, with every
    # matching series of the study as input (e.g. an AP + LAT pair).
    scope: Literal["series", "study"] = "series"
    # The engine class queue its jobs go to: workers on GPU hosts consume "gpu".
    queue: Literal["cpu", "gpu"] = "cpu"

    @field_validator("pipelines")
    @classmethod
    def _pipelines(cls, values: list[str]) -> list[str]:
        if not values:
            raise ValueError("a route needs at least one pipeline")
        for value in values:
            if not re.match(r"^[a-z0-9][a-z0-9_-]{0,63}$", value):
                raise ValueError(f"invalid pipeline name {value!r}: lower-case, digits, - _")
        return values


_XRAY = ["CR", "DX", "DR"]
_SPINE_PARTS = ["*SPINE*", "NECK", ""]


def default_routes() -> list[Route]:
    """The routes used when the configuration names none."""
    return [
        Route(
            name="ct-cervical-spine",
            match=RouteMatch(modality=["CT"], body_part=["CSPINE", "NECK", "SPINE", ""]),
            pipelines=["ct-cspine-fracture"],
        ),
        Route(
            name="xray-spine-single",
            match=RouteMatch(modality=_XRAY, body_part=_SPINE_PARTS),
            pipelines=["xray-fracture", "xray-spine-seg", "xray-tissue-seg"],
        ),
        Route(
            name="xray-cspine",
            # The cervical classifier reads lateral views only; an empty ViewPosition still
            # goes (the pipeline's view gate decides from the image).
            match=RouteMatch(modality=_XRAY, body_part=["CSPINE", "NECK"],
                             view_position=["LL", "RL", "LAT*", ""]),
            pipelines=["xray-cspine-classify"],
        ),
        Route(
            name="xray-spine-pair",
            match=RouteMatch(modality=_XRAY, body_part=_SPINE_PARTS, view_position=["AP", "PA", "LL", "RL", "LAT*"]),
            pipelines=["xray-pair-classify"],
            scope="study",
        ),
    ]


class WorkerSettings(_Section):
    """Celery workers."""

    # serve starts a local worker process (single-machine default).
    embedded: bool = True
    concurrency: int = 1
    queues: list[str] = Field(default_factory=lambda: ["cpu"])
    # Preferred engine order; the first one the worker can run is used.
    backends: list[str] = Field(default_factory=lambda: ["tensorrt", "onnxruntime", "torch"])
    # The model repository; default: the engines/ folder installed with the package.
    engines_dir: Path = Field(default_factory=lambda: ENGINES_DIR)
    # A running job whose heartbeat is older than this is considered lost and re-queued.
    heartbeat_timeout_s: float = 60.0
    # A queued job whose message is older than this with no worker on it is re-sent.
    requeue_after_s: float = 120.0
    max_attempts: int = 3
    # Extra modules imported by workers so their pipelines register (site plug-ins, tests).
    pipeline_modules: list[str] = Field(default_factory=list)
    # Intra-op CPU threads per engine (ONNX Runtime, torch); unset: all cores of the host.
    # Set it when several workers share one host, so they do not oversubscribe its cores.
    engine_threads: int | None = Field(default=None, ge=1, le=256)
    # Decoded pixel samples one job may hold (Rows x Columns x frames x samples, summed
    # over its inputs, checked before decoding): a file claiming more fails its job.
    max_pixels_per_job: int = Field(default=1 << 29, ge=1 << 16)

    @field_validator("queues")
    @classmethod
    def _queues(cls, values: list[str]) -> list[str]:
        for value in values:
            if not re.match(r"^[a-z0-9][a-z0-9_-]{0,31}$", value):
                raise ValueError(f"invalid queue name {value!r}: lower-case, digits, - _")
        if not values:
            raise ValueError("worker.queues needs at least one queue")
        return values

    @field_validator("pipeline_modules")
    @classmethod
    def _modules(cls, values: list[str]) -> list[str]:
        for value in values:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$", value):
                raise ValueError(f"invalid module name {value!r} in worker.pipeline_modules")
        return values

    @model_validator(mode="after")
    def _limits(self) -> WorkerSettings:
        if self.concurrency < 1:
            raise ValueError(f"worker.concurrency must be >= 1, got {self.concurrency}")
        if self.max_attempts < 1:
            raise ValueError(f"worker.max_attempts must be >= 1, got {self.max_attempts}")
        for name in ("heartbeat_timeout_s", "requeue_after_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"worker.{name} must be > 0, got {getattr(self, name)}")
        return self


class DispatchSettings(_Section):
    """Sending results back."""

    destinations: list[Destination] = Field(default_factory=list)
    max_attempts: int = 6
    backoff_initial_s: float = 5.0
    backoff_max_s: float = 600.0
    calling_ae_title: str = "SPINE_NODE"
    # A job that fails for good still sends an SR saying "analysis not performed" and why.
    send_failure_notices: bool = True

    _calling = field_validator("calling_ae_title")(lambda cls, v: validate_ae_title(v))

    @model_validator(mode="after")
    def _limits(self) -> DispatchSettings:
        if self.max_attempts < 1:
            raise ValueError(f"dispatch.max_attempts must be >= 1, got {self.max_attempts}")
        if self.backoff_initial_s < 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                "dispatch backoff must satisfy 0 <= backoff_initial_s <= backoff_max_s, got "
                f"{self.backoff_initial_s} and {self.backoff_max_s}"
            )
        return self


class Settings(BaseSettings):
    """The whole node configuration."""

    model_config = SettingsConfigDict(
        env_prefix="SPINE_NODE_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    dicom: DicomSettings = Field(default_factory=DicomSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    assembly: AssemblySettings = Field(default_factory=AssemblySettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    routes: list[Route] = Field(default_factory=default_routes)
    # Default: SQLite file under data_dir.
    database_url: str = ""
    # Default: a filesystem broker under data_dir (no server). Or redis://host:6379/0.
    broker_url: str = ""
    metrics_port: int | None = None
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _derive_urls(self) -> Settings:
        data = self.storage.data_dir
        if not self.database_url:
            self.database_url = f"sqlite:///{(data / 'spine-node.db').as_posix()}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        # The plain form names no driver; SQLAlchemy would pick psycopg (3), which is not
        # installed. psycopg2 is (a dependency), so the plain form means it.
        self.database_url = re.sub(r"^postgres(ql)?://", "postgresql+psycopg2://", self.database_url)
        if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", self.database_url):
            raise ValueError(
                f"unsupported database_url scheme in {redact_url(self.database_url)!r}: "
                "expected sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
            )
        if not re.match(r"^(filesystem|redis|rediss|memory|sqla\+\w+)://", self.broker_url):
            raise ValueError(
                f"unsupported broker_url {redact_url(self.broker_url)!r}: expected "
                "filesystem://, redis://host:port/db or memory://"
            )
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"invalid log_level {self.log_level!r}")
        names = [d.name for d in self.dispatch.destinations]
        if len(names) != len(set(names)):
            raise ValueError(f"destination names must be unique, got {names}")
        return self

    @property
    def broker_dir(self) -> Path:
        """Folder of the filesystem broker."""
        return self.storage.data_dir / "broker"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, _KnownEnvSettingsSource(settings_cls)]
        path = os.environ.get(CONFIG_ENV)
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
        return tuple(sources)


def setting_env_names(model: type[BaseModel], prefix: str = ENV_PREFIX) -> set[str]:
    """Every environment variable that sets a field of ``model`` (upper case), nested with ``__``."""
    names: set[str] = set()
    for field_name, field in model.model_fields.items():
        name = f"{prefix}{field_name.upper()}"
        names.add(name)
        section = _section_model(field.annotation)
        if section is not None:
            names |= setting_env_names(section, f"{name}__")
    return names


def unknown_env_names(environ: Mapping[str, str] | None = None) -> list[str]:
    """``SPINE_NODE_*`` variables that set nothing (a typo, or a setting that was removed)."""
    environ = os.environ if environ is None else environ
    known = setting_env_names(Settings)
    return sorted(
        name for name in environ
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known
        and name.upper() not in _NOT_SETTINGS and not name.upper().startswith(_TEST_ENV_PREFIX)
    )


class _KnownEnvSettingsSource(EnvSettingsSource):
    """The environment less the ``SPINE_NODE_*`` names that are no setting: those get a
    warning from :func:`load_settings` rather than failing the nested section's validation."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        unknown = {name.lower() for name in unknown_env_names()}
        return {k: v for k, v in super()._load_env_vars().items() if k.lower() not in unknown}


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a section field (``DicomSettings``, ``list[Route]`` -> ``Route``), if it is one."""
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _model_at(loc: Sequence[int | str]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Settings
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model is not None else None
        model = _section_model(field.annotation) if field is not None else None
    return model


def _section_label(loc: Sequence[int | str]) -> str:
    """How the TOML file names the table at ``loc``: ``[dicom.tls]``, ``[[routes]] #2``."""
    path = ".".join(str(p) for p in loc if not isinstance(p, int))
    if loc and isinstance(loc[-1], int):
        return f"[[{path}]] #{loc[-1] + 1}"
    return f"[{path}]"


def _unknown_key(loc: Sequence[int | str]) -> str:
    """One line for a key no section defines, with the keys it does define."""
    import difflib

    key, section = str(loc[-1]), loc[:-1]
    model = _model_at(section)
    known = sorted(model.model_fields) if model is not None else []
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = f"in {_section_label(section)}" if section else "at the top level (a key or a [section])"
    return f"unknown key {key!r} {where}{hint}; expected one of: {', '.join(known)}"


def _warn_unknown_env() -> None:
    import difflib

    names = unknown_env_names()
    if not names:
        return
    known = sorted(setting_env_names(Settings))
    hints = []
    for name in names:
        close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.8)
        hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
    log.warning("ignoring environment variable(s) that set nothing: %s; nested settings use __, "
                "e.g. SPINE_NODE_DICOM__PORT", ", ".join(hints))


def redact_url(url: str) -> str:
    """Hide the password in a URL (``scheme://user:***@host``)."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Load and validate settings; raise :class:`ConfigError` with every problem named."""
    previous = os.environ.get(CONFIG_ENV)
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        os.environ[CONFIG_ENV] = str(path)
    _warn_unknown_env()
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            _unknown_key(err["loc"]) if err["type"] == "extra_forbidden"
            else f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read configuration: {exc}") from None
    finally:
        if config_file is not None:
            if previous is None:
                os.environ.pop(CONFIG_ENV, None)
            else:
                os.environ[CONFIG_ENV] = previous
