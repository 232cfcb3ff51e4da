"""Typed settings from FERRY_* environment variables, read once.

Each setting has a default, bounds and one line of help; a parser's docstring
says what it accepts.  docs/settings.md is generated from these declarations
(`python -m scripts.devtools.settings_doc`).  `load()` reads the environment
(or a mapping given by tests) and returns a frozen `Settings`; nothing else
in ferry reads the environment.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from config.errors import InvalidInputError
from config.sentinel import check_broker_url


# Named tuples, not dataclasses: the `ferry` command reads its settings at every start,
# and `dataclasses` (with `inspect`) and a 45-field dataclass cost it ~10 ms.
class Spec(NamedTuple):
    """One setting: its environment name, parser, default, bounds and help."""

    name: str
    parse: Callable[[str], Any]
    default: Callable[[], Any]
    help: str
    low: int | None = None
    high: int | None = None


def _bool(text: str) -> bool:
    """1/true/yes/on or 0/false/no/off/empty, any case."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _port_range(text: str) -> tuple[int, int]:
    """LOW-HIGH, within 1-65535."""
    low, sep, high = text.partition("-")
    if not sep:
        raise ValueError(f"not a port range LOW-HIGH: {text!r}")
    lo, hi = int(low), int(high)
    if not (1 <= lo <= hi <= 65535):
        raise ValueError(f"port range out of 1-65535 or reversed: {text!r}")
    return (lo, hi)


def _uuid(text: str) -> str:
    """a UUID."""
    import uuid  # start-up: the `ferry` command reads settings without it

    return str(uuid.UUID(text))


def _optional_path(text: str) -> Path | None:
    """an absolute path, or empty."""
    if not text:
        return None
    path = Path(text)
    if not path.is_absolute():
        raise ValueError(f"not an absolute path: {text!r}")
    return path


