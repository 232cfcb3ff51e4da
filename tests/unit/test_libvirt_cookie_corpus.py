"""ferry reads libvirt's own migration cookies as libvirt does.

The cookies are libvirt's test data (tests/unit/libvirt_cookies, see its
README), parsed the way ferry's phases parse a peer's cookie: for the guest the
cookie names, on a host whose UUID differs from the sender's.  Expected, as in
libvirt's qemuMigrationCookieXMLParse: the sections ferry knows come out with
the values in the XML, the rest is skipped, a mandatory feature ferry does not
support is refused in one line naming it, a cookie from the receiving host
itself is refused, and nothing raises anything but a FerryError.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path

import pytest
from lxml import etree

from workers.errors import FerryError, InvalidInputError, MigrationError, UnsupportedError
from workers.migration.cookie import (
    LIBVIRT_FEATURES,
    Cookie,
    CookieGraphics,
    CookieLockstate,
    CookieNbd,
    CookieNbdDisk,
    CookieStatistics,
    make_cookie,
    parse,
)
from workers.migration.qemu_migrate import statistics_from_query_migrate

CORPUS = Path(__file__).parent / "libvirt_cookies"
COOKIES = sorted(p.name for p in CORPUS.glob("*.xml"))
LOCAL_HOST = "5a1b2c3d-0000-4000-8000-00000000f0e1"  # no cookie of the corpus comes from here
OTHER_GUEST = "0b9d6f44-7d57-4b2c-9a43-5d1f8c1c2e11"

#: the mandatory features each cookie names that ferry does not support
UNSUPPORTED = {
    "full-xml2xml-in.xml": ("memory-hotplug",),
    "modern-dom-out-source.xml": ("memory-hotplug", "cpu-hotplug"),
    "modern-dom-out-dest.xml": ("memory-hotplug", "cpu-hotplug"),
}
#: libvirt's xml2xml pairs: it parses the first and formats the second from it
PAIRS = [
    ("basic-xml2xml-in.xml", "basic-xml2xml-out.xml"),
    ("basic-xml2xml-in.xml", "basic-xml2xml-out.5511bf32.xml"),
    ("full-xml2xml-in.xml", "full-xml2xml-out.xml"),
    ("full-xml2xml-in.xml", "full-xml2xml-out.20feb62e.xml"),
    ("nbd-bitmaps-xml2xml-in.xml", "nbd-bitmaps-xml2xml-out.xml"),
]
#: the <qemu-migration> children ferry reads, and the section each one fills
KNOWN = {"graphics": "graphics", "lockstate": "lockstate", "domain": "persistent",
         "nbd": "nbd", "statistics": "statistics"}
#: the children libvirt's parser reads (anything else it ignores too)
LIBVIRT_ELEMENTS = {"name", "uuid", "hostname", "hostuuid", "feature", "graphics", "lockstate",
                    "domain", "network", "nbd", "statistics", "cpu", "allowReboot",
                    "capabilities", "blockDirtyBitmaps"}


def read(name: str) -> str:
    return (CORPUS / name).read_text(encoding="utf-8")


def root_of(xml: str) -> etree._Element:
    return etree.fromstring(xml.encode())


def text_at(xml: str, path: str) -> str:
    found = root_of(xml).find(path)
    assert found is not None and found.text is not None, path
    return found.text


def without_features(xml: str, names: tuple[str, ...]) -> str:
    """The cookie less its ``<feature name='X'/>`` lines for the given names."""
    for name in names:
        xml = xml.replace(f"  <feature name='{name}'/>\n", "")
    return xml


def supported(name: str) -> str:
    """A corpus cookie less the mandatory features ferry refuses."""
    return without_features(read(name), UNSUPPORTED.get(name, ()))


def as_peer(xml: str) -> Cookie:
    """Parse as Prepare and Perform do: for the guest named, on another host."""
    return parse(xml, expect_uuid=text_at(xml, "uuid"), local_hostuuid=LOCAL_HOST)


def drop(el: etree._Element) -> None:
    """Remove an element and keep the indentation of what follows it."""
    parent, prev = el.getparent(), el.getprevious()
    assert parent is not None
    if prev is not None:
        prev.tail = el.tail
    else:
        parent.text = el.tail
    parent.remove(el)


def only_what_ferry_reads(xml: str) -> str:
    """libvirt's cookie less the sections ferry skips, in canonical form."""
    root = root_of(xml)
    for el in [el for el in root if el.tag not in {"name", "uuid", "hostname", "hostuuid",
                                                    "feature", *KNOWN}]:
        drop(el)
    return etree.canonicalize(etree.tostring(root, encoding="unicode"))


