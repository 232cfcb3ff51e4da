"""The migration cookie reads and writes libvirt's <qemu-migration> XML safely."""

from __future__ import annotations

from dataclasses import replace

import pytest
from lxml import etree

import tasks.cookie
from workers.errors import InvalidInputError, MigrationError, UnsupportedError
from workers.migration.cookie import (
    MAX_COOKIE_BYTES,
    Cookie,
    CookieGraphics,
    CookieLockstate,
    CookieStatistics,
    make_cookie,
    parse,
)
from workers.migration.qemu_migrate import statistics_from_query_migrate

GUEST_UUID = "dcf47dbd-46d1-4d5b-b442-262a806a333a"
OTHER_UUID = "0b9d6f44-7d57-4b2c-9a43-5d1f8c1c2e11"
SOURCE_HOST_UUID = "8b3f4dc4-6a8e-5f9b-94a5-4c35babd8d95"

# shared/reference/libvirt-cookies/basic-out.xml, verbatim
BASIC_OUT = """\
<qemu-migration>
  <name>upstream</name>
  <uuid>dcf47dbd-46d1-4d5b-b442-262a806a333a</uuid>
  <hostname>hostname</hostname>
  <hostuuid>4a802f00-4cba-5df6-9679-a08c4c5b577f</hostuuid>
  <allowReboot value='default'/>
  <capabilities>
  </capabilities>
</qemu-migration>
"""


# shared/reference/libvirt-cookies/full-in.xml, verbatim
FULL_IN = """\
<qemu-migration>
  <name>upstream</name>
  <uuid>dcf47dbd-46d1-4d5b-b442-262a806a333a</uuid>
  <hostname>hostname2</hostname>
  <hostuuid>8b3f4dc4-6a8e-5f9b-94a5-4c35babd8d95</hostuuid>
  <feature name='graphics'/>
  <feature name='memory-hotplug'/>
  <graphics type='spice' port='123' listen='test' tlsPort='321'>
    <cert info='subject' value='testsubject'/>
  </graphics>
  <lockstate driver='blurb'>
    <leases>leastest</leases>
  </lockstate>
  <domain type='kvm'>
    <name>upstream</name>
    <uuid>dcf47dbd-46d1-4d5b-b442-262a806a333a</uuid>
    <memory unit='KiB'>1024000</memory>
    <currentMemory unit='KiB'>1024000</currentMemory>
    <vcpu placement='auto' current='2'>8</vcpu>
    <os>
      <type arch='x86_64' machine='pc-i440fx-2.9'>hvm</type>
      <bootmenu enable='yes'/>
    </os>
    <features>
      <acpi/>
      <apic/>
      <vmport state='off'/>
    </features>
    <clock offset='utc'>
      <timer name='rtc' tickpolicy='catchup'/>
      <timer name='pit' tickpolicy='delay'/>
      <timer name='hpet' present='no'/>
    </clock>
    <on_poweroff>destroy</on_poweroff>
    <on_reboot>restart</on_reboot>
    <on_crash>restart</on_crash>
    <devices>
      <emulator>/usr/bin/qemu-system-x86_64</emulator>
      <disk type='file' device='disk'>
        <driver name='qemu' type='qcow2' discard='unmap' detect_zeroes='on'/>
        <source file='/var/lib/libvirt/images/a.qcow2'/>
        <target dev='vdb' bus='virtio'/>
        <address type='pci' domain='0x0000' bus='0x00' slot='0x0b' function='0x0'/>
      </disk>
      <disk type='file' device='cdrom'>
        <driver name='qemu' type='raw'/>
        <source file='/var/lib/libvirt/images/systemrescuecd-x86-4.9.5.iso'/>
        <target dev='hda' bus='ide'/>
        <readonly/>
        <boot order='1'/>
        <address type='drive' controller='0' bus='0' target='0' unit='0'/>
      </disk>
      <serial type='pty'>
        <target type='isa-serial' port='0'>
          <model name='isa-serial'/>
        </target>
      </serial>
      <console type='pty'>
        <target type='serial' port='0'/>
      </console>
      <graphics type='spice' autoport='yes'>
        <listen type='address'/>
        <image compression='off'/>
      </graphics>
      <video>
        <model type='qxl' ram='65536' vram='65536' vgamem='16384' heads='1' primary='yes'/>
        <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
      </video>
      <memballoon model='virtio'>
        <address type='pci' domain='0x0000' bus='0x00' slot='0x08' function='0x0'/>
      </memballoon>
    </devices>
    <seclabel type='dynamic' model='dac' relabel='yes'/>
  </domain>
  <network>
    <interface index='0' vporttype='midonet'>
      <portdata>testportdata</portdata>
    </interface>
  </network>
  <nbd port='456'>
    <disk target='vda' capacity='123'/>
    <disk target='vdb' capacity='1235'/>
  </nbd>
  <statistics>
    <started>12345</started>
    <stopped>54321</stopped>
    <sent>986</sent>
    <delta>7654</delta>
    <time_elapsed>1</time_elapsed>
    <downtime>11</downtime>
    <setup_time>12</setup_time>
    <memory_total>2</memory_total>
    <memory_processed>3</memory_processed>
    <memory_remaining>4</memory_remaining>
    <memory_bps>5</memory_bps>
    <memory_constant>51</memory_constant>
    <memory_normal>52</memory_normal>
    <memory_normal_bytes>53</memory_normal_bytes>
    <memory_dirty_rate>6</memory_dirty_rate>
    <memory_iteration>7</memory_iteration>
    <memory_postcopy_requests>8</memory_postcopy_requests>
    <memory_page_size>9</memory_page_size>
    <disk_total>10</disk_total>
    <disk_processed>11</disk_processed>
    <disk_remaining>12</disk_remaining>
    <disk_bps>13</disk_bps>
    <compression_cache>131</compression_cache>
    <compression_bytes>132</compression_bytes>
    <compression_pages>133</compression_pages>
    <compression_cache_misses>134</compression_cache_misses>
    <compression_overflow>135</compression_overflow>
    <auto_converge_throttle>14</auto_converge_throttle>
  </statistics>
  <cpu mode='host-passthrough' check='partial' migratable='on'/>
  <allowReboot value='yes'/>
  <capabilities>
    <cap name='xbzrle' auto='yes'/>
    <cap name='postcopy-ram' auto='no'/>
  </capabilities>
</qemu-migration>
"""


