"""libvirt's ``<qemu-migration>`` migration cookie (src/qemu/qemu_migration_cookie.c).

Decisions:

- Understood: identity (name, uuid, hostname, hostuuid), ``<feature>``,
  ``<graphics>``, ``<lockstate>``, ``<domain>`` (kept as XML text, not
  modelled), ``<nbd>`` and ``<statistics>``.  Anything else (network, cpu,
  allowReboot, capabilities, blockDirtyBitmaps, unknown or namespaced
  elements, unknown statistics) is skipped, unless named by a ``<feature>``:
  an unsupported mandatory feature is an UnsupportedError naming it.
- Safety: at most MAX_COOKIE_BYTES of UTF-8, no NUL, DOCTYPE/ENTITY refused
  before lxml sees it; no entity resolution, DTD or network.  A known element
  twice (two ``<uuid>``) is refused as ambiguous.
- Bad input is InvalidInputError; a cookie too large to write, or a cookie
  from the receiving host itself, is MigrationError.
- Statistics mirror libvirt's ``*_set`` flags: fields libvirt always writes
  are ints (0 when absent), fields it writes only when known may be None.
- ``<nbd port='N'><disk target='vda' capacity='N'/></nbd>`` is libvirt's (the port
  only when non-zero).  ferry adds attributes to ``<disk>`` that libvirt's parser
  ignores: ``format``, ``clusterSize``, ``backingFile``, ``backingFormat`` and
  ``allocation`` (bytes the copy needs), what the dest needs to create the image, and
  ``resume`` (the interrupted copy a retry continues: storage_resume.py).
- ``persistent`` is stored canonically (whitespace between elements dropped,
  not re-indented: the limit is on the bytes received), so
  ``parse(c.to_xml()) == c`` for every valid Cookie.  `to_xml` indents the
  domain like libvirt unless that alone would break the limit.
"""

from __future__ import annotations

import copy
import re
import uuid as uuidlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from lxml import etree

from workers.errors import InvalidInputError, MigrationError, UnsupportedError, one_line

MAX_COOKIE_BYTES = 16384
#: libvirt's qemuMigrationCookieFlag names, in libvirt's (and the ``<feature>`` lines') order
LIBVIRT_FEATURES = (
    "graphics", "lockstate", "persistent", "network", "nbd", "statistics", "memory-hotplug",
    "cpu-hotplug", "cpu", "allowReboot", "capabilities", "block-dirty-bitmaps",
)
SUPPORTED_FEATURES = frozenset({"graphics", "lockstate", "persistent", "nbd", "statistics"})

_UUID_RE = re.compile(r"[0-9a-fA-F]{8}(-?[0-9a-fA-F]{4}){3}-?[0-9a-fA-F]{12}")
_NOT_XML_CHAR = re.compile(r"[^\t\n\r\x20-\uD7FF\uE000-\uFFFD\U00010000-\U0010FFFF]")
_DECLARATION = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
_INT_RE = re.compile(r"[+-]?[0-9]+")
_U64 = (0, 2**64 - 1)
_MAX_DIGITS = len(str(2**64))  # longer than any value in range once leading zeros are gone
#: statistics that are not unsigned 64-bit (libvirt: long long delta, int throttle)
_STAT_RANGES = {"delta": (-(2**63), 2**63 - 1), "auto_converge_throttle": (-(2**31), 2**31 - 1)}

Kids = dict[str, list[etree._Element]]


def quoted(value: object, limit: int = 64) -> str:
    """A value quoted for a one-line message, cut if long."""
    text = str(value)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _uuid(value: object, what: str) -> str:
    if not isinstance(value, str) or not _UUID_RE.fullmatch(value.strip()):
        raise InvalidInputError(f"migration cookie {what} {quoted(value)} is not a valid UUID")
    return str(uuidlib.UUID(value.strip()))


def _check_text(value: object, what: str, *, empty_ok: bool = False) -> None:
    if not isinstance(value, str) or (not empty_ok and not value.strip()):
        raise InvalidInputError(f"migration cookie {what} is missing or empty")
    if _NOT_XML_CHAR.search(value):
        raise InvalidInputError(f"migration cookie {what} {quoted(value)} has characters "
                                f"XML cannot hold")