# --- the corpus --------------------------------------------------------------------------------


def test_the_corpus_holds_libvirts_cookie_test_data_and_says_where_it_came_from() -> None:
    assert set(COOKIES) == {name for pair in PAIRS for name in pair} | {
        "modern-dom-out-source.xml", "modern-dom-out-dest.xml"}
    readme = (CORPUS / "README.md").read_text(encoding="utf-8")
    assert "libvirt/libvirt" in readme and "tests/qemumigrationcookiexmldata" in readme
    assert "LGPL" in readme
    assert all(name in readme for name in COOKIES)


@pytest.mark.parametrize("name", COOKIES)
def test_every_cookie_is_read_or_refused_naming_the_unsupported_feature(name: str) -> None:
    xml = read(name)
    if name not in UNSUPPORTED:
        assert as_peer(xml).name == text_at(xml, "name")
        return
    with pytest.raises(UnsupportedError) as err:
        as_peer(xml)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("unsupported migration cookie feature")
    assert all(f"'{feature}'" in message for feature in UNSUPPORTED[name])


@pytest.mark.parametrize("name", COOKIES)
def test_identity_and_sections_come_from_the_xml(name: str) -> None:
    xml = supported(name)
    c = as_peer(xml)
    assert (c.name, c.uuid, c.hostname, c.hostuuid) == tuple(
        text_at(xml, tag) for tag in ("name", "uuid", "hostname", "hostuuid"))
    children = {el.tag for el in root_of(xml)}
    assert c.sections() == [s for tag, s in KNOWN.items() if tag in children]
    features = [el.get("name") for el in root_of(xml).findall("feature")]
    assert list(c.features) == features


@pytest.mark.parametrize("name", COOKIES)
def test_a_cookie_from_the_receiving_host_itself_is_refused(name: str) -> None:
    """Checked before the features, as libvirt does, so every cookie is refused here."""
    xml = read(name)
    sender = text_at(xml, "hostuuid")
    for local in (sender, sender.upper()):
        with pytest.raises(MigrationError) as err:
            parse(xml, local_hostuuid=local)
        assert "same host" in str(err.value) and sender in str(err.value)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", COOKIES)
def test_a_cookie_for_another_guest_is_refused(name: str) -> None:
    with pytest.raises(InvalidInputError, match="migration cookie is for guest"):
        parse(supported(name), expect_uuid=OTHER_GUEST, local_hostuuid=LOCAL_HOST)


# --- the values of the sections ferry uses --------------------------------------------------


@pytest.mark.parametrize("name", ["full-xml2xml-in.xml", "full-xml2xml-out.xml",
                                  "full-xml2xml-out.20feb62e.xml"])
def test_the_full_cookie_gives_every_value_ferry_uses(name: str) -> None:
    xml = supported(name)
    c = as_peer(xml)
    assert c.graphics == CookieGraphics("spice", 123, 321, "test", "testsubject")
    assert c.lockstate == CookieLockstate("blurb", "leastest")
    assert c.nbd == CookieNbd(456, (CookieNbdDisk("vda", 123), CookieNbdDisk("vdb", 1235)))
    assert c.persistent is not None
    domain = root_of(c.persistent)
    assert domain.get("type") == "kvm"
    for path in ("name", "uuid", "memory", "vcpu", "devices/emulator",
                 "devices/rng/backend"):
        assert domain.findtext(path) == text_at(xml, f"domain/{path}")
    assert len(domain.findall("devices/*")) == len(root_of(xml).findall("domain/devices/*"))


def test_every_statistic_libvirt_writes_is_read_with_its_value() -> None:
    xml = supported("full-xml2xml-out.xml")
    stats = as_peer(xml).statistics
    assert stats is not None
    written = {el.tag: int(el.text or "") for el in root_of(xml).findall("statistics/*")}
    assert written == stats.as_dict()  # none dropped, none invented
    assert [f.name for f in fields(CookieStatistics)] == list(written)  # libvirt's order


@pytest.mark.parametrize("name", ["modern-dom-out-source.xml", "modern-dom-out-dest.xml"])
def test_the_modern_cookies_give_spice_graphics_without_tls(name: str) -> None:
    c = as_peer(supported(name))
    assert c.graphics == CookieGraphics("spice", 5900, -1, "127.0.0.1", None)
    assert c.sections() == ["graphics"]