# shared/reference/libvirt-cookies/modern-dom-out-source.xml, verbatim
MODERN_DOM_OUT_SOURCE = """\
<qemu-migration>
  <name>upstream</name>
  <uuid>dcf47dbd-46d1-4d5b-b442-262a806a333a</uuid>
  <hostname>hostname2</hostname>
  <hostuuid>8b3f4dc4-6a8e-5f9b-94a5-4c35babd8d95</hostuuid>
  <feature name='memory-hotplug'/>
  <feature name='cpu-hotplug'/>
  <graphics type='spice' port='5900' listen='127.0.0.1' tlsPort='-1'/>
  <allowReboot value='yes'/>
  <capabilities>
  </capabilities>
</qemu-migration>
"""


def without_unsupported_features(xml: str) -> str:
    for feature in ("memory-hotplug", "cpu-hotplug"):
        xml = xml.replace(f"  <feature name='{feature}'/>\n", "")
    return xml


def canonical(el: etree._Element) -> bytes:
    """An element without whitespace-only text, for comparing documents."""
    el = etree.fromstring(etree.tostring(el), etree.XMLParser(remove_blank_text=True))
    return etree.tostring(el, method="c14n")


STATISTICS = CookieStatistics(
    started=1700000000000, stopped=1700000004000, sent=1700000004010, time_elapsed=4000,
    downtime=42, setup_time=7, memory_total=536870912, memory_processed=540000000,
    memory_remaining=0, memory_bps=450000000, memory_constant=100000, memory_normal=130000,
    memory_normal_bytes=532480000, memory_dirty_rate=1200, memory_iteration=3,
    memory_page_size=4096, auto_converge_throttle=0,
)
DOMAIN = """<domain type='kvm'>
  <name>upstream</name>
  <uuid>dcf47dbd-46d1-4d5b-b442-262a806a333a</uuid>
  <memory unit='KiB'>524288</memory>
</domain>"""


