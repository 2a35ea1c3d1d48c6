"""The node's configuration: documented defaults, a TOML file, the environment, typed.

``config/default.toml`` (shipped with the package) documents every key and
holds its default. :func:`load_config` overlays a user's TOML file and then
``LUNGSYS_<SECTION>_<KEY>`` environment variables and returns a
:class:`NodeConfig`: one frozen dataclass per section, every value of its
declared type and range, every coded choice an Enum. Checks are strict: a
file's ``port = "11403"`` is an error (a string is not a number), as are an
unknown key or section and a value out of range; the error is one line naming
the file and the key (or the environment variable). Environment values are
text by nature and are parsed (:mod:`config.values` holds those checks;
:mod:`config.targets` the destinations and webhooks).
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import os
import socket
import tomllib
from dataclasses import dataclass, field, fields
from importlib.resources import files
from ipaddress import ip_network
from pathlib import Path
from typing import Mapping

from config.rules import Priority, PriorityRule, offpeak_hours, priority_rule
from config.targets import (Destination, DestinationKind, Notification, NotificationEvent,
                            destination, notification)
from config.values import PORT, ConfigError, build_section, value_range
from inference.choices import (DEFAULT_OBJECTS, HeatmapChoice, PatientMethod, ResultObject,
                               SegCompression)

#: What other packages take from here (the targets and value checks live in submodules).
__all__ = ["AssemblyTrigger", "ConfigError", "Destination", "DestinationKind", "NodeConfig",
           "Notification", "NotificationEvent", "Priority", "PriorityRule", "TlsProfile",
           "UserIdentity", "WorkerInstances", "load_config", "defaults"]

DEFAULT_FILE = "default.toml"
#: In the data folder: the node's identity in a shared job store.
NODE_ID_FILE = "node-id"
ENV_PREFIX = "LUNGSYS_"
#: ``[http]`` was ``[dicomweb]`` (when it only received STOW-RS): still read, in files and
#: in the environment.
OLD_HTTP = "dicomweb"


class UserIdentity(enum.StrEnum):
    """DICOM user identity negotiation for callers (PS3.7 D.3.3.7)."""

    none = "none"            # not asked for, ignored when sent
    optional = "optional"    # checked when sent
    required = "required"


class AssemblyTrigger(enum.StrEnum):
    """What is analysed once it is complete: each series, or one series per study."""

    series = "series"
    study = "study"


class WorkerInstances(enum.StrEnum):
    """Where ``lungsys worker`` reads a job's instances and leaves its results."""

    shared = "shared"        # the node's data folder, mounted at the same path
    wado = "wado"            # WADO-RS from the node; results handed back over HTTP


class TlsProfile(enum.StrEnum):
    """The DICOM TLS profile of the node's DICOM port."""

    bcp195 = "bcp195"        # PS3.15 B.9: TLS 1.2 and 1.3, BCP 195 suites
    tls13 = "tls13"          # TLS 1.3 only


@dataclass(frozen=True)
class NodeSection:
    """``[node]``: the DICOM listener, its data folder and its front door."""

    ae_title: str
    host: str
    port: int = field(metadata=PORT)
    data_dir: str = "var"
    allowed_calling_aets: tuple[str, ...] = ()
    allowed_networks: tuple[str, ...] = ()
    min_free_disk_mb: int = field(default=1024, metadata=value_range(0))
    fsync: bool = False
    max_associations: int = field(default=16, metadata=value_range(1))
    max_associations_per_peer: int = field(default=8, metadata=value_range(1))
    max_unassociated: int = field(default=32, metadata=value_range(1))
    max_unassociated_per_peer: int = field(default=8, metadata=value_range(1))
    timeout_seconds: float = field(default=60.0, metadata=value_range(0.1))
    user_identity: UserIdentity = UserIdentity.none
    users_file: str = ""


@dataclass(frozen=True)
class TlsSection:
    """``[tls]``: DICOM TLS on the node's DICOM port."""

    enabled: bool = False
    certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    require_client_certificate: bool = True
    profile: TlsProfile = TlsProfile.bcp195


@dataclass(frozen=True)
class HttpSection:
    """``[http]`` (formerly ``[dicomweb]``): the node's HTTP service: STOW-RS, the console,
    health, metrics."""

    host: str = "127.0.0.1"
    port: int = field(default=8080, metadata=value_range(0, 65535))    # 0: off
    max_request_mb: int = field(default=2048, metadata=value_range(1))
    max_connections: int = field(default=32, metadata=value_range(1))
    max_connections_per_peer: int = field(default=8, metadata=value_range(1))
    stow_anonymous: bool = False
    metrics_anonymous: bool = False
    tls_certificate: str = ""
    tls_private_key: str = ""
    hsts_seconds: int = field(default=31536000, metadata=value_range(0))   # 0: none


@dataclass(frozen=True)
class StoreSection:
    """``[store]``: the job store's SQLAlchemy URL."""

    url: str = "sqlite:///var/lungsys.db"