def _networks(text: str) -> dict[str, str]:
    """NAME=BRIDGE pairs, ','-separated."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, bridge = part.partition("=")
        if not sep or not name.strip() or not bridge.strip():
            raise ValueError(f"not NAME=BRIDGE: {part!r}")
        out[name.strip()] = bridge.strip()
    return out


def _names(text: str) -> tuple[str, ...]:
    """names, ','-separated."""
    return tuple(sorted({p.strip() for p in text.split(",") if p.strip()}))


def _dirs(text: str) -> tuple[Path, ...]:
    """absolute directories, ':'-separated."""
    dirs = tuple(Path(part) for part in text.split(":") if part.strip())
    for d in dirs:
        if not d.is_absolute():
            raise ValueError(f"not an absolute directory: {str(d)!r}")
    return dirs


def _migration_tls(text: str) -> str:
    """optional or required."""
    if text not in ("optional", "required"):
        raise ValueError(f"must be 'optional' or 'required', not {text!r}")
    return text


def _name(text: str) -> str:
    """any non-empty name (blanks around it are dropped)."""
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _lock_manager(text: str) -> str:
    """redis or none."""
    if text not in ("redis", "none"):
        raise ValueError(f"lock manager must be 'redis' or 'none', not {text!r}")
    return text


SPECS: tuple[Spec, ...] = (
    Spec("broker_url", check_broker_url, lambda: "redis://127.0.0.1:6379/0",
         "Redis URL of the Celery broker, result backend and job records (redis://, "
         "rediss://, or sentinel://HOST:PORT;sentinel://... for Redis Sentinel)"),
    Spec("sentinel_master", _name, lambda: "ferry",
         "name of the master the sentinels of a sentinel:// broker URL monitor"),
    Spec("sentinel_password", str, lambda: "",
         "password of the sentinels themselves (the URL's password is the master's)"),
    Spec("replica_wait_ms", int, lambda: 1000,
         "Sentinel broker: how long a lease, Finish claim or phase change waits for a "
         "replica to acknowledge it before it counts as failed", 10, 60000),
    Spec("redis_ca", _optional_path, lambda: None,
         "CA file that verifies a rediss:// broker (default: the system's CAs); with a "
         "sentinel:// URL it turns TLS on, to the sentinels and the master"),
    Spec("redis_cert", _optional_path, lambda: None,
         "client certificate for a rediss:// broker that asks for one"),
    Spec("redis_key", _optional_path, lambda: None, "private key of FERRY_REDIS_CERT"),
    Spec("signing_key", _optional_path, lambda: None,
         "private key that signs task messages (Celery's auth serializer); empty: off"),
    Spec("signing_cert", _optional_path, lambda: None, "certificate of FERRY_SIGNING_KEY"),
    Spec("signing_cert_store", _optional_path, lambda: None,
         "directory of the certificates whose signed task messages are accepted"),
    Spec("host", str, socket.gethostname, "name of this host; its queue is host.<name>"),
    Spec("host_uuid", _uuid, lambda: "", "host UUID; default: stored in the state dir"),
    Spec("state_dir", Path, lambda: Path("/var/lib/ferry"),
         "where definitions, status files, sockets and logs of this host live"),
    Spec("migration_address", str, lambda: "127.0.0.1",
         "address incoming migrations listen on and peers connect to"),
    Spec("migration_ports", _port_range, lambda: (49152, 49215),
         "port range for incoming migration streams"),
    Spec("tls_dir", _optional_path, lambda: None,
         "this host's migration TLS files (ca-cert.pem, server-*.pem, client-*.pem); "
         "empty: <state dir>/pki"),
    Spec("migration_tls", _migration_tls, lambda: "optional",
         "optional or required: required refuses migrations in or out without --tls"),
    Spec("migration_tls_priority", str, lambda: "",
         "GnuTLS priority string of migration TLS (empty: QEMU's default, TLS 1.3 AES-256-GCM)"),
    Spec("qemu_user", str, lambda: "ferry-qemu",
         "user QEMU runs as (make setup creates ferry-qemu); empty or root: as the worker"),
    Spec("qemu_group", str, lambda: "",
         "group QEMU runs as (empty: the user's own); the group of /dev/kvm is added"),
    Spec("qemu_sandbox", _bool, lambda: True,
         "start QEMU with its seccomp sandbox (-sandbox on,spawn=deny,...)"),
    Spec("graphics_ports", _port_range, lambda: (5900, 6099),
         "port range for VNC and SPICE autoport"),
    Spec("allowed_dirs", _dirs, tuple,
         "':'-separated directories disks, serial files and images must be in (empty: any)"),
    Spec("networks", _networks, dict,
         "libvirt network names this host maps to its bridges, e.g. default=br0,lab=br1"),
    Spec("nvram_dir", _optional_path, lambda: None,
         "where a UEFI guest's NVRAM goes when its <nvram> names no file (default: "
         "<state-dir>/nvram; shared storage, or a storage copy, to migrate)"),
    Spec("cpu_hide_features", _names, tuple,
         "CPU features this host treats as missing: a guest CPU needing one is refused "
         "here (a pool kept to a common baseline; tests)"),
    Spec("allow_qemu_commandline", _bool, lambda: False,
         "accept <qemu:commandline> passthrough in domain XML"),
    Spec("lock_manager", _lock_manager, lambda: "redis", "lease manager: redis or none"),
    Spec("heartbeat_interval_ms", int, lambda: 2000,
         "how often a worker refreshes its host record", 100, 60000),
    Spec("heartbeat_ttl_ms", int, lambda: 6000,
         "how long a host record lives without a refresh", 300, 600000),
    Spec("task_timeout_s", int, lambda: 60,
         "how long a client waits for a host's reply to a short task", 1, 3600),
    Spec("cli_fast_path", _bool, lambda: True,
         "the `ferry` command sends its tasks with a small client of its own, not Celery's "
         "(~0.3 s sooner); it uses Celery's anyway where that client would differ"),
    Spec("worker_concurrency", int, lambda: 8,
         "task threads per worker (a migration holds one for its length)", 2, 64),
    Spec("max_guest_memory_mib", int, lambda: 1024 * 1024,
         "largest guest memory accepted in a definition", 16, 16 * 1024 * 1024),
    Spec("qemu_start_timeout_s", int, lambda: 30,
         "how long to wait for a new QEMU's monitor", 1, 600),
    Spec("log_level", str, lambda: "INFO", "worker log level (DEBUG logs every QMP message)"),
    Spec("failpoints", str, lambda: "",
         "test-only failure points: name=raise|kill|hang|slow|bad-arg|pause,..."),
    Spec("failpoint_dir", str, lambda: "",
         "test-only: failpoints armed at run time by files named after them in this dir"),
    Spec("downtime_ms", int, lambda: 500,
         "largest downtime the downtime schedule raises to (Nova's default)", 10, 60000),
    Spec("downtime_steps", int, lambda: 10, "steps of the downtime schedule", 1, 100),
    Spec("downtime_delay_s", int, lambda: 75,
         "seconds between downtime steps, per GiB of guest memory", 1, 3600),
    Spec("signal_timeout_ms", int, lambda: 5000,
         "how long a job signal waits for the job owner's reply", 50, 120000),
    Spec("max_outgoing_migrations", int, lambda: 2,
         "migrations a host sends at once; more wait their turn in order", 1, 64),
    Spec("max_incoming_migrations", int, lambda: 4,
         "migrations a host receives at once; more wait their turn in order", 1, 64),
    Spec("max_pair_migrations", int, lambda: 2,
         "migrations between one source and one dest at once; more wait in order", 1, 64),
    Spec("lease_ttl_ms", int, lambda: 15000,
         "how long a lease outlives its host's last renewal", 1000, 600000),
    Spec("tunnel_window_mib", int, lambda: 4,
         "largest unacknowledged data of one tunnelled migration in Redis", 1, 256),
    Spec("tunnel_chunk_kib", int, lambda: 1024, "chunk size of tunnelled streams", 16, 16384),
    Spec("broker_retry_s", int, lambda: 5,
         "how long a worker retries a Redis command while the broker is away (0: never)",
         0, 300),
    Spec("p2p_timeout_s", int, lambda: 120,
         "how long a peer-to-peer source waits for each dest phase", 5, 3600),
    Spec("migration_stall_timeout_s", int, lambda: 30,
         "seconds an outgoing migration may send nothing before it is cancelled (0: never)",
         0, 3600),
    Spec("storage_resumable", _bool, lambda: True,
         "bulk-copy disks (--copy-storage-all) by backup rounds from a local snapshot with "
         "a dirty bitmap, so a retried copy sends only what changed (0: mirror only)",
         None, None),
    Spec("storage_retry_keep_s", int, lambda: 600,
         "seconds the dest keeps the partial image of an interrupted storage copy so that a "
         "retry copies only what changed (0: never)", 0, 86400),
    Spec("sweep_interval_s", int, lambda: 30,
         "how often the sweeper looks for incoming guests whose job ended elsewhere and "
         "for the halves of a job a crash separated", 1, 3600),
    Spec("sweep_grace_s", int, lambda: 30,
         "how old a job must be before the sweeper takes a missing record or guest as lost",
         1, 3600),
    Spec("incoming_timeout_s", int, lambda: 60,
         "how long Finish waits for the incoming stream to complete", 1, 3600),
)


class Settings(NamedTuple):
    broker_url: str
    sentinel_master: str
    sentinel_password: str
    replica_wait_ms: int
    redis_ca: Path | None
    redis_cert: Path | None
    redis_key: Path | None
    signing_key: Path | None
    signing_cert: Path | None
    signing_cert_store: Path | None
    host: str
    host_uuid: str
    state_dir: Path
    migration_address: str
    migration_ports: tuple[int, int]
    tls_dir: Path | None
    migration_tls: str
    migration_tls_priority: str
    qemu_user: str
    qemu_group: str
    qemu_sandbox: bool
    graphics_ports: tuple[int, int]
    allowed_dirs: tuple[Path, ...]
    networks: dict[str, str]
    nvram_dir: Path | None
    cpu_hide_features: tuple[str, ...]
    allow_qemu_commandline: bool
    lock_manager: str
    heartbeat_interval_ms: int
    heartbeat_ttl_ms: int
    task_timeout_s: int
    cli_fast_path: bool
    worker_concurrency: int
    max_guest_memory_mib: int
    qemu_start_timeout_s: int
    log_level: str
    failpoints: str
    failpoint_dir: str
    downtime_ms: int
    downtime_steps: int
    downtime_delay_s: int
    signal_timeout_ms: int
    max_outgoing_migrations: int
    max_incoming_migrations: int
    max_pair_migrations: int
    lease_ttl_ms: int
    tunnel_window_mib: int
    tunnel_chunk_kib: int
    broker_retry_s: int
    p2p_timeout_s: int
    incoming_timeout_s: int
    migration_stall_timeout_s: int
    storage_resumable: bool
    storage_retry_keep_s: int
    sweep_interval_s: int
    sweep_grace_s: int
    extra: Mapping[str, str] = MappingProxyType({})

    def replace(self, **changes: Any) -> Settings:
        return self._replace(**changes)

    @property
    def pki_dir(self) -> Path:
        """Where this host's migration TLS files are: FERRY_TLS_DIR or <state dir>/pki."""
        return self.tls_dir or self.state_dir / "pki"


