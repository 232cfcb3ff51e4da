"""Parallel connections and compression: libvirt's rules, QEMU's capabilities and
parameters on both ends, and the figures domjobinfo adds."""

from __future__ import annotations

from typing import Any

import pytest

from tasks.migrate_client import params_from_options
from workers.errors import InvalidInputError, UnsupportedError
from workers.jobs import STREAM_FIELDS, jobinfo_view
from workers.migration import stream_caps, stream_stats
from workers.migration.params import MigrationFlags, MigrationParams

PARALLEL = int(MigrationFlags.LIVE | MigrationFlags.PARALLEL)


def _params(**kw: Any) -> MigrationParams:
    return MigrationParams("g", "a", "b", **kw)


def test_parallel_and_compressed_have_libvirts_bit_values() -> None:
    assert MigrationFlags.PARALLEL == 131072 and MigrationFlags.COMPRESSED == 2048


def test_parallel_opens_libvirts_two_connections_unless_told_how_many() -> None:
    assert _params(flags=PARALLEL).channels == 2
    assert _params(flags=PARALLEL, parallel_connections=7).channels == 7
    assert _params().channels == 0


def test_a_bare_compressed_flag_means_xbzrle_as_in_libvirt() -> None:
    assert _params(flags=1 | 2048).compression == ("xbzrle",)
    assert _params(flags=PARALLEL, comp_methods=["zstd"]).compression == ("zstd",)
    assert _params().compression == ()