@dataclass(frozen=True)
class AssemblySection:
    """``[assembly]``: when a series is complete, and which are analysed."""

    stable_seconds: float = field(default=10.0, metadata=value_range(0.001))
    min_slices: int = field(default=20, metadata=value_range(1))
    trigger: AssemblyTrigger = AssemblyTrigger.series
    study_stable_seconds: float = field(default=30.0, metadata=value_range(0.001))


@dataclass(frozen=True)
class ModelSection:
    """``[model]``: the checkpoint, the device and the analysis choices."""

    checkpoint: str = ""
    device: str = "auto"
    batch_size: int = field(default=16, metadata=value_range(1))
    method: PatientMethod = PatientMethod.network
    heatmaps: HeatmapChoice = HeatmapChoice.lesion
    choices: tuple[str, ...] = ()
    mirror: bool = True
    threads: int = field(default=0, metadata=value_range(0))


@dataclass(frozen=True)
class ResultsSection:
    """``[results]``: which DICOM objects an analysis writes and delivers."""

    objects: tuple[ResultObject, ...] = DEFAULT_OBJECTS
    seg_compression: SegCompression = SegCompression.none


@dataclass(frozen=True)
class WorkerSection:
    """``[worker]``: who runs the jobs, and how a job whose worker went away is taken back."""

    local: bool = True
    lease_seconds: float = field(default=60.0, metadata=value_range(2))
    max_attempts: int = field(default=3, metadata=value_range(1))
    offpeak_hours: str = "20:00-06:00"
    instances: WorkerInstances = WorkerInstances.shared
    node_url: str = ""
    token: str = ""
    ca_certificates: str = ""

    def offpeak_now(self, now: dt.datetime | None = None) -> bool:
        """Whether offpeak jobs may be claimed now (the node's local time)."""
        start, end = offpeak_hours("worker.offpeak_hours", self.offpeak_hours)
        at = (now or dt.datetime.now()).time()
        return start <= at < end if start < end else at >= start or at < end


@dataclass(frozen=True)
class DeliverySection:
    """``[delivery]``: retries of deliveries."""

    initial_backoff_seconds: float = field(default=60.0, metadata=value_range(0))
    max_backoff_seconds: float = field(default=3600.0, metadata=value_range(0))
    max_attempts: int = field(default=20, metadata=value_range(1))


@dataclass(frozen=True)
class RetentionSection:
    """``[retention]``: how long delivered data is kept."""

    days: int = field(default=30, metadata=value_range(0))             # 0: keep


SECTIONS = {"node": NodeSection, "tls": TlsSection, "http": HttpSection,
            "store": StoreSection, "assembly": AssemblySection, "model": ModelSection,
            "results": ResultsSection, "delivery": DeliverySection, "retention": RetentionSection,
            "worker": WorkerSection}


@dataclass(frozen=True)
class NodeConfig:
    """The whole configuration: one typed section each, and the destinations."""

    node: NodeSection
    tls: TlsSection
    http: HttpSection
    store: StoreSection
    assembly: AssemblySection
    model: ModelSection
    delivery: DeliverySection
    retention: RetentionSection
    destinations: tuple[Destination, ...] = ()
    results: ResultsSection = ResultsSection()
    notifications: tuple[Notification, ...] = ()
    worker: WorkerSection = WorkerSection()
    priorities: tuple[PriorityRule, ...] = ()

    @property
    def data_dir(self) -> Path:
        return Path(self.node.data_dir)

    @property
    def node_id(self) -> str:
        """This node in a shared job store: what ``data_dir/node-id`` says (written at the
        first start, so that a renamed host or a moved folder keeps its jobs and
        files), else its host and a digest of its data folder."""
        try:
            saved = (self.data_dir / NODE_ID_FILE).read_text(encoding="utf-8").strip()
        except OSError:
            saved = ""
        if saved:
            return saved[:64]
        folder = str(self.data_dir.absolute().resolve())
        return f"{socket.gethostname()[:48]}:{hashlib.sha256(folder.encode()).hexdigest()[:12]}"


def defaults() -> dict:
    return tomllib.loads(files("config").joinpath(DEFAULT_FILE).read_text(encoding="utf-8"))