def load(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from `env` (default: os.environ) with `overrides` (e.g. worker flags) on top."""
    source = os.environ if env is None else env
    values: dict[str, Any] = {}
    for spec in SPECS:
        if spec.name in overrides and overrides[spec.name] is not None:
            values[spec.name] = overrides[spec.name]
            continue
        raw = source.get(f"FERRY_{spec.name.upper()}")
        values[spec.name] = spec.default() if raw is None else _parse(spec, raw)
    for spec in SPECS:
        _check_bounds(spec, values[spec.name])
    values["state_dir"] = Path(values["state_dir"])
    return Settings(**values)


def _parse(spec: Spec, raw: str) -> Any:
    try:
        return spec.parse(raw)
    except ValueError as exc:
        raise InvalidInputError(f"FERRY_{spec.name.upper()}: {exc}") from None


def _check_bounds(spec: Spec, value: Any) -> None:
    if spec.low is not None and value < spec.low:
        raise InvalidInputError(f"FERRY_{spec.name.upper()}={value} is below {spec.low}")
    if spec.high is not None and value > spec.high:
        raise InvalidInputError(f"FERRY_{spec.name.upper()}={value} is above {spec.high}")


def describe() -> str:
    """One line per setting, for `ferry worker --help`."""
    return "\n".join(f"FERRY_{s.name.upper():<28} {s.help}" for s in SPECS)