def full_cookie() -> Cookie:
    return make_cookie(
        "upstream", GUEST_UUID, "alpha", SOURCE_HOST_UUID,
        graphics=CookieGraphics("spice", 5901, 5902, "192.0.2.7", "C=CZ,O=ferry,CN=beta"),
        lockstate=CookieLockstate("redis", "ferry/upstream:lease=7f3a"),
        persistent_xml=DOMAIN, statistics=STATISTICS,
    )


# --- the reference cookies behave as their README says -------------------------------------


def test_basic_cookie_parses_to_its_identity_and_no_sections() -> None:
    c = parse(BASIC_OUT)
    assert (c.name, c.uuid, c.hostname, c.hostuuid) == (
        "upstream", GUEST_UUID, "hostname", "4a802f00-4cba-5df6-9679-a08c4c5b577f")
    assert c.features == ()
    assert (c.graphics, c.lockstate, c.persistent, c.statistics) == (None, None, None, None)


def test_basic_cookie_formats_back_to_the_same_document_less_the_sections_ferry_skips() -> None:
    expected = etree.fromstring(BASIC_OUT)
    for skipped in ("allowReboot", "capabilities"):
        expected.remove(expected.find(skipped))
    out = parse(BASIC_OUT).to_xml()
    assert canonical(etree.fromstring(out)) == canonical(expected)
    assert parse(out) == parse(BASIC_OUT)


def test_full_cookie_is_refused_naming_memory_hotplug() -> None:
    with pytest.raises(UnsupportedError) as err:
        parse(FULL_IN)
    assert "unsupported migration cookie feature 'memory-hotplug'" in str(err.value)


def test_modern_source_cookie_is_refused_naming_memory_hotplug_and_cpu_hotplug() -> None:
    with pytest.raises(UnsupportedError) as err:
        parse(MODERN_DOM_OUT_SOURCE)
    assert "unsupported migration cookie feature 'memory-hotplug'" in str(err.value)
    assert "'cpu-hotplug'" in str(err.value)


def test_full_cookie_without_unsupported_features_gives_every_understood_value() -> None:
    c = parse(without_unsupported_features(FULL_IN))
    assert (c.name, c.uuid, c.hostname, c.hostuuid) == (
        "upstream", GUEST_UUID, "hostname2", SOURCE_HOST_UUID)
    assert c.features == ("graphics",)
    assert c.graphics == CookieGraphics("spice", 123, 321, "test", "testsubject")
    assert c.lockstate == CookieLockstate("blurb", "leastest")
    assert c.persistent is not None
    domain = etree.fromstring(c.persistent)
    assert domain.tag == "domain" and domain.get("type") == "kvm"
    assert domain.findtext("name") == "upstream"
    assert domain.findtext("uuid") == GUEST_UUID
    assert domain.find("devices/disk/source").get("file") == "/var/lib/libvirt/images/a.qcow2"
    assert c.statistics is not None
    assert c.statistics.as_dict() == {
        "started": 12345, "stopped": 54321, "sent": 986, "delta": 7654, "time_elapsed": 1,
        "downtime": 11, "setup_time": 12, "memory_total": 2, "memory_processed": 3,
        "memory_remaining": 4, "memory_bps": 5, "memory_constant": 51, "memory_normal": 52,
        "memory_normal_bytes": 53, "memory_dirty_rate": 6, "memory_iteration": 7,
        "memory_postcopy_requests": 8, "memory_page_size": 9, "disk_total": 10,
        "disk_processed": 11, "disk_remaining": 12, "disk_bps": 13, "compression_cache": 131,
        "compression_bytes": 132, "compression_pages": 133, "compression_cache_misses": 134,
        "compression_overflow": 135, "auto_converge_throttle": 14,
    }


