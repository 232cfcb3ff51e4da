"""The cookie's <nbd> section: libvirt's form, ferry's extra disk attributes, bad input."""

from __future__ import annotations

import pytest
from lxml import etree

from workers.errors import InvalidInputError
from workers.migration.cookie import CookieNbd, CookieNbdDisk, make_cookie, parse

GUEST = "dcf47dbd-46d1-4d5b-b442-262a806a333a"
HOST = "8b3f4dc4-6a8e-5f9b-94a5-4c35babd8d95"

# What libvirt's Prepare answers (qemuMigrationCookieNBDXMLFormat): port, then one disk each.
LIBVIRT_PREPARE = f"""<qemu-migration>
  <name>g</name>
  <uuid>{GUEST}</uuid>
  <hostname>beta</hostname>
  <hostuuid>{HOST}</hostuuid>
  <nbd port='49153'>
    <disk target='vda' capacity='67108864'/>
  </nbd>
</qemu-migration>
"""


def test_libvirts_prepare_answer_is_read_with_port_and_disks() -> None:
    c = parse(LIBVIRT_PREPARE)
    assert c.nbd == CookieNbd(49153, (CookieNbdDisk("vda", 67108864),))
    assert c.sections() == ["nbd"]


def test_prepares_answer_marks_nbd_mandatory_and_writes_it_as_libvirt_does() -> None:
    nbd = CookieNbd(49153, (CookieNbdDisk("vda", 67108864),))
    c = make_cookie("g", GUEST, "beta", HOST, nbd=nbd, mandatory=("nbd",))
    text = c.to_xml()
    assert "<feature name='nbd'/>" in text.replace('"', "'")
    root = etree.fromstring(text)
    assert [el.tag for el in root] == ["name", "uuid", "hostname", "hostuuid", "feature", "nbd"]
    assert root.find("nbd").attrib == {"port": "49153"}
    assert dict(root.find("nbd/disk").attrib) == {"target": "vda", "capacity": "67108864"}
    assert parse(text) == c


def test_a_portless_nbd_section_has_no_port_attribute_and_an_empty_one_is_empty() -> None:
    root = etree.fromstring(make_cookie("g", GUEST, "a", HOST, nbd=CookieNbd()).to_xml())
    assert root.find("nbd").attrib == {} and len(root.find("nbd")) == 0
    assert parse(etree.tostring(root)).nbd == CookieNbd()


def test_ferrys_image_attributes_round_trip_and_sit_after_libvirts() -> None:
    disk = CookieNbdDisk("hda", 1 << 30, format="qcow2", cluster_size=65536,
                         backing_file="base.qcow2", backing_format="raw", allocation=12345)
    c = make_cookie("g", GUEST, "a", HOST, nbd=CookieNbd(0, (disk,)), mandatory=("nbd",))
    el = etree.fromstring(c.to_xml()).find("nbd/disk")
    assert list(el.attrib) == ["target", "capacity", "format", "clusterSize", "backingFile",
                               "backingFormat", "allocation"]
    assert parse(c.to_xml()).nbd == CookieNbd(0, (disk,))
    assert parse(c.to_xml()).nbd.disk("hda") == disk  # type: ignore[union-attr]


@pytest.mark.parametrize("section, needle", [
    ("<nbd port='70000'/>", "nbd port"),
    ("<nbd port='x'/>", "nbd port"),
    ("<nbd><disk target='vda'/></nbd>", "capacity"),
    ("<nbd><disk target='vda' capacity='-1'/></nbd>", "capacity"),
    ("<nbd><disk capacity='1'/></nbd>", "target"),
    ("<nbd><disk target='vda' capacity='1'/><disk target='vda' capacity='2'/></nbd>",
     "twice"),
    ("<nbd><disk target='vda' capacity='1' format='vmdk'/></nbd>", "raw or qcow2"),
    ("<nbd><disk target='vda' capacity='1' clusterSize='big'/></nbd>", "clusterSize"),
    ("<nbd/><nbd/>", "more than one <nbd>"),
])
def test_a_malformed_nbd_section_is_refused_naming_what(section: str, needle: str) -> None:
    xml = LIBVIRT_PREPARE.replace(LIBVIRT_PREPARE[LIBVIRT_PREPARE.index("  <nbd"):
                                                  LIBVIRT_PREPARE.index("</qemu-migration>")],
                                  f"  {section}\n")
    with pytest.raises(InvalidInputError, match=needle):
        parse(xml)