def test_the_nbd_cookie_gives_its_disks_and_no_port() -> None:
    c = as_peer(read("nbd-bitmaps-xml2xml-in.xml"))
    assert c.nbd == CookieNbd(0, (CookieNbdDisk("hda", 708837376),
                                  CookieNbdDisk("vda", 10485760)))


def test_a_mandatory_lockstate_without_a_lockstate_section_is_accepted_as_libvirt_does() -> None:
    """libvirt writes the feature when its lock manager has no state to hand over."""
    c = as_peer(read("nbd-bitmaps-xml2xml-in.xml"))
    assert c.features == ("lockstate",)
    assert c.lockstate is None


def test_features_nested_in_cpu_are_not_mandatory_cookie_features() -> None:
    xml = read("nbd-bitmaps-xml2xml-in.xml")
    assert len(root_of(xml).findall("cpu/feature")) == 18
    assert as_peer(xml).features == ("lockstate",)


@pytest.mark.parametrize("name", ["basic-xml2xml-in.xml", "basic-xml2xml-out.xml",
                                  "basic-xml2xml-out.5511bf32.xml"])
def test_a_cookie_with_only_an_identity_has_no_sections(name: str) -> None:
    c = as_peer(read(name))
    assert c.sections() == [] and c.features == ()


# --- libvirt's in/out pairs read the same --------------------------------------------------


@pytest.mark.parametrize(("src", "out"), PAIRS)
def test_what_libvirt_formats_from_a_cookie_reads_as_that_cookie(src: str, out: str) -> None:
    """libvirt formats -out on its test host and keeps no <feature> line it read."""
    before, after = as_peer(supported(src)), as_peer(read(out))
    assert replace(before, hostname=after.hostname, hostuuid=after.hostuuid,
                   features=()) == after


def test_the_source_and_dest_cookies_of_the_same_guest_read_the_same() -> None:
    source = as_peer(supported("modern-dom-out-source.xml"))
    assert source == as_peer(supported("modern-dom-out-dest.xml"))


# --- what ferry writes ---------------------------------------------------------------------


@pytest.mark.parametrize("name", COOKIES)
def test_a_libvirt_cookie_written_back_by_ferry_is_libvirts_document(name: str) -> None:
    """Less the sections ferry skips: same elements, order, values and indentation."""
    xml = supported(name)
    c = as_peer(xml)
    written = c.to_xml()
    assert as_peer(written) == c
    assert etree.canonicalize(written) == only_what_ferry_reads(xml)


#: a completed migration as QEMU's query-migrate reports it (QEMU 7.2)
QUERY_MIGRATE = {
    "status": "completed", "total-time": 3950, "downtime": 38, "setup-time": 6,
    "ram": {"transferred": 540123456, "remaining": 0, "total": 537919488, "duplicate": 101234,
            "normal": 131072, "normal-bytes": 536870912, "dirty-pages-rate": 0, "mbps": 3600.5,
            "dirty-sync-count": 4, "page-size": 4096, "postcopy-requests": 0},
    "xbzrle-cache": {"cache-size": 67108864, "bytes": 1, "pages": 2, "cache-miss": 3,
                     "cache-miss-rate": 0.5, "encoding-rate": 1.5, "overflow": 4},
    "cpu-throttle-percentage": 20,
}


def ferrys_own_cookies() -> list[Cookie]:
    full = as_peer(supported("full-xml2xml-out.xml"))
    assert full.statistics is not None and full.persistent is not None
    sparse = CookieStatistics(started=1, stopped=2, sent=3, time_elapsed=4, delta=-5)
    from_qemu = statistics_from_query_migrate(QUERY_MIGRATE, started_ms=1700000000000,
                                              stopped_ms=1700000004000)
    nbd = CookieNbd(49153, (CookieNbdDisk("vda", 10485760, "qcow2", 65536, "../base.qcow2",
                                          "qcow2", 2097152, "job-1"),
                            CookieNbdDisk("hda", 708837376, "raw")))
    host = ("upstream", full.uuid, "alpha", "8d3e7c6a-1d2b-4e5f-9a8b-7c6d5e4f3a2b")
    return [
        make_cookie(*host),
        make_cookie(*host, graphics=CookieGraphics("spice", 5900, 5901, "::", "CN=alpha"),
                    mandatory=["graphics"]),
        make_cookie(*host, graphics=CookieGraphics("vnc", 5900, -1, "192.0.2.1")),
        make_cookie(*host, lockstate=CookieLockstate("sanlock", "vol:res:/dev/sdb:1048576:4")),
        make_cookie(*host, lockstate=CookieLockstate("lockd")),
        make_cookie(*host, persistent_xml=full.persistent, statistics=full.statistics),
        make_cookie(*host, statistics=sparse),
        make_cookie(*host, statistics=from_qemu),
        make_cookie(*host, nbd=nbd, mandatory=("nbd",)),
        make_cookie(*host, nbd=CookieNbd(0, (CookieNbdDisk("vda", 1),)), mandatory=("nbd",)),
        make_cookie(*host, graphics=full.graphics, lockstate=full.lockstate,
                    persistent_xml=full.persistent, statistics=full.statistics, nbd=full.nbd),
    ]