def test_modern_source_cookie_without_unsupported_features_gives_graphics_without_tls() -> None:
    c = parse(without_unsupported_features(MODERN_DOM_OUT_SOURCE))
    assert (c.name, c.uuid, c.hostname, c.hostuuid) == (
        "upstream", GUEST_UUID, "hostname2", SOURCE_HOST_UUID)
    assert c.features == ()
    assert c.graphics == CookieGraphics("spice", 5900, -1, "127.0.0.1", None)
    assert (c.lockstate, c.persistent, c.statistics) == (None, None, None)


def test_full_reference_cookie_formats_in_libvirts_element_order() -> None:
    c = parse(without_unsupported_features(FULL_IN))
    root = etree.fromstring(c.to_xml())
    assert [el.tag for el in root] == ["name", "uuid", "hostname", "hostuuid", "feature",
                                       "graphics", "lockstate", "domain", "nbd", "statistics"]
    assert canonical(root.find("nbd")) == canonical(etree.fromstring(FULL_IN).find("nbd"))
    graphics = root.find("graphics")
    assert dict(graphics.attrib) == {"type": "spice", "port": "123", "listen": "test",
                                     "tlsPort": "321"}
    assert dict(graphics.find("cert").attrib) == {"info": "subject", "value": "testsubject"}
    assert root.find("lockstate").get("driver") == "blurb"
    assert root.findtext("lockstate/leases") == "leastest"
    expected_stats = etree.fromstring(FULL_IN).find("statistics")
    assert canonical(root.find("statistics")) == canonical(expected_stats)
    assert parse(c.to_xml()) == c


# --- round trip and formatting ---------------------------------------------------------------


def test_a_full_cookie_round_trips_through_its_xml() -> None:
    c = full_cookie()
    assert c.features == ("lockstate", "persistent")
    assert parse(c.to_xml()) == c
    assert parse(c.to_xml().encode("utf-8"), expect_uuid=GUEST_UUID, expect_name="upstream") == c


def test_the_persistent_definition_keeps_its_content_and_is_stable() -> None:
    c = full_cookie()
    assert c.persistent is not None
    assert canonical(etree.fromstring(c.persistent)) == canonical(etree.fromstring(DOMAIN))
    assert parse(parse(c.to_xml()).to_xml()).persistent == c.persistent


def test_a_namespaced_persistent_definition_keeps_its_namespace() -> None:
    ns = "http://libvirt.org/schemas/domain/qemu/1.0"
    domain = DOMAIN.replace("<domain type='kvm'>", f"<domain type='kvm' xmlns:qemu='{ns}'>")
    domain = domain.replace("</domain>", "  <qemu:commandline><qemu:arg value='-S'/>"
                            "</qemu:commandline>\n</domain>")
    c = make_cookie("upstream", GUEST_UUID, "alpha", SOURCE_HOST_UUID, persistent_xml=domain)
    again = parse(c.to_xml())
    assert again == c and again.persistent is not None
    assert etree.fromstring(again.persistent).find(f"{{{ns}}}commandline/{{{ns}}}arg") is not None


def test_sections_are_omitted_when_they_hold_no_data() -> None:
    c = make_cookie("upstream", GUEST_UUID, "beta", OTHER_UUID)
    root = etree.fromstring(c.to_xml())
    assert [el.tag for el in root] == ["name", "uuid", "hostname", "hostuuid"]
    assert c.sections() == []


def test_a_vnc_graphics_section_has_no_tls_port() -> None:
    c = make_cookie("upstream", GUEST_UUID, "beta", OTHER_UUID,
                    graphics=CookieGraphics("vnc", 5900, -1, "0.0.0.0"))
    graphics = etree.fromstring(c.to_xml()).find("graphics")
    assert dict(graphics.attrib) == {"type": "vnc", "port": "5900", "listen": "0.0.0.0"}
    assert graphics.find("cert") is None
    assert parse(c.to_xml()) == c
    with pytest.raises(InvalidInputError):
        CookieGraphics("vnc", 5900, 5901, "0.0.0.0")


