"""The cookie and domain parsers, fed random and mutated input: a value or a one-line FerryError.

Inputs come from the real samples (libvirt's reference cookies, a cookie ferry
writes, libvirt's and the test guest's domain XML) by mutation (cut, repeat,
nest, numbers and attributes replaced by hostile values) as well as from
random text and bytes.  Each parse must end within a CPU-time bound per KB
of input: a quadratic check, or an indentation that grows with depth, shows.

`make test` runs a fixed (derandomized) set of a few hundred inputs, a few
seconds; FERRY_FUZZ_EXAMPLES=N runs N random ones per test for a longer hunt.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.errors import FerryError
from scripts.testbed.guestxml import guest_xml
from tests.unit.test_cookie import (
    BASIC_OUT,
    FULL_IN,
    MODERN_DOM_OUT_SOURCE,
    full_cookie,
    without_unsupported_features,
)
from tests.unit.test_domain_xml import FULL as FULL_DOMAIN
from workers.domain import DomainDef
from workers.domain_xml import format_domain_xml, parse_domain_xml
from workers.migration.cookie import Cookie, parse

_RANDOM = int(os.environ.get("FERRY_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_RANDOM or 150,
    derandomize=not _RANDOM,
    deadline=None,  # the bound is checked below in CPU time, per KB, not in wall time
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: CPU seconds allowed per parse: a floor plus a rate per KB (linear parsing is ~0.5 ms/KB)
FLOOR_S, PER_KB_S = 0.2, 0.003
MAX_BYTES = 1100 * 1024  # mutations stop growing an input here (the domain cap is 1 MiB)

COOKIES = [
    BASIC_OUT, FULL_IN, MODERN_DOM_OUT_SOURCE, full_cookie().to_xml(),
    without_unsupported_features(FULL_IN), without_unsupported_features(MODERN_DOM_OUT_SOURCE),
]
DOMAINS = [FULL_DOMAIN, guest_xml("fuzz", Path("/var/lib/ferry/fuzz.img"), Path("/tmp/fuzz.log"),
                                  disk_bus="virtio", vcpus=2)]
NUMBERS = ["9" * 5000, "0" * 5000 + "7", "-1", "18446744073709551616", "-9223372036854775809"]
HOSTILE = [
    "9" * 5000, "0" * 5000 + "7", "-1", "-0", "+5", "18446744073709551616", "4294967296",
    "-9223372036854775809", "1e9", "0x10", "", " ", "\t\n", "NaN", "&amp;", "&#0;", "&#x110000;",
    "&lol;", "<![CDATA[x]]>", "<!DOCTYPE d>", "é", "\u202e", "\U0001f600", "/", "../../etc",
    "a" * 3000, "vda", "hda", "spice", "vnc", "redis",
]


def _span(draw: st.DrawFn, text: str) -> tuple[int, int]:
    i = draw(st.integers(0, len(text)))
    return i, draw(st.integers(i, min(len(text), i + 400)))


def _cut(draw: st.DrawFn, text: str) -> str:
    i, j = _span(draw, text)
    return text[:i] + text[j:]


def _times(draw: st.DrawFn, text: str, piece: str, most: int) -> int:
    """How often to repeat `piece`: up to `most`, within MAX_BYTES."""
    room = max(0, MAX_BYTES - len(text)) // max(1, len(piece))
    return min(draw(st.one_of(st.integers(1, 50), st.integers(1, most))), max(1, room))


def _repeat(draw: st.DrawFn, text: str) -> str:
    i, j = _span(draw, text)
    return text[:j] + text[i:j] * _times(draw, text, text[i:j], 300) + text[j:]


def _insert(draw: st.DrawFn, text: str) -> str:
    i = draw(st.integers(0, len(text)))
    piece = draw(st.one_of(st.sampled_from(HOSTILE), st.text(max_size=40)))
    return text[:i] + piece + text[i:]


def _nest(draw: st.DrawFn, text: str) -> str:
    """Deep nesting at an element boundary (libxml2 stops at 256 levels)."""
    cuts = [m.end() for m in re.finditer(r">", text)] or [0]
    i, n = draw(st.sampled_from(cuts)), draw(st.integers(1, 300))
    tag = draw(st.sampled_from(["metadata", "a", "domain", "statistics", "disk"]))
    return text[:i] + f"<{tag}>" * n + f"</{tag}>" * n + text[i:]


def _number(draw: st.DrawFn, text: str) -> str:
    runs = list(re.finditer(r"[0-9]+", text))
    if not runs:
        return text
    m = draw(st.sampled_from(runs))
    number = draw(st.one_of(st.sampled_from(NUMBERS), st.sampled_from(HOSTILE)))
    return text[: m.start()] + number + text[m.end() :]


def _attribute(draw: st.DrawFn, text: str) -> str:
    values = list(re.finditer(r"=(['\"])([^'\"]*)\1", text))
    if not values:
        return text
    m = draw(st.sampled_from(values))
    value = draw(st.one_of(st.sampled_from(HOSTILE), st.text(max_size=20)))
    value = value.replace(m[1], "&apos;" if m[1] == "'" else "&quot;")
    return text[: m.start(2)] + value + text[m.end(2) :]


def _repeat_element(draw: st.DrawFn, text: str) -> str:
    elements = list(re.finditer(r"<(\w+)\b[^<>]*/>|<(\w+)\b[^<>]*>[^<>]*</\2>", text))
    if not elements:
        return text
    m = draw(st.sampled_from(elements))
    return text[: m.end()] + m[0] * _times(draw, text, m[0], 30000) + text[m.end() :]


def _compact(draw: st.DrawFn, text: str) -> str:
    """No whitespace between elements: more elements fit under a size cap."""
    return re.sub(r">\s+<", "><", text)


MUTATIONS: list[Callable[[st.DrawFn, str], str]] = [
    _cut, _repeat, _insert, _nest, _number, _attribute, _repeat_element, _compact,
]


@st.composite
def mutated(draw: st.DrawFn, samples: list[str]) -> str:
    text = draw(st.sampled_from(samples))
    for _ in range(draw(st.integers(1, 4))):
        text = draw(st.sampled_from(MUTATIONS))(draw, text)
    return text


def inputs(samples: list[str]) -> st.SearchStrategy[str | bytes]:
    return st.one_of(
        mutated(samples), mutated(samples), mutated(samples),
        st.text(max_size=2000), st.binary(max_size=2000),
    )


def outcome(parser: Callable[[str | bytes], object], data: str | bytes) -> object:
    """The parser's value, or its FerryError, checked for one line and the time bound."""
    size_kb = len(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data) / 1024
    started = time.process_time()
    try:
        value: object = parser(data)
    except FerryError as err:
        value = err
        message = str(err)
        assert message and "\n" not in message, f"not one line: {message!r}"
        assert len(message) < 1000, f"a message of {len(message)} characters"
    spent = time.process_time() - started
    assert spent < FLOOR_S + PER_KB_S * size_kb, f"{spent:.2f} s CPU for {size_kb:.0f} KB"
    return value


@FUZZ
@given(inputs(COOKIES))
def test_any_cookie_input_gives_a_cookie_or_a_one_line_error_in_bounded_time(
        data: str | bytes) -> None:
    cookie = outcome(parse, data)
    if isinstance(cookie, Cookie):
        written = outcome(lambda _: cookie.to_xml(), data)  # too large to write: a FerryError
        assert isinstance(written, FerryError) or parse(str(written)) == cookie


@FUZZ
@given(inputs(DOMAINS))
def test_any_domain_input_gives_a_definition_or_a_one_line_error_in_bounded_time(
        data: str | bytes) -> None:
    domain = outcome(parse_domain_xml, data)
    if isinstance(domain, DomainDef):
        assert parse_domain_xml(format_domain_xml(domain)) == domain


@pytest.mark.parametrize("sample", range(len(COOKIES)))
def test_the_mutation_samples_are_themselves_parsed_or_refused_for_their_features(
        sample: int) -> None:
    """The seeds are real: each parses, or is refused only for libvirt's unsupported features."""
    result = outcome(parse, COOKIES[sample])
    assert not isinstance(result, FerryError) or "hotplug" in str(result)