# --- loading --------------------------------------------------------------------
def load_config(path: str | os.PathLike | None = None,
                environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Defaults, overlaid by ``path`` (TOML) and then by the environment."""
    merged = defaults()
    origin: dict[str, dict[str, str]] = {section: {} for section in merged}
    from_env: dict[str, set[str]] = {section: set() for section in merged}
    user: dict = {}
    name = ""
    if path is not None:
        p = Path(path)
        name = f"{p}: "
        if not p.is_file():
            raise ConfigError(f"{p}: no such configuration file")
        try:
            user = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML ({exc})") from None
    called = {"http": "http"}           # a section as the file names it, for the errors
    if OLD_HTTP in user:                # [dicomweb], the section's name before [http]
        if "http" in user:
            raise ConfigError(f"{name}[{OLD_HTTP}] and [http] both given: [http] only")
        user["http"], called["http"] = user.pop(OLD_HTTP), OLD_HTTP
    for section, values in user.items():
        if section in ("destinations", "notifications", "priorities"):
            continue
        if section not in SECTIONS or not isinstance(values, dict):
            raise ConfigError(f"{name}unknown section [{section}]")
        known = {f.name for f in fields(SECTIONS[section])}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{name}{called.get(section, section)}.{key}: unknown key")
            merged[section][key] = value
            origin[section][key] = f"{name}{called.get(section, section)}.{key}"
    env = os.environ if environ is None else environ
    for variable, value in sorted(env.items()):   # LUNGSYS_HTTP_* after LUNGSYS_DICOMWEB_*
        if not variable.startswith(ENV_PREFIX):
            continue
        rest = variable[len(ENV_PREFIX):].lower()
        if rest.startswith(OLD_HTTP + "_"):          # LUNGSYS_DICOMWEB_PORT, as before
            rest = "http" + rest[len(OLD_HTTP):]
        for section, cls in SECTIONS.items():
            key = rest[len(section) + 1:]
            if rest.startswith(section + "_") and key in {f.name for f in fields(cls)}:
                merged[section][key] = value
                origin[section][key] = variable
                from_env[section].add(key)
                break
    sections = {s: build_section(cls, merged[s], f"{name}{s}", origin[s], frozenset(from_env[s]))
                for s, cls in SECTIONS.items()}
    raw = user.get("destinations", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{name}destinations: expected [[destinations]] tables")
    destinations = tuple(destination(f"{name}destinations[{i}]", i, d)
                         for i, d in enumerate(raw))
    raw = user.get("notifications", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{name}notifications: expected [[notifications]] tables")
    notifications = tuple(notification(f"{name}notifications[{i}]", i, n)
                          for i, n in enumerate(raw))
    raw = user.get("priorities", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{name}priorities: expected [[priorities]] tables")
    priorities = tuple(priority_rule(f"{name}priorities[{i}]", r) for i, r in enumerate(raw))
    config = NodeConfig(**sections, destinations=destinations, notifications=notifications,
                        priorities=priorities)
    _check_node(config, name)
    return config


def _check_node(config: NodeConfig, name: str) -> None:
    """What no single value says: lengths, networks, files that must exist."""
    node, tls = config.node, config.tls
    if not 0 < len(node.ae_title.strip()) <= 16:
        raise ConfigError(f"{name}node.ae_title: 1 to 16 characters")
    for text in node.allowed_networks:
        try:
            ip_network(text.strip(), strict=False)
        except ValueError:
            raise ConfigError(f"{name}node.allowed_networks: {text!r} is not an IP address "
                              f"or network (CIDR)") from None
    if node.user_identity != UserIdentity.none and not Path(node.users_file).is_file():
        raise ConfigError(f"{name}node.users_file: no such file {node.users_file!r} (needed "
                          f"with user_identity = {node.user_identity})")
    offpeak_hours(f"{name}worker.offpeak_hours", config.worker.offpeak_hours)
    _check_worker(config.worker, name)
    web = config.http
    if bool(web.tls_certificate) != bool(web.tls_private_key):
        raise ConfigError(f"{name}http.tls_certificate and http.tls_private_key: both or "
                          f"neither")
    for key in ("tls_certificate", "tls_private_key"):
        if getattr(web, key) and not Path(getattr(web, key)).is_file():
            raise ConfigError(f"{name}http.{key}: no such file {getattr(web, key)}")
    for path in config.model.choices:
        if not Path(path).is_file():
            raise ConfigError(f"{name}model.choices: no such checkpoint {path}")
    if tls.enabled:
        needed = ["certificate", "private_key"]
        if tls.require_client_certificate:
            needed.append("ca_certificates")
        for key in needed:
            if not getattr(tls, key):
                raise ConfigError(f"{name}tls.{key}: required when tls.enabled is true")
        for key in ("certificate", "private_key", "ca_certificates"):
            value = getattr(tls, key)
            if value and not Path(value).is_file():
                raise ConfigError(f"{name}tls.{key}: no such file {value}")



def _check_worker(worker: WorkerSection, name: str) -> None:
    """A worker over WADO-RS needs the node's address and a token of the worker role."""
    if worker.instances != WorkerInstances.wado:
        return
    if not worker.node_url.startswith(("http://", "https://")):
        raise ConfigError(f"{name}worker.node_url: the node's HTTP service (http://HOST:PORT "
                          f"or https://...) is needed with instances = \"wado\"")
    if not worker.token:
        raise ConfigError(f"{name}worker.token: a token of the worker role is needed with "
                          f"instances = \"wado\" (lungsys tokens create LABEL --role worker)")
    if worker.ca_certificates and not Path(worker.ca_certificates).is_file():
        raise ConfigError(f"{name}worker.ca_certificates: no such file "
                          f"{worker.ca_certificates}")