def test_a_lockstate_without_leases_keeps_the_driver_name() -> None:
    c = make_cookie("upstream", GUEST_UUID, "alpha", SOURCE_HOST_UUID,
                    lockstate=CookieLockstate("redis"))
    lock = etree.fromstring(c.to_xml()).find("lockstate")
    assert lock.get("driver") == "redis" and lock.find("leases") is None
    assert parse(c.to_xml()).lockstate == CookieLockstate("redis", "")


def test_the_builder_marks_lockstate_and_persistent_mandatory_like_libvirt() -> None:
    root = etree.fromstring(full_cookie().to_xml())
    assert [f.get("name") for f in root.findall("feature")] == ["lockstate", "persistent"]
    c = make_cookie("upstream", GUEST_UUID, "beta", OTHER_UUID, mandatory=["graphics"])
    assert c.features == ("graphics",)


def test_a_cookie_cannot_carry_a_feature_ferry_does_not_support() -> None:
    with pytest.raises(UnsupportedError, match="'network'"):
        make_cookie("upstream", GUEST_UUID, "beta", OTHER_UUID, mandatory=["network"])


def test_a_cookie_too_large_to_send_is_a_migration_error() -> None:
    big = DOMAIN.replace("</domain>", "  <description>" + "x" * 16000 + "</description>\n"
                         "</domain>")
    c = make_cookie("upstream", GUEST_UUID, "alpha", SOURCE_HOST_UUID, persistent_xml=big,
                    statistics=STATISTICS)
    with pytest.raises(MigrationError, match="more than the limit of 16384"):
        c.to_xml()
    assert c.summary()["size_bytes"] > MAX_COOKIE_BYTES


def test_the_summary_names_the_guest_the_sections_and_the_size() -> None:
    c = full_cookie()
    assert c.summary() == {
        "name": "upstream", "uuid": GUEST_UUID, "hostname": "alpha",
        "hostuuid": SOURCE_HOST_UUID, "features": ["lockstate", "persistent"],
        "sections": ["graphics", "lockstate", "persistent", "statistics"],
        "size_bytes": len(c.to_xml().encode("utf-8")),
    }


def test_statistics_survive_a_trip_through_a_dict() -> None:
    assert CookieStatistics.from_dict({**STATISTICS.as_dict(), "unknown": 1}) == STATISTICS


def test_replace_keeps_the_cookie_valid() -> None:
    c = replace(full_cookie(), statistics=None, graphics=None)
    assert c.sections() == ["lockstate", "persistent"]
    assert parse(c.to_xml()) == c


# --- refused input ---------------------------------------------------------------------------


def test_a_cookie_over_16384_bytes_is_refused() -> None:
    padded = BASIC_OUT.replace("<capabilities>", "<capabilities>" + " " * MAX_COOKIE_BYTES)
    with pytest.raises(InvalidInputError, match="more than the limit of 16384"):
        parse(padded)


def test_an_entity_declaration_is_refused() -> None:
    laughs = """<?xml version="1.0"?>
<!DOCTYPE qemu-migration [
  <!ENTITY lol "lol">
  <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<qemu-migration><name>&lol3;</name></qemu-migration>
"""
    with pytest.raises(InvalidInputError, match="entity declaration"):
        parse(laughs)


def test_an_external_entity_is_refused() -> None:
    xxe = ('<!DOCTYPE q [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
           "<qemu-migration><name>&x;</name></qemu-migration>")
    with pytest.raises(InvalidInputError, match="entity declaration"):
        parse(xxe.encode())


def test_malformed_xml_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="malformed migration cookie"):
        parse("<qemu-migration><name>upstream</qemu-migration>")


def test_a_foreign_root_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="root element is <domain>"):
        parse(DOMAIN)
    namespaced = BASIC_OUT.replace("<qemu-migration>", "<qemu-migration xmlns='urn:x'>")
    with pytest.raises(InvalidInputError, match="not a migration cookie"):
        parse(namespaced)