def _check_int(value: object, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidInputError(f"migration cookie {what} {quoted(value)} is not an integer "
                                f"in {lo}..{hi}")
    return value


def _parse_int(text: str | None, what: str, lo: int, hi: int) -> int:
    text = (text or "").strip()
    if not _INT_RE.fullmatch(text):
        raise InvalidInputError(f"migration cookie {what} {quoted(text)} is not an integer")
    sign, digits = ("-" if text[0] == "-" else ""), text.lstrip("+-").lstrip("0") or "0"
    if len(digits) > _MAX_DIGITS:  # before int(): Python refuses over 4300 digits itself
        raise InvalidInputError(f"migration cookie {what} {quoted(text)} is not an integer "
                                f"in {lo}..{hi}")
    return _check_int(int(sign + digits), what, lo, hi)


def _check_features(names: Iterable[str]) -> tuple[str, ...]:
    """Mandatory features in libvirt's order, or an error naming the unsupported ones."""
    names = list(dict.fromkeys(names))
    bad = [n for n in names if n not in SUPPORTED_FEATURES]
    if bad:
        also = f" (also {', '.join(quoted(n) for n in bad[1:])})" if bad[1:] else ""
        raise UnsupportedError(f"unsupported migration cookie feature {quoted(bad[0])}{also}")
    return tuple(sorted(names, key=LIBVIRT_FEATURES.index))


def _load(xml: str | bytes, what: str, root_tag: str) -> etree._Element:
    """Parse untrusted XML safely; its root must be <root_tag>."""
    data = xml.encode("utf-8") if isinstance(xml, str) else bytes(xml)
    if len(data) > MAX_COOKIE_BYTES:
        raise InvalidInputError(f"{what} is {len(data)} bytes, more than the limit of "
                                f"{MAX_COOKIE_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError(f"{what} is not UTF-8") from None
    if "\x00" in text:
        raise InvalidInputError(f"{what} contains a NUL character")
    if _DECLARATION.search(text):
        raise InvalidInputError(f"{what} has a DOCTYPE or entity declaration, which is refused")
    parser = etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
        huge_tree=False, remove_comments=True, remove_pis=True, encoding="utf-8",
    )
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise InvalidInputError(one_line(f"malformed {what}: {exc}")) from None
    if root.getroottree().docinfo.internalDTD is not None:  # belt and braces
        raise InvalidInputError(f"{what} has a DOCTYPE or entity declaration, which is refused")
    if root.tag != root_tag:
        raise InvalidInputError(f"not a {what}: the root element is <{quoted(root.tag)[1:-1]}>, "
                                f"not <{root_tag}>")
    return root


def _canonical_domain(el: etree._Element) -> str:
    """The ``<domain>`` element as stable text: no whitespace-only text between elements.

    Not re-indented: indentation grows with depth squared, so a small cookie
    with deeply nested ``<metadata>`` would come out many times its size and be
    refused for bytes it never had.  The canonical text is never longer than
    what was received.
    """
    el = copy.deepcopy(el)
    el.tail = None
    for node in el.iter():
        if len(node) and node.text is not None and not node.text.strip():
            node.text = None
        if node is not el and node.tail is not None and not node.tail.strip():
            node.tail = None
    return etree.tostring(el, encoding="unicode")


def _domain(xml: str) -> etree._Element:
    return _load(xml, "persistent domain definition", "domain")


@dataclass(frozen=True)
class CookieGraphics:
    """Where the destination's graphics listen, for client relocation."""

    type: Literal["spice", "vnc"]
    port: int
    tls_port: int  # -1: none; always -1 for vnc (libvirt writes tlsPort for spice only)
    listen: str
    tls_subject: str | None = None

    def __post_init__(self) -> None:
        if self.type not in ("spice", "vnc"):
            raise UnsupportedError(f"migration cookie graphics type {quoted(self.type)} is not "
                                   f"supported (spice or vnc)")
        _check_int(self.port, "graphics port", -1, 65535)
        _check_int(self.tls_port, "graphics tlsPort", -1, 65535)
        if self.type == "vnc" and self.tls_port != -1:
            raise InvalidInputError("migration cookie vnc graphics have no tlsPort (use -1)")
        _check_text(self.listen, "graphics listen address")
        if not self.tls_subject:
            object.__setattr__(self, "tls_subject", None)
        else:
            _check_text(self.tls_subject, "graphics TLS subject")


@dataclass(frozen=True)
class CookieLockstate:
    """The lock manager's name and the guest's leases, handed from source to dest."""

    driver: str
    leases: str = ""

    def __post_init__(self) -> None:
        _check_text(self.driver, "lockstate driver")
        _check_text(self.leases, "lockstate leases", empty_ok=True)


_DISK_FORMATS = ("raw", "qcow2")
_NBD_ATTRS = (("format", "format"), ("cluster_size", "clusterSize"),
              ("backing_file", "backingFile"), ("backing_format", "backingFormat"),
              ("allocation", "allocation"), ("resume", "resume"))


@dataclass(frozen=True)
class CookieNbdDisk:
    """One disk of ``<nbd>``: its target and virtual size (libvirt's), and what the dest
    needs to create its image (ferry's; None: not sent)."""

    target: str
    capacity: int
    format: str | None = None
    cluster_size: int | None = None
    backing_file: str | None = None  # as the source image names it (may be relative)
    backing_format: str | None = None
    allocation: int | None = None
    # the interrupted copy (attempt id) a retry resumes: Begin's says the source holds
    # its dirty bitmap, Prepare's that the dest kept its partial image
    resume: str | None = None

    def __post_init__(self) -> None:
        _check_text(self.target, "nbd disk target")
        _check_int(self.capacity, f"nbd disk {self.target} capacity", *_U64)
        for fmt in (self.format, self.backing_format):
            if fmt is not None and fmt not in _DISK_FORMATS:
                raise InvalidInputError(f"migration cookie nbd disk {self.target} format "
                                        f"{quoted(fmt)} is not raw or qcow2")
        for name in ("cluster_size", "allocation"):
            if (value := getattr(self, name)) is not None:
                _check_int(value, f"nbd disk {self.target} {name}", *_U64)
        if self.backing_file is not None:
            _check_text(self.backing_file, f"nbd disk {self.target} backingFile")
        if self.resume is not None:
            _check_text(self.resume, f"nbd disk {self.target} resume")


@dataclass(frozen=True)
class CookieNbd:
    """libvirt's ``<nbd>``: the dest's NBD port (0: none, as in Begin's and Perform's
    cookies) and the disks copied."""

    port: int = 0
    disks: tuple[CookieNbdDisk, ...] = ()

    def __post_init__(self) -> None:
        _check_int(self.port, "nbd port", 0, 65535)
        object.__setattr__(self, "disks", tuple(self.disks))
        targets = [d.target for d in self.disks]
        if len(set(targets)) != len(targets):
            raise InvalidInputError(f"migration cookie nbd names a disk twice: "
                                    f"{quoted(','.join(targets))}")

    def disk(self, target: str) -> CookieNbdDisk | None:
        return next((d for d in self.disks if d.target == target), None)


@dataclass(frozen=True)
class CookieStatistics:
    """A completed job's statistics; field names and order are libvirt's elements.

    Times ms (started/stopped/sent: epoch ms), sizes bytes, rates bytes/s
    (memory_dirty_rate: pages/s).  None: not known, not written.
    """

    started: int = 0
    stopped: int = 0
    sent: int = 0
    delta: int | None = None
    time_elapsed: int = 0
    downtime: int | None = None
    setup_time: int | None = None
    memory_total: int = 0
    memory_processed: int = 0
    memory_remaining: int = 0
    memory_bps: int = 0
    memory_constant: int | None = None
    memory_normal: int | None = None
    memory_normal_bytes: int | None = None
    memory_dirty_rate: int = 0
    memory_iteration: int = 0
    memory_postcopy_requests: int = 0
    memory_page_size: int = 0
    disk_total: int = 0
    disk_processed: int = 0
    disk_remaining: int = 0
    disk_bps: int = 0
    compression_cache: int | None = None
    compression_bytes: int | None = None
    compression_pages: int | None = None
    compression_cache_misses: int | None = None
    compression_overflow: int | None = None
    auto_converge_throttle: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None or f.default is not None:
                _check_int(value, f"<statistics><{f.name}>", *_STAT_RANGES.get(f.name, _U64))

    def as_dict(self) -> dict[str, int]:
        """libvirt's element names to values, in libvirt's order, without unknown ones."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CookieStatistics:
        """Inverse of `as_dict` (e.g. from a job record); unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Cookie:
    """One ``<qemu-migration>`` cookie: the sender's identity and the sections it holds."""

    name: str
    uuid: str
    hostname: str
    hostuuid: str
    features: tuple[str, ...] = ()  # mandatory features
    graphics: CookieGraphics | None = None
    lockstate: CookieLockstate | None = None
    persistent: str | None = None  # the <domain> element as XML text
    statistics: CookieStatistics | None = None
    nbd: CookieNbd | None = None

    def __post_init__(self) -> None:
        for what in ("name", "hostname"):
            value = getattr(self, what)
            _check_text(value, f"<{what}>")
            if value != value.strip():
                raise InvalidInputError(f"migration cookie <{what}> {quoted(value)} has "
                                        f"surrounding whitespace")
        object.__setattr__(self, "uuid", _uuid(self.uuid, "<uuid>"))
        object.__setattr__(self, "hostuuid", _uuid(self.hostuuid, "<hostuuid>"))
        object.__setattr__(self, "features", _check_features(self.features))
        if self.persistent is not None:
            object.__setattr__(self, "persistent", _canonical_domain(_domain(self.persistent)))

    def sections(self) -> list[str]:
        """The optional sections this cookie holds, by libvirt's feature names."""
        present = {"graphics": self.graphics, "lockstate": self.lockstate,
                   "persistent": self.persistent, "nbd": self.nbd,
                   "statistics": self.statistics}
        return [name for name, value in present.items() if value is not None]

    def _format(self, indent_domain: bool = True) -> str:
        root = etree.Element("qemu-migration")
        for tag in ("name", "uuid", "hostname", "hostuuid"):
            etree.SubElement(root, tag).text = getattr(self, tag)
        for feature in self.features:
            etree.SubElement(root, "feature", name=feature)
        if (g := self.graphics) is not None:
            el = etree.SubElement(root, "graphics", type=g.type, port=str(g.port), listen=g.listen)
            if g.type == "spice":
                el.set("tlsPort", str(g.tls_port))
            if g.tls_subject is not None:
                etree.SubElement(el, "cert", info="subject", value=g.tls_subject)
        if (lock := self.lockstate) is not None:
            el = etree.SubElement(root, "lockstate", driver=lock.driver)
            if lock.leases:
                etree.SubElement(el, "leases").text = lock.leases
        if self.persistent is not None:
            root.append(_domain(self.persistent) if indent_domain else etree.Element("domain"))
        if self.nbd is not None:
            _format_nbd(root, self.nbd)
        if self.statistics is not None:
            el = etree.SubElement(root, "statistics")
            for tag, value in self.statistics.as_dict().items():
                etree.SubElement(el, tag).text = str(value)
        etree.indent(root, space="  ")
        if self.persistent is not None and not indent_domain:
            placeholder = root.find("domain")
            assert placeholder is not None
            compact = _domain(self.persistent)
            compact.tail = placeholder.tail
            root.replace(placeholder, compact)
        return etree.tostring(root, encoding="unicode") + "\n"

    def to_xml(self) -> str:
        """libvirt's cookie XML; a MigrationError if it exceeds MAX_COOKIE_BYTES."""
        size = len((text := self._format()).encode("utf-8"))
        if size > MAX_COOKIE_BYTES and self.persistent is not None:
            size = len((text := self._format(indent_domain=False)).encode("utf-8"))
        if size > MAX_COOKIE_BYTES:
            dom = len(self.persistent.encode("utf-8")) if self.persistent else 0
            raise MigrationError(f"migration cookie for guest {quoted(self.name)} would be {size} "
                                 f"bytes, more than the limit of {MAX_COOKIE_BYTES} "
                                 f"(persistent definition: {dom} bytes)")
        return text

    def summary(self) -> dict[str, Any]:
        """JSON-able facts for task results and logs (never the leases or the definition)."""
        return {"name": self.name, "uuid": self.uuid, "hostname": self.hostname,
                "hostuuid": self.hostuuid, "features": list(self.features),
                "sections": self.sections(), "size_bytes": len(self._format().encode("utf-8"))}


def _format_nbd(root: etree._Element, nbd: CookieNbd) -> None:
    el = etree.SubElement(root, "nbd")
    if nbd.port:
        el.set("port", str(nbd.port))
    for d in nbd.disks:
        disk = etree.SubElement(el, "disk", target=d.target, capacity=str(d.capacity))
        for name, attr in _NBD_ATTRS:
            if (value := getattr(d, name)) is not None:
                disk.set(attr, str(value))


def _children(el: etree._Element) -> Kids:
    kids: Kids = {}
    for child in el:
        if isinstance(child.tag, str):
            kids.setdefault(child.tag, []).append(child)
    return kids


def _one(kids: Kids, tag: str, where: str = "") -> etree._Element | None:
    found = kids.get(tag, [])
    if len(found) > 1:
        raise InvalidInputError(f"migration cookie has more than one {where}<{tag}>")
    return found[0] if found else None


def _text_of(el: etree._Element | None) -> str:
    return "" if el is None else "".join(str(t) for t in el.itertext())


def _required(kids: Kids, tag: str) -> str:
    if not (text := _text_of(_one(kids, tag)).strip()):
        raise InvalidInputError(f"migration cookie has no <{tag}>")
    return text


def _graphics(el: etree._Element) -> CookieGraphics:
    gtype = el.get("type", "")
    spice = gtype == "spice"
    port = _parse_int(el.get("port"), "graphics port", -1, 65535)
    tls_port = _parse_int(el.get("tlsPort"), "graphics tlsPort", -1, 65535) if spice else -1
    subject = next((c.get("value") for c in el.findall("cert") if c.get("info") == "subject"), None)
    listen = el.get("listen", "")
    return CookieGraphics(gtype, port, tls_port, listen, subject)  # type: ignore[arg-type]


def _lockstate(el: etree._Element) -> CookieLockstate:
    leases = _one(_children(el), "leases", "<lockstate>")
    return CookieLockstate(el.get("driver", ""), _text_of(leases))


def _nbd(el: etree._Element) -> CookieNbd:
    port = _parse_int(el.get("port"), "nbd port", 0, 65535) if el.get("port") else 0
    disks = []
    for d in el.findall("disk"):
        target = d.get("target", "")
        extra: dict[str, Any] = {}
        for name, attr in _NBD_ATTRS:
            if (text := d.get(attr)) is None:
                continue
            numeric = name in ("cluster_size", "allocation")
            extra[name] = _parse_int(text, f"nbd disk {target} {attr}", *_U64) if numeric \
                else text
        disks.append(CookieNbdDisk(target, _parse_int(d.get("capacity"),
                                                      f"nbd disk {target} capacity", *_U64),
                                   **extra))
    return CookieNbd(port, tuple(disks))


def _statistics(el: etree._Element) -> CookieStatistics:
    kids = _children(el)
    values: dict[str, int] = {}
    for f in fields(CookieStatistics):
        if (item := _one(kids, f.name, "<statistics>")) is not None:
            values[f.name] = _parse_int(item.text, f"<statistics><{f.name}>",
                                        *_STAT_RANGES.get(f.name, _U64))
    return CookieStatistics(**values)


def parse(xml: str | bytes, *, expect_uuid: str | None = None, expect_name: str | None = None,
          local_hostuuid: str | None = None) -> Cookie:
    """Parse a ``<qemu-migration>`` cookie, checking it is for the expected guest.

    `local_hostuuid` (the receiver's host UUID) refuses a cookie sent by the
    same host, as libvirt does.
    """
    kids = _children(_load(xml, "migration cookie", "qemu-migration"))
    name = _required(kids, "name")
    guest = _uuid(_required(kids, "uuid"), "<uuid>")
    if expect_uuid is not None and guest != (want := _uuid(expect_uuid, "expected uuid")):
        raise InvalidInputError(f"migration cookie is for guest {quoted(name)} ({guest}), "
                                f"not {want}")
    if expect_name is not None and name != expect_name:
        raise InvalidInputError(f"migration cookie is for guest {quoted(name)}, "
                                f"not {quoted(expect_name)}")
    hostname = _required(kids, "hostname")
    hostuuid = _uuid(_required(kids, "hostuuid"), "<hostuuid>")
    if local_hostuuid is not None and hostuuid == _uuid(local_hostuuid, "local host uuid"):
        raise MigrationError(f"attempt to migrate guest {quoted(name)} to the same host {hostuuid}")
    features = [el.get("name", "") for el in kids.get("feature", [])]
    if "" in features:
        raise InvalidInputError("migration cookie <feature> has no name")
    _check_features(features)
    graphics, lockstate = _one(kids, "graphics"), _one(kids, "lockstate")
    domain, statistics = _one(kids, "domain"), _one(kids, "statistics")
    nbd = _one(kids, "nbd")
    return Cookie(
        name, guest, hostname, hostuuid, tuple(features),
        graphics=_graphics(graphics) if graphics is not None else None,
        lockstate=_lockstate(lockstate) if lockstate is not None else None,
        persistent=_canonical_domain(domain) if domain is not None else None,
        statistics=_statistics(statistics) if statistics is not None else None,
        nbd=_nbd(nbd) if nbd is not None else None,
    )


def make_cookie(name: str, uuid: str, hostname: str, hostuuid: str, *,
                graphics: CookieGraphics | None = None, lockstate: CookieLockstate | None = None,
                persistent_xml: str | None = None, statistics: CookieStatistics | None = None,
                nbd: CookieNbd | None = None, mandatory: Iterable[str] = ()) -> Cookie:
    """A cookie with this host's identity and the given sections (no I/O).

    As libvirt does, a lockstate or a persistent definition is marked mandatory.
    """
    features = [*mandatory, *(["lockstate"] if lockstate is not None else []),
                *(["persistent"] if persistent_xml is not None else [])]
    return Cookie(name, uuid, hostname, hostuuid, tuple(features), graphics, lockstate,
                  persistent_xml, statistics, nbd)
