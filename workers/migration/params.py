"""Migration parameters: one frozen dataclass, flags as libvirt names them.

Pure: parsing and checking only, so every rule has a unit test.
"""

from __future__ import annotations

import enum
import uuid as uuidlib
from dataclasses import asdict, dataclass, field
from typing import Any

from workers.errors import InvalidInputError, UnsupportedError


class MigrationFlags(enum.IntFlag):
    """libvirt's virDomainMigrateFlags (names and bit values)."""

    LIVE = 1
    PEER2PEER = 2
    TUNNELLED = 4
    PERSIST_DEST = 8
    UNDEFINE_SOURCE = 16
    PAUSED = 32
    NON_SHARED_DISK = 64
    NON_SHARED_INC = 128
    CHANGE_PROTECTION = 256
    UNSAFE = 512
    OFFLINE = 1024
    COMPRESSED = 2048
    ABORT_ON_ERROR = 4096
    AUTO_CONVERGE = 8192
    POSTCOPY = 32768
    TLS = 65536
    PARALLEL = 131072


SUPPORTED_FLAGS = (MigrationFlags.LIVE | MigrationFlags.PEER2PEER | MigrationFlags.TUNNELLED
                   | MigrationFlags.PERSIST_DEST
                   | MigrationFlags.UNDEFINE_SOURCE | MigrationFlags.PAUSED
                   | MigrationFlags.NON_SHARED_DISK | MigrationFlags.NON_SHARED_INC
                   | MigrationFlags.CHANGE_PROTECTION | MigrationFlags.UNSAFE
                   | MigrationFlags.OFFLINE
                   | MigrationFlags.ABORT_ON_ERROR | MigrationFlags.AUTO_CONVERGE
                   | MigrationFlags.POSTCOPY | MigrationFlags.PARALLEL
                   | MigrationFlags.COMPRESSED | MigrationFlags.TLS)

DEFAULT_BANDWIDTH_MIB_S = 0  # 0: as fast as the link goes (QEMU's own default caps at 128)
UNLIMITED_BANDWIDTH_BYTES = 1 << 40
MAX_BANDWIDTH_MIB_S = UNLIMITED_BANDWIDTH_BYTES >> 20  # more would be less than "unlimited"
MAX_DOWNTIME_MS = 2_000_000  # QEMU's largest downtime-limit
STORAGE_FLAGS = MigrationFlags.NON_SHARED_DISK | MigrationFlags.NON_SHARED_INC

DEFAULT_PARALLEL_CONNECTIONS = 2  # libvirt's (and QEMU's multifd-channels default)
MAX_PARALLEL_CONNECTIONS = 255  # QEMU's multifd-channels range is 1..255
#: compression methods as virsh names them -> whether they need --parallel
COMP_METHODS = {"xbzrle": False, "zstd": True, "zlib": True}
#: methods libvirt knows that ferry refuses, and why
COMP_REFUSED = {"mt": "QEMU deprecated the 'compress' capability (8.2) and removed it (9.1)"}
COMP_LEVELS = {"zstd": (0, 20), "zlib": (0, 9)}  # QEMU's multifd-*-level ranges
XBZRLE_MIN_CACHE = 4096  # one page; QEMU wants a power of two no smaller


def parse_qemu_uri(uri: str) -> tuple[str, str, int | None]:
    """('tcp', host, port|None) or ('unix', path, None); anything else is refused.

    Accepts QEMU's form (tcp:HOST:PORT) and libvirt's (tcp://HOST:PORT).
    """
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme not in ("tcp", "unix"):
        raise UnsupportedError(f"migration URI scheme '{scheme}' is not supported "
                               "(tcp: only, unix: for same-machine tests)")
    rest = rest.removeprefix("//")
    if scheme == "unix":
        if not rest.startswith("/"):
            raise InvalidInputError(f"unix migration URI needs an absolute path: {uri}")
        return ("unix", rest, None)
    rest = rest.rstrip("/")
    if rest.startswith("["):
        host, _, port_text = rest[1:].partition("]")
        port_text = port_text.removeprefix(":")
    else:
        host, _, port_text = rest.rpartition(":") if rest.count(":") == 1 else (rest, "", "")
    if not host:
        raise InvalidInputError(f"migration URI has no host: {uri}")
    if not port_text:
        return ("tcp", host, None)
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise InvalidInputError(f"migration URI port is not 1-65535: {uri}")
    return ("tcp", host, int(port_text))