def test_a_cookie_for_another_guest_is_refused() -> None:
    wrong = f"cookie is for guest 'upstream' \\({GUEST_UUID}\\), not {OTHER_UUID}"
    with pytest.raises(InvalidInputError, match=wrong):
        parse(BASIC_OUT, expect_uuid=OTHER_UUID)
    with pytest.raises(InvalidInputError, match="cookie is for guest 'upstream', not 'other'"):
        parse(BASIC_OUT, expect_name="other")


def test_the_expected_uuid_is_compared_in_canonical_form() -> None:
    assert parse(BASIC_OUT, expect_uuid=GUEST_UUID.upper()).uuid == GUEST_UUID


def test_a_cookie_from_the_receiving_host_itself_is_refused() -> None:
    with pytest.raises(MigrationError, match="to the same host"):
        parse(BASIC_OUT, local_hostuuid="4a802f00-4cba-5df6-9679-a08c4c5b577f")


def test_an_invalid_uuid_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="<uuid> 'not-a-uuid' is not a valid UUID"):
        parse(BASIC_OUT.replace(GUEST_UUID, "not-a-uuid"))
    bad_host = BASIC_OUT.replace("4a802f00-4cba-5df6-9679-a08c4c5b577f", "4a802f00")
    with pytest.raises(InvalidInputError, match="<hostuuid>"):
        parse(bad_host)


def test_a_missing_identity_element_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="has no <hostname>"):
        parse(BASIC_OUT.replace("<hostname>hostname</hostname>", ""))


def test_a_repeated_identity_element_is_refused() -> None:
    twice = BASIC_OUT.replace("</name>", f"</name>\n  <uuid>{OTHER_UUID}</uuid>")
    with pytest.raises(InvalidInputError, match="more than one <uuid>"):
        parse(twice)


@pytest.mark.parametrize("section", ["graphics", "lockstate", "statistics", "hostname"])
def test_every_section_given_twice_is_refused_naming_it(section: str) -> None:
    root = etree.fromstring(full_cookie().to_xml())
    el = root.find(section)
    assert el is not None
    root.append(etree.fromstring(etree.tostring(el)))
    with pytest.raises(InvalidInputError, match=f"more than one <{section}>"):
        parse(etree.tostring(root))


def test_two_persistent_definitions_are_refused() -> None:
    c = full_cookie()
    assert c.persistent is not None
    twice = c.to_xml().replace("</qemu-migration>", c.persistent + "\n</qemu-migration>")
    with pytest.raises(InvalidInputError, match="more than one <domain>"):
        parse(twice)


def test_unknown_sections_are_skipped_unless_mandatory() -> None:
    extra = BASIC_OUT.replace(
        "</qemu-migration>",
        "  <blockDirtyBitmaps/>\n  <future-thing a='b'>text</future-thing>\n"
        "  <cpu mode='host-passthrough'/>\n</qemu-migration>")
    assert parse(extra) == parse(BASIC_OUT)
    mandatory = extra.replace("  <allowReboot", "  <feature name='cpu'/>\n  <allowReboot")
    with pytest.raises(UnsupportedError, match="unsupported migration cookie feature 'cpu'"):
        parse(mandatory)


def test_unknown_statistics_elements_are_skipped() -> None:
    xml = BASIC_OUT.replace(
        "</qemu-migration>",
        "  <statistics>\n    <sent>5</sent>\n    <time_remaining>9</time_remaining>\n"
        "    <vfio_data_transferred>3</vfio_data_transferred>\n  </statistics>\n"
        "</qemu-migration>")
    assert parse(xml).statistics == CookieStatistics(sent=5)


def test_a_malformed_statistics_value_is_refused() -> None:
    xml = without_unsupported_features(FULL_IN).replace("<sent>986</sent>", "<sent>lots</sent>")
    with pytest.raises(InvalidInputError, match="<statistics><sent> 'lots' is not an integer"):
        parse(xml)
    negative = without_unsupported_features(FULL_IN).replace("<sent>986", "<sent>-1")
    with pytest.raises(InvalidInputError, match="<statistics><sent>"):
        parse(negative)