@pytest.mark.parametrize("cookie", ferrys_own_cookies(), ids=lambda c: "+".join(
    c.sections()) or "identity")
def test_ferrys_own_cookies_parse_back_equal(cookie: Cookie) -> None:
    assert as_peer(cookie.to_xml()) == cookie


@pytest.mark.parametrize("cookie", ferrys_own_cookies(), ids=lambda c: "+".join(
    c.sections()) or "identity")
def test_ferrys_own_cookies_hold_only_what_libvirts_parser_reads(cookie: Cookie) -> None:
    """What qemuMigrationCookieXMLParse requires of each element ferry writes."""
    root = root_of(cookie.to_xml())
    assert {el.tag for el in root} <= LIBVIRT_ELEMENTS
    assert all(el.get("name") in LIBVIRT_FEATURES for el in root.findall("feature"))
    for g in root.findall("graphics"):
        assert g.get("type") in ("spice", "vnc") and g.get("listen")
        assert re.fullmatch(r"-?\d+", g.get("port", ""))
        assert (g.get("tlsPort") is not None) == (g.get("type") == "spice")
    for lock in root.findall("lockstate"):
        assert lock.get("driver")
    for nbd in root.findall("nbd"):
        assert re.fullmatch(r"[1-9]\d*", nbd.get("port", "1"))  # no port='0'
        for disk in nbd.findall("disk"):
            assert disk.get("target") and re.fullmatch(r"\d+", disk.get("capacity", ""))
    libvirt_stats = [el.tag for el in root_of(read("full-xml2xml-out.xml")).find("statistics")]
    for stats in root.findall("statistics"):
        tags = [el.tag for el in stats]
        assert tags == [t for t in libvirt_stats if t in tags]  # known names, libvirt's order
        assert all(re.fullmatch(r"-?\d+", el.text or "") for el in stats)


# --- nothing but a FerryError, whatever a peer changes -------------------------------------

HOSTILE = ("", " ", "-1", "65536", "1" * 30, "x", "0x10", "\u00e9", "<&>")
Edit = tuple[str, ...]


def edits(el: etree._Element) -> list[Edit]:
    """Each way of changing one element: remove it, repeat it, replace its text or an
    attribute, remove an attribute."""
    out: list[Edit] = [] if el.getparent() is None else [("drop",), ("twice",)]
    if el.tag != "domain":
        out += [("text", v) for v in HOSTILE]
    for key in el.attrib:
        out += [("unset", key), *(("set", key, v) for v in HOSTILE)]
    return out


def apply(el: etree._Element, edit: Edit) -> None:
    kind = edit[0]
    if kind == "drop":
        drop(el)
    elif kind == "twice":
        el.addnext(copy.deepcopy(el))
    elif kind == "text":
        el.text = edit[1]
    elif kind == "unset":
        del el.attrib[edit[1]]
    else:
        el.set(edit[1], edit[2])


def mutations(xml: str) -> Iterator[bytes]:
    """The cookie with one change to one element, for every element outside <domain>
    (ferry keeps the definition as text; the domain parser has its own tests)."""
    for i, el in enumerate(root_of(xml).iter()):
        if any(a.tag == "domain" for a in el.iterancestors()):
            continue
        for edit in edits(el):
            root = root_of(xml)
            apply(list(root.iter())[i], edit)
            yield etree.tostring(root)


@pytest.mark.parametrize("name", COOKIES)
def test_no_change_to_a_libvirt_cookie_raises_anything_but_a_ferry_error(name: str) -> None:
    tried = 0
    for data in mutations(supported(name)):
        tried += 1
        try:
            parse(data, local_hostuuid=LOCAL_HOST)
        except FerryError as exc:
            assert "\n" not in str(exc), str(exc)
    assert tried > 50
