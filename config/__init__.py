"""The node's configuration: documented defaults, a TOML file, the environment.

``config/default.toml`` (shipped with the package) documents every key and
holds its default. :func:`load_config` overlays a user's TOML file and then
``LUNGSYS_<SECTION>_<KEY>`` environment variables, checks every value and
returns a typed :class:`NodeConfig`. Unknown keys and bad values are errors
with the key's name, so a typo never passes silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tomllib
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Mapping

DEFAULT_FILE = "default.toml"
#: In the data folder: the node's identity in a shared job store.
NODE_ID_FILE = "node-id"
ENV_PREFIX = "LUNGSYS_"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


@dataclass(frozen=True)
class Destination:
    name: str
    kind: str                 # "dimse" or "dicomweb"
    ae_title: str = ""
    host: str = ""
    port: int = 0
    url: str = ""
    tls: bool = False
    ca_certificates: str = ""
    certificate: str = ""
    private_key: str = ""


@dataclass(frozen=True)
class NodeConfig:
    node: Mapping[str, Any]
    tls: Mapping[str, Any]
    dicomweb: Mapping[str, Any]
    store: Mapping[str, Any]
    assembly: Mapping[str, Any]
    model: Mapping[str, Any]
    delivery: Mapping[str, Any]
    retention: Mapping[str, Any]
    destinations: tuple[Destination, ...] = field(default_factory=tuple)

    @property
    def data_dir(self) -> Path:
        return Path(self.node["data_dir"])

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


def _coerce(key: str, default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if isinstance(default, int):
        try:
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if isinstance(default, list):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected text, got {value!r}")
    return value


def _destination(i: int, raw: Mapping[str, Any]) -> Destination:
    where = f"destinations[{i}]"
    allowed = {"name", "kind", "ae_title", "host", "port", "url", "tls", "ca_certificates",
               "certificate", "private_key"}
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    kind = raw.get("kind")
    if kind not in ("dimse", "dicomweb"):
        raise ConfigError(f"{where}.kind: expected dimse or dicomweb, got {kind!r}")
    name = str(raw.get("name") or f"destination-{i + 1}")
    if kind == "dimse":
        for key in ("ae_title", "host", "port"):
            if not raw.get(key):
                raise ConfigError(f"{where}.{key}: required for a dimse destination")
        tls = {key: _coerce(f"{where}.{key}", "", raw.get(key, ""))
               for key in ("ca_certificates", "certificate", "private_key")}
        for key, value in tls.items():
            if value and not Path(value).is_file():
                raise ConfigError(f"{where}.{key}: no such file {value}")
        return Destination(name, kind, str(raw["ae_title"]), str(raw["host"]),
                           _coerce(f"{where}.port", 0, raw["port"]),
                           tls=_coerce(f"{where}.tls", False, raw.get("tls", False)), **tls)
    if not raw.get("url"):
        raise ConfigError(f"{where}.url: required for a dicomweb destination")
    return Destination(name, kind, url=str(raw["url"]))


def load_config(path: str | os.PathLike | None = None,
                environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Defaults, overlaid by ``path`` (TOML) and then by the environment."""
    merged = defaults()
    user: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such configuration file")
        try:
            user = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML ({exc})") from None
    for section, values in user.items():
        if section == "destinations":
            continue
        if section not in merged or not isinstance(values, dict):
            raise ConfigError(f"unknown section [{section}]")
        for key, value in values.items():
            if key not in merged[section]:
                raise ConfigError(f"{section}.{key}: unknown key")
            merged[section][key] = _coerce(f"{section}.{key}", merged[section][key], value)
    env = os.environ if environ is None else environ
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        for section in merged:
            if rest.startswith(section + "_") and isinstance(merged[section], dict):
                key = rest[len(section) + 1:]
                if key in merged[section]:
                    merged[section][key] = _coerce(name, merged[section][key], value)
                    break
    node = merged["node"]
    if not 0 < len(node["ae_title"]) <= 16:
        raise ConfigError("node.ae_title: 1 to 16 characters")
    if not 0 < node["port"] < 65536:
        raise ConfigError("node.port: 1 to 65535")
    if not 0 <= merged["dicomweb"]["port"] < 65536:
        raise ConfigError("dicomweb.port: 1 to 65535, or 0 for no STOW-RS receiver")
    if merged["assembly"]["stable_seconds"] <= 0 and not isinstance(
            merged["assembly"]["stable_seconds"], bool):
        raise ConfigError("assembly.stable_seconds: must be positive")
    _check_security(node, merged["tls"])
    if merged["model"]["method"] not in ("network", "nonparametric"):
        raise ConfigError("model.method: network or nonparametric")
    if merged["model"]["heatmaps"] not in ("lesion", "all", "none"):
        raise ConfigError("model.heatmaps: lesion, all or none")
    destinations = tuple(_destination(i, d) for i, d in enumerate(user.get("destinations", [])))
    return NodeConfig(node=node, tls=merged["tls"], dicomweb=merged["dicomweb"],
                      store=merged["store"], assembly=merged["assembly"],
                      model=merged["model"], delivery=merged["delivery"],
                      retention=merged["retention"], destinations=destinations)


def _check_security(node: Mapping[str, Any], tls: Mapping[str, Any]) -> None:
    """The keys of the front door: networks, limits, user identity, TLS files."""
    from ipaddress import ip_network

    for text in node["allowed_networks"]:
        try:
            ip_network(text.strip(), strict=False)
        except ValueError:
            raise ConfigError(f"node.allowed_networks: {text!r} is not an IP address or "
                              f"network (CIDR)") from None
    for key in ("max_associations", "max_unassociated", "max_unassociated_per_peer",
                "timeout_seconds"):
        if node[key] < 1:
            raise ConfigError(f"node.{key}: must be at least 1")
    if node["user_identity"] not in ("none", "optional", "required"):
        raise ConfigError("node.user_identity: none, optional or required")
    if node["user_identity"] != "none" and not Path(node["users_file"]).is_file():
        raise ConfigError(f"node.users_file: no such file {node['users_file']!r} (needed "
                          f"with user_identity = {node['user_identity']})")
    if tls["profile"] not in ("bcp195", "tls13"):
        raise ConfigError("tls.profile: bcp195 or tls13")
    if tls["enabled"]:
        needed = ["certificate", "private_key"]
        if tls["require_client_certificate"]:
            needed.append("ca_certificates")
        for key in needed:
            if not tls[key]:
                raise ConfigError(f"tls.{key}: required when tls.enabled is true")
        for key in ("certificate", "private_key", "ca_certificates"):
            if tls[key] and not Path(tls[key]).is_file():
                raise ConfigError(f"tls.{key}: no such file {tls[key]}")