def test_a_graphics_type_other_than_spice_or_vnc_is_refused() -> None:
    xml = without_unsupported_features(MODERN_DOM_OUT_SOURCE).replace("'spice'", "'rdp'")
    with pytest.raises(UnsupportedError, match="graphics type 'rdp'"):
        parse(xml)


def test_a_persistent_definition_that_is_not_a_domain_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="root element is <network>, not <domain>"):
        make_cookie("upstream", GUEST_UUID, "alpha", SOURCE_HOST_UUID,
                    persistent_xml="<network/>")


# --- statistics from QEMU's query-migrate ----------------------------------------------------

QUERY_MIGRATE_COMPLETED = {
    "status": "completed", "total-time": 3950, "downtime": 38, "setup-time": 6,
    "expected-downtime": 300,
    "ram": {
        "transferred": 540123456, "remaining": 0, "total": 537919488, "duplicate": 101234,
        "normal": 131072, "normal-bytes": 536870912, "dirty-pages-rate": 0, "mbps": 3600.5,
        "dirty-sync-count": 4, "page-size": 4096, "postcopy-requests": 0,
        "multifd-bytes": 0, "pages-per-second": 98000,
    },
}


def test_statistics_from_a_completed_query_migrate_reply_use_libvirts_mapping() -> None:
    stats = statistics_from_query_migrate(
        QUERY_MIGRATE_COMPLETED, started_ms=1700000000000, stopped_ms=1700000004000)
    assert stats == CookieStatistics(
        started=1700000000000, stopped=1700000004000, sent=1700000004000, time_elapsed=4000,
        downtime=38, setup_time=6, memory_total=537919488, memory_processed=540123456,
        memory_remaining=0, memory_bps=450062500, memory_constant=101234,
        memory_normal=131072, memory_normal_bytes=536870912, memory_dirty_rate=0,
        memory_iteration=4, memory_postcopy_requests=0, memory_page_size=4096,
    )
    root = etree.fromstring(
        make_cookie("upstream", GUEST_UUID, "alpha", SOURCE_HOST_UUID, statistics=stats)
        .to_xml())
    assert root.findtext("statistics/memory_bps") == "450062500"
    assert root.find("statistics/compression_cache") is None


def test_statistics_of_an_active_migration_use_the_expected_downtime() -> None:
    reply = {"return": {**QUERY_MIGRATE_COMPLETED, "status": "active",
                        "cpu-throttle-percentage": 20,
                        "xbzrle-cache": {"cache-size": 67108864, "bytes": 1000, "pages": 10,
                                         "cache-miss": 5, "overflow": 1}}}
    stats = statistics_from_query_migrate(reply, started_ms=10, stopped_ms=5, sent_ms=7)
    assert (stats.downtime, stats.auto_converge_throttle, stats.time_elapsed, stats.sent) == (
        300, 20, 0, 7)
    assert (stats.compression_cache, stats.compression_cache_misses) == (67108864, 5)


def test_statistics_of_a_migration_in_setup_have_no_memory_figures() -> None:
    stats = statistics_from_query_migrate({"status": "setup", "ram": {"total": 5}},
                                          started_ms=0, stopped_ms=1)
    assert (stats.memory_total, stats.memory_constant, stats.downtime) == (0, None, None)


def test_a_query_migrate_reply_without_status_or_ram_totals_is_an_error() -> None:
    with pytest.raises(MigrationError, match="no status"):
        statistics_from_query_migrate({}, started_ms=0, stopped_ms=1)
    with pytest.raises(MigrationError, match="ram 'remaining' is missing"):
        statistics_from_query_migrate(
            {"status": "active", "ram": {"transferred": 1, "total": 2}},
            started_ms=0, stopped_ms=1)


def test_services_still_find_the_codec_under_tasks_cookie() -> None:
    assert tasks.cookie.parse is parse and tasks.cookie.Cookie is Cookie
    assert tasks.cookie.statistics_from_query_migrate is statistics_from_query_migrate
    cookie = tasks.cookie.make_cookie("g", GUEST_UUID, "alpha", SOURCE_HOST_UUID)
    assert tasks.cookie.parse(cookie.to_xml()) == cookie
