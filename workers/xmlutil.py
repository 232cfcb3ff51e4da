"""Small lxml helpers shared by the domain XML codecs (workers/domain_xml.py, devices_xml.py).

Reading refuses an unknown child element by name; writing leaves out attributes
that are None, so a model's defaults never show up as invented XML.
"""

from __future__ import annotations

import re
from typing import Any

from lxml import etree

from workers.domain import check, check_enums
from workers.errors import UnsupportedError

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
Kids = dict[str, list[Any]]
# Elements with element children; every other known element must be a leaf.
CONTAINERS = {"os", "features", "cpu", "clock", "devices", "disk", "serial", "console"}
CONTAINERS |= {"graphics", "video", "memballoon", "target", "qemu:commandline", "interface"}
CONTAINERS |= {"channel", "controller", "rng", "watchdog", "portForward", "input", "pm"}
CONTAINERS |= {"numa", "cell", "distances"}


def tag(elem: Any) -> str:
    q = etree.QName(elem)
    prefix = "qemu:" if q.namespace == QEMU_NS else f"{elem.prefix}:" if elem.prefix else ""
    return prefix + q.localname


def kids(parent: Any, known: str, ignored: str = "", multi: str = "") -> Kids:
    """Children of `parent` by tag; unknown tags are refused by name, `ignored` ones skipped."""
    out: Kids = {}
    for child in parent:
        name = tag(child)
        if name in ignored.split():
            continue
        check(
            name in known.split() + multi.split(),
            f"unsupported element <{name}> in <{tag(parent)}>",
            UnsupportedError,
        )
        check(name not in out or name in multi.split(), f"duplicate <{name}> in <{tag(parent)}>")
        if name not in CONTAINERS and len(child):
            kids(child, "")
        out.setdefault(name, []).append(child)
    return out


def first(found: Kids, name: str) -> Any:
    """The child `name`, or an empty stand-in so attribute lookups give their defaults."""
    return found[name][0] if name in found else etree.Element(name)


def text(found: Kids, name: str) -> str | None:
    return (found[name][0].text or "").strip() if name in found else None


def integer(value: str | None, what: str, base: int = 10) -> int | None:
    """A decimal integer, or with base=0 libvirt's strtoul(base 0) reading of PCI
    addresses: 0x-hex, 0-octal ('010' is 8), else decimal."""
    if value is None:
        return None
    pattern = r"\s*-?[0-9]{1,9}\s*" if base == 10 else \
        r"\s*(0[xX][0-9a-fA-F]{1,8}|0[0-7]{0,11}|[1-9][0-9]{0,8})\s*"
    check(bool(re.fullmatch(pattern, value)), f"{what} {value!r} is not an integer")
    digits = value.strip()
    if base == 0 and len(digits) > 1 and digits[0] == "0" and digits[1] not in "xX":
        return int(digits, 8)
    return int(digits, base)


def yes(value: str | None, what: str) -> bool | None:
    check_enums("", (what, value, (None, "yes", "no", "on", "off")))
    return None if value is None else value in ("yes", "on")


def sub(parent: Any, element: str, content: str | None = None, /, *, when: bool = True,
        **attrs: object) -> Any:
    """Append <element> with the attributes that are not None, if `when`."""
    if not when:
        return None
    elem = etree.SubElement(parent, element,
                            {k: str(v) for k, v in attrs.items() if v is not None})
    elem.text = content
    return elem


def onoff(flag: bool | None, on: str = "on", off: str = "off") -> str | None:
    return None if flag is None else on if flag else off


def refuse_attrs(elem: Any, where: str, **allowed: tuple[str, ...]) -> None:
    """Guest-visible attributes ferry does not model: absent, or one of the values that
    change nothing (e.g. memballoon autodeflate='off'); anything else is refused."""
    for name, values in allowed.items():
        value = elem.get(name)
        check(value is None or value in values,
              f"{where} {name}={value!r} is not supported", UnsupportedError)