@pytest.mark.parametrize("kwargs, message", [
    ({"flags": PARALLEL, "parallel_connections": 0}, "parallel connections must be in 1..255"),
    ({"flags": PARALLEL, "parallel_connections": 300}, "parallel connections must be in"),
    ({"parallel_connections": 4}, "Turn parallel migration on to tune it"),
    ({"comp_methods": ["zstd"]}, "Compression method 'zstd' is only supported with parallel"),
    ({"comp_methods": ["zlib"]}, "Compression method 'zlib' is only supported with parallel"),
    ({"flags": PARALLEL, "comp_methods": ["xbzrle"]}, "'xbzrle' isn't supported with parallel"),
    ({"comp_methods": ["lz4"]}, "Unsupported compression method 'lz4'"),
    ({"comp_methods": ["xbzrle", "xbzrle"]}, "'xbzrle' is specified twice"),
    ({"flags": PARALLEL, "comp_methods": ["zstd", "zlib"]}, "Only one compression method"),
    ({"flags": PARALLEL | 2048}, "No compression algorithm selected for parallel"),
    ({"comp_xbzrle_cache": 1 << 20}, "Turn xbzrle compression on to tune it"),
    ({"flags": 2049, "comp_xbzrle_cache": 3 << 12}, "power of two"),
    ({"flags": 2049, "comp_xbzrle_cache": 2048}, "power of two"),
    ({"flags": PARALLEL, "comp_methods": ["zlib"], "comp_zstd_level": 3},
     "Turn zstd compression on to tune it"),
    ({"flags": PARALLEL, "comp_methods": ["zstd"], "comp_zstd_level": 21}, "0..20"),
    ({"flags": PARALLEL, "comp_methods": ["zlib"], "comp_zlib_level": 10}, "0..9"),
    ({"flags": PARALLEL | int(MigrationFlags.POSTCOPY)}, "post-copy"),
    ({"comp_methods": [3]}, "list of strings"),
    ({"flags": PARALLEL, "parallel_connections": "4"}, "must be an integer"),
])
def test_bad_combinations_are_refused_with_one_line_before_anything_starts(
        kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        _params(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_mt_method_is_refused_as_unsupported_saying_why() -> None:
    with pytest.raises(UnsupportedError, match="deprecated"):
        _params(comp_methods=["mt"])


def test_client_options_and_a_comma_list_become_the_same_parameters() -> None:
    p = params_from_options("g", "a", "b", live=True, parallel=True, parallel_connections=4,
                            compressed=True, comp_methods="zstd", comp_zstd_level=3)
    assert p.fl & MigrationFlags.PARALLEL and p.fl & MigrationFlags.COMPRESSED
    assert (p.channels, p.compression, p.comp_zstd_level) == (4, ("zstd",), 3)
    assert MigrationParams.from_json(p.to_json()) == p
    assert p.to_json()["comp_methods"] == ["zstd"]
    assert _params(comp_methods=" xbzrle ").compression == ("xbzrle",)


def test_the_same_stream_parameters_go_to_both_ends() -> None:
    p = _params(flags=PARALLEL, parallel_connections=4, comp_methods=["zstd"],
                comp_zstd_level=5)
    assert stream_caps.parameters(p) == {
        "multifd-compression": "zstd", "multifd-channels": 4, "multifd-zstd-level": 5,
        "multifd-zlib-level": 1}
    src = stream_caps.capabilities(p, outgoing=True, two_way=True)
    dst = stream_caps.capabilities(p, outgoing=False, two_way=True)
    shared = ("multifd", "xbzrle", "return-path", "postcopy-ram")
    assert [src[c] for c in shared] == [dst[c] for c in shared] == [True, False, True, False]
    assert src["pause-before-switchover"] and "pause-before-switchover" not in dst
    assert dst["late-block-activate"] and "late-block-activate" not in src


def test_every_capability_is_set_off_too_so_a_reused_qemu_forgets_the_last_migration() -> None:
    caps = stream_caps.capabilities(_params(), outgoing=True, two_way=False)
    assert caps["multifd"] is False and caps["xbzrle"] is False
    assert caps["return-path"] is False
    assert stream_caps.parameters(_params())["multifd-compression"] == "none"


def test_xbzrle_gets_its_cache_on_both_ends_with_qemus_default_unless_given() -> None:
    assert stream_caps.parameters(_params(flags=2049))["xbzrle-cache-size"] == 64 << 20
    p = _params(flags=2049, comp_xbzrle_cache=1 << 27)
    assert stream_caps.parameters(p)["xbzrle-cache-size"] == 1 << 27
    assert stream_caps.capabilities(p, outgoing=False, two_way=True)["xbzrle"] is True
    assert stream_caps.as_qmp({"xbzrle": True}) == [{"capability": "xbzrle", "state": True}]


def test_figures_name_channels_methods_and_cache_hits() -> None:
    p = _params(flags=2049)
    stats = {"compression_pages": 10, "compression_overflow": 2}
    assert stream_stats.figures(p, stats, None) == {
        "parallel_connections": None, "compression_methods": ["xbzrle"], "stream_bytes": None,
        "compression_cache_hits": 12}
    assert stream_stats.figures(_params(flags=PARALLEL), {}, 5)["parallel_connections"] == 2


def test_the_guest_pause_runs_from_the_sources_stop_to_the_dests_resume() -> None:
    mark = stream_stats.stop_mark(100.25, since=100.0)
    assert mark == {"stop_event_us": 100_250_000}
    assert stream_stats.guest_pause_ms(mark, 100.2625, since=100.1) == 12.5
    assert stream_stats.stop_mark(99.0, since=100.0) == {}  # a STOP before this migration
    assert stream_stats.guest_pause_ms(mark, 100.2, since=100.3) is None  # an older RESUME
    assert stream_stats.guest_pause_ms({}, 101.0, since=100.0) is None


def test_domjobinfo_shows_the_stream_fields_without_renaming_any() -> None:
    view = jobinfo_view(None, "a")
    assert all(view[k] is None for k in STREAM_FIELDS)
    record = {"type": "completed", "operation": "outgoing_migration", "id": "j",
              "statistics": {"memory_total": 4, "parallel_connections": 4,
                             "compression_methods": ["zstd"], "stream_bytes": 99,
                             "guest_pause_ms": 12.5}}
    view = jobinfo_view(record, "a", completed=True)
    assert (view["data_total"], view["parallel_connections"], view["stream_bytes"],
            view["guest_pause_ms"]) == (4, 4, 99, 12.5)


def test_a_save_to_a_file_turns_off_what_an_earlier_migration_left_on() -> None:
    caps = stream_caps.file_capabilities()
    assert caps.pop("events") is True and not any(caps.values())
    assert {"multifd", "xbzrle", "return-path", "pause-before-switchover"} <= set(caps)


class _Mon:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    async def execute(self, cmd: str, args: object = None) -> dict[str, object]:
        self.calls.append((cmd, args))
        return {}


def _job_dom(abort: bool = False) -> Any:
    from workers.domobj import DomainObj
    from workers.job_types import JobOperation, Phase
    from workers.jobs import ActiveJob

    dom = DomainObj(definition=None)
    dom.job = ActiveJob("j", JobOperation.OUTGOING_MIGRATION, Phase.PERFORM3, 0.0, abort=abort)
    return dom


def test_the_switch_over_runs_the_hooks_in_order_then_lets_qemu_go_on() -> None:
    import asyncio

    from workers.migration.qemu_migrate import switch_over

    dom, mon, seen = _job_dom(), _Mon(), []

    def hook(name: str) -> Any:
        async def run() -> None:
            seen.append((name, list(mon.calls)))
        return run

    dom.job.switchover_hooks += [hook("mirrors"), hook("other")]
    asyncio.run(switch_over(dom, mon))  # type: ignore[arg-type]
    assert seen == [("mirrors", []), ("other", [])]
    assert mon.calls == [("migrate-continue", {"state": "pre-switchover"})]


def test_a_hook_that_fails_or_an_abort_at_the_switch_over_never_lets_qemu_go_on() -> None:
    import asyncio

    from workers.errors import MigrationError, QemuError
    from workers.migration.qemu_migrate import switch_over

    dom, mon = _job_dom(), _Mon()

    async def broken() -> None:
        raise QemuError("mirror failed")

    dom.job.switchover_hooks.append(broken)
    with pytest.raises(QemuError, match="mirror failed"):
        asyncio.run(switch_over(dom, mon))  # type: ignore[arg-type]
    dom, mon = _job_dom(abort=True), _Mon()
    with pytest.raises(MigrationError, match="aborted"):
        asyncio.run(switch_over(dom, mon))  # type: ignore[arg-type]
    assert mon.calls == []