def format_qemu_uri(scheme: str, host: str, port: int | None) -> str:
    if scheme == "unix":
        return f"unix:{host}"
    addr = f"[{host}]" if ":" in host else host
    return f"tcp:{addr}:{port}"


@dataclass(frozen=True)
class MigrationParams:
    """Everything the caller asked for; travels through every phase unchanged."""

    domain: str
    source: str
    dest: str
    flags: int = int(MigrationFlags.LIVE)
    protocol: int = 3
    job_id: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    xmlin: str | None = None
    migrate_uri: str | None = None
    bandwidth_mib_s: int = DEFAULT_BANDWIDTH_MIB_S
    max_downtime_ms: int | None = None
    timeout_s: int | None = None
    # Storage copy (libvirt's migrate_disks and disks_port): the disks to copy (empty:
    # every writable, non-shareable disk with a source) and the dest's NBD port (None:
    # one of its migration range).
    migrate_disks: tuple[str, ...] = ()
    disks_port: int | None = None
    parallel_connections: int | None = None  # None: DEFAULT_PARALLEL_CONNECTIONS
    comp_methods: tuple[str, ...] | None = None  # None: xbzrle if COMPRESSED, else none
    comp_xbzrle_cache: int | None = None  # bytes
    comp_zstd_level: int | None = None
    comp_zlib_level: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.migrate_disks, list):  # from JSON
            object.__setattr__(self, "migrate_disks", tuple(self.migrate_disks))
        if isinstance(self.comp_methods, list | str):  # from JSON, or "zstd,zlib"
            methods = [m.strip() for m in self.comp_methods.split(",")] \
                if isinstance(self.comp_methods, str) else self.comp_methods
            object.__setattr__(self, "comp_methods", tuple(methods))
        self._check_types()
        f = MigrationFlags(self.flags)
        unsupported = f & ~SUPPORTED_FLAGS
        if unsupported:
            names = ", ".join(x.name.lower() for x in MigrationFlags if x & unsupported and x.name)
            raise UnsupportedError(f"migration flags not supported yet: {names}")
        if self.protocol not in (2, 3):
            raise InvalidInputError(f"migration protocol must be 2 or 3, not {self.protocol}")
        if f & MigrationFlags.OFFLINE and not f & MigrationFlags.PERSIST_DEST:
            raise InvalidInputError("offline migration requires persist_dest (--persistent)")
        if f & MigrationFlags.OFFLINE and f & MigrationFlags.LIVE:
            raise InvalidInputError("offline migration cannot be live")
        if f & MigrationFlags.TUNNELLED and not f & MigrationFlags.PEER2PEER:
            raise InvalidInputError("tunnelled migration requires peer-to-peer (--p2p)")
        if f & MigrationFlags.TUNNELLED and self.migrate_uri:
            raise InvalidInputError("a tunnelled migration has no migration URI")
        if f & MigrationFlags.TLS and f & MigrationFlags.TUNNELLED:
            raise InvalidInputError("--tls cannot be used with --tunnelled: a tunnelled stream "
                                    "leaves through the broker, not QEMU's socket (use a "
                                    "rediss:// broker to encrypt it)")
        if f & MigrationFlags.TLS and self.migrate_uri and \
                self.migrate_uri.startswith("unix:"):
            raise InvalidInputError("--tls needs a tcp: migration URI, not unix:")
        if f & MigrationFlags.POSTCOPY and not f & MigrationFlags.LIVE:
            raise InvalidInputError("post-copy migration must be live")
        if f & MigrationFlags.POSTCOPY and f & MigrationFlags.TUNNELLED:
            raise UnsupportedError("post-copy cannot be tunnelled: the dest asks the source "
                                   "for pages on the stream's return path, which the tunnel "
                                   "does not carry")
        if f & MigrationFlags.POSTCOPY and self.protocol == 2:
            raise UnsupportedError("post-copy needs migration protocol v3: the source may go "
                                   "only once the dest has every page (Confirm)")
        if self.protocol == 2 and f & (MigrationFlags.OFFLINE | MigrationFlags.CHANGE_PROTECTION):
            raise InvalidInputError("offline migration and change protection need protocol v3")
        if self.source == self.dest:
            raise InvalidInputError(f"source and destination are the same host '{self.source}'")
        if self.migrate_uri is not None:
            parse_qemu_uri(self.migrate_uri)
        if not 0 <= self.bandwidth_mib_s <= MAX_BANDWIDTH_MIB_S:
            raise InvalidInputError(f"bandwidth must be in 0..{MAX_BANDWIDTH_MIB_S} MiB/s")
        if self.max_downtime_ms is not None and not 0 < self.max_downtime_ms <= MAX_DOWNTIME_MS:
            raise InvalidInputError(f"max downtime must be in 1..{MAX_DOWNTIME_MS} ms")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise InvalidInputError("timeout must be > 0 s")
        self._check_storage(f)
        self._check_parallel()
        self._check_compression()

    def _check_storage(self, f: MigrationFlags) -> None:
        """libvirt's rules for non-shared storage, plus v2 (which has no cookie to carry
        the dest's NBD port)."""
        storage = f & STORAGE_FLAGS
        if not storage:
            if self.migrate_disks or self.disks_port is not None:
                raise InvalidInputError("migrate_disks and disks_port need a storage copy "
                                        "(--copy-storage-all or --copy-storage-inc)")
            return
        if storage == STORAGE_FLAGS:
            raise InvalidInputError("--copy-storage-all and --copy-storage-inc are mutually "
                                    "exclusive")
        if f & MigrationFlags.TUNNELLED:
            raise UnsupportedError("migration of non-shared storage is not supported with "
                                   "tunnelled migration")
        if f & MigrationFlags.OFFLINE:
            raise InvalidInputError("offline migration cannot copy non-shared storage")
        if self.protocol == 2:
            raise UnsupportedError("storage copy needs migration protocol v3: v2 has no "
                                   "cookie to carry the dest's NBD port")
        if len(set(self.migrate_disks)) != len(self.migrate_disks):
            raise InvalidInputError(f"migrate_disks names a disk twice: "
                                    f"{','.join(self.migrate_disks)}")
        if self.disks_port is not None and not 1 <= self.disks_port <= 65535:
            raise InvalidInputError(f"disks_port {self.disks_port} is not in 1-65535")

    @property
    def storage_copy(self) -> bool:
        return bool(self.fl & STORAGE_FLAGS)

    @property
    def storage_inc(self) -> bool:
        """Only the top image is copied (the backing chain is on the dest already)."""
        return self.has(MigrationFlags.NON_SHARED_INC)

    def _check_parallel(self) -> None:
        n = self.parallel_connections
        if n is not None and not self.has(MigrationFlags.PARALLEL):
            raise InvalidInputError("Turn parallel migration on to tune it "
                                    "(--parallel-connections needs --parallel)")
        if n is not None and not 1 <= n <= MAX_PARALLEL_CONNECTIONS:
            raise InvalidInputError(f"parallel connections must be in "
                                    f"1..{MAX_PARALLEL_CONNECTIONS}, not {n}")
        if self.has(MigrationFlags.PARALLEL) and self.has(MigrationFlags.POSTCOPY):
            raise UnsupportedError("post-copy migration with parallel connections is not "
                                   "supported")

    def _check_compression(self) -> None:
        """libvirt's rules (qemuMigrationParamsSetCompression), in libvirt's words."""
        methods = self.comp_methods or ()
        parallel = self.has(MigrationFlags.PARALLEL)
        for i, m in enumerate(methods):
            if m in COMP_REFUSED:
                raise UnsupportedError(f"Compression method '{m}' is not supported: "
                                       f"{COMP_REFUSED[m]}")
            if m not in COMP_METHODS:
                raise InvalidInputError(f"Unsupported compression method '{m}' (one of "
                                        f"{', '.join(COMP_METHODS)})")
            if m in methods[:i]:
                raise InvalidInputError(f"Compression method '{m}' is specified twice")
            if COMP_METHODS[m] and not parallel:
                raise InvalidInputError(f"Compression method '{m}' is only supported with "
                                        "parallel migration (--parallel)")
            if not COMP_METHODS[m] and parallel:
                raise InvalidInputError(f"Compression method '{m}' isn't supported with "
                                        "parallel migration")
        if sum(COMP_METHODS[m] for m in methods) > 1:
            raise InvalidInputError("Only one compression method could be specified with "
                                    "parallel compression")
        if not methods and self.has(MigrationFlags.COMPRESSED) and parallel:
            raise InvalidInputError("No compression algorithm selected for parallel "
                                    "migration (--comp-methods zstd or zlib)")
        self._check_tuning()

    def _check_tuning(self) -> None:
        used = self.compression
        cache = self.comp_xbzrle_cache
        if cache is not None:
            if "xbzrle" not in used:
                raise InvalidInputError("Turn xbzrle compression on to tune it "
                                        "(--comp-xbzrle-cache)")
            if not XBZRLE_MIN_CACHE <= cache <= UNLIMITED_BANDWIDTH_BYTES or cache & (cache - 1):
                raise InvalidInputError(f"xbzrle cache must be a power of two from "
                                        f"{XBZRLE_MIN_CACHE} bytes to 1 TiB, not {cache}")
        for method, (low, high) in COMP_LEVELS.items():
            level = getattr(self, f"comp_{method}_level")
            if level is None:
                continue
            if method not in used:
                raise InvalidInputError(f"Turn {method} compression on to tune it "
                                        f"(--comp-{method}-level)")
            if not low <= level <= high:
                raise InvalidInputError(f"{method} level must be in {low}..{high}, not {level}")

    @property
    def compression(self) -> tuple[str, ...]:
        """The methods in use: those named, or xbzrle for a bare --compressed (libvirt)."""
        if self.comp_methods:
            return self.comp_methods
        return ("xbzrle",) if self.has(MigrationFlags.COMPRESSED) else ()

    @property
    def channels(self) -> int:
        """QEMU multifd channels; 0 without --parallel."""
        if not self.has(MigrationFlags.PARALLEL):
            return 0
        return self.parallel_connections or DEFAULT_PARALLEL_CONNECTIONS

    def _check_types(self) -> None:
        """Messages come from anywhere (send_task): wrong types are a clear error."""
        for name in ("domain", "source", "dest", "job_id"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InvalidInputError(f"migration parameter '{name}' must be a non-empty "
                                        "string")
        for name in ("flags", "protocol", "bandwidth_mib_s"):
            if type(getattr(self, name)) is not int:
                raise InvalidInputError(f"migration parameter '{name}' must be an integer")
        for name in ("max_downtime_ms", "timeout_s", "disks_port", "parallel_connections",
                     "comp_xbzrle_cache", "comp_zstd_level", "comp_zlib_level"):
            value = getattr(self, name)
            if value is not None and type(value) is not int:
                raise InvalidInputError(f"migration parameter '{name}' must be an integer")
        for name in ("xmlin", "migrate_uri"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InvalidInputError(f"migration parameter '{name}' must be a string")
        if self.flags < 0:
            raise InvalidInputError("migration flags must be >= 0")
        if not isinstance(self.migrate_disks, tuple) or not all(
                isinstance(t, str) and t for t in self.migrate_disks):
            raise InvalidInputError("migration parameter 'migrate_disks' must be a list of "
                                    "disk targets")
        methods = self.comp_methods
        if methods is not None and not (isinstance(methods, tuple)
                                        and all(isinstance(m, str) for m in methods)):
            raise InvalidInputError("migration parameter 'comp_methods' must be a list of "
                                    "strings")

    @property
    def fl(self) -> MigrationFlags:
        return MigrationFlags(self.flags)

    def has(self, flag: MigrationFlags) -> bool:
        return bool(self.fl & flag)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.comp_methods is not None:
            data["comp_methods"] = list(self.comp_methods)
        return data

    @classmethod
    def from_json(cls, data: Any) -> MigrationParams:
        if not isinstance(data, dict):
            raise InvalidInputError("migration parameters must be a JSON object")
        missing = [k for k in ("domain", "source", "dest") if k not in data]
        if missing:
            raise InvalidInputError(f"migration parameters lack {', '.join(missing)}")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def flag_names(self) -> list[str]:
        return [f.name.lower() for f in MigrationFlags if f & self.fl and f.name]
