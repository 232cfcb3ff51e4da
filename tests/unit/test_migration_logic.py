"""Pure migration logic: parameters, URIs, flags, chain state, job info."""

from __future__ import annotations

import json

import pytest

from tasks.migrate_client import build_chain, params_from_options
from workers.errors import InvalidInputError, OperationInvalidError, QemuError, UnsupportedError
from workers.job_types import JobOperation, Phase
from workers.jobs import ActiveJob, jobinfo_view
from workers.migration.chain_state import MigrationState, rebuild_error
from workers.migration.params import MigrationFlags, MigrationParams, parse_qemu_uri


def test_flags_have_libvirts_bit_values() -> None:
    assert MigrationFlags.LIVE == 1 and MigrationFlags.PEER2PEER == 2
    assert MigrationFlags.TUNNELLED == 4 and MigrationFlags.PERSIST_DEST == 8
    assert MigrationFlags.UNDEFINE_SOURCE == 16 and MigrationFlags.PAUSED == 32
    assert MigrationFlags.CHANGE_PROTECTION == 256 and MigrationFlags.OFFLINE == 1024
    assert MigrationFlags.COMPRESSED == 2048 and MigrationFlags.ABORT_ON_ERROR == 4096
    assert MigrationFlags.AUTO_CONVERGE == 8192 and MigrationFlags.POSTCOPY == 32768


@pytest.mark.parametrize("uri, parsed", [
    ("tcp:10.0.0.2:49152", ("tcp", "10.0.0.2", 49152)),
    ("tcp://host.example:4444", ("tcp", "host.example", 4444)),
    ("tcp:127.0.0.1", ("tcp", "127.0.0.1", None)),
    ("tcp:[::1]:5000", ("tcp", "::1", 5000)),
    ("unix:/run/m.sock", ("unix", "/run/m.sock", None)),
])
def test_tcp_and_unix_uris_are_parsed_in_qemu_and_libvirt_forms(
        uri: str, parsed: tuple[str, str, int | None]) -> None:
    assert parse_qemu_uri(uri) == parsed


@pytest.mark.parametrize("uri", ["exec:cat >/tmp/x", "fd:3", "rdma:1.2.3.4:5", "file:/x"])
def test_every_other_uri_scheme_is_refused_naming_it(uri: str) -> None:
    with pytest.raises(UnsupportedError) as err:
        parse_qemu_uri(uri)
    assert uri.split(":")[0] in str(err.value)


@pytest.mark.parametrize("uri", ["tcp:host:0", "tcp:host:70000", "tcp::5", "unix:rel"])
def test_malformed_uris_are_refused(uri: str) -> None:
    with pytest.raises(InvalidInputError):
        parse_qemu_uri(uri)


def test_options_become_flags_and_unknown_options_are_refused() -> None:
    p = params_from_options("g", "a", "b", live=True, persistent=True, undefinesource=True)
    assert p.fl == MigrationFlags.LIVE | MigrationFlags.PERSIST_DEST | \
        MigrationFlags.UNDEFINE_SOURCE
    assert p.flag_names() == ["live", "persist_dest", "undefine_source"]
    with pytest.raises(InvalidInputError, match="colour"):
        params_from_options("g", "a", "b", colour="red")


@pytest.mark.parametrize("kwargs, needle", [
    ({"flags": 1024}, "persist_dest"),
    ({"flags": 1024 | 8 | 1}, "cannot be live"),
    ({"protocol": 4}, "protocol"),
    ({"protocol": 2, "flags": 256}, "v3"),
    ({"dest": "a"}, "same host"),
    ({"bandwidth_mib_s": -1}, "bandwidth"),
    ({"bandwidth_mib_s": 1 << 30}, "bandwidth"),
    ({"max_downtime_ms": 10**10}, "max downtime"),
    ({"flags": 32768}, "must be live"),
    ({"flags": 32768 | 4 | 2 | 1}, "post-copy cannot be tunnelled"),
    ({"flags": 32768 | 1, "protocol": 2}, "post-copy needs migration protocol v3"),
])
def test_inconsistent_parameters_are_refused_before_anything_starts(
        kwargs: dict[str, object], needle: str) -> None:
    base: dict[str, object] = {"domain": "g", "source": "a", "dest": "b"}
    base.update(kwargs)
    with pytest.raises(InvalidInputError, match=needle):
        MigrationParams(**base)  # type: ignore[arg-type]


def test_parameters_survive_json() -> None:
    p = MigrationParams("g", "a", "b", flags=9, xmlin="<domain/>", timeout_s=5)
    assert MigrationParams.from_json(p.to_json()) == p


def test_the_first_error_wins_and_later_ones_are_kept_as_cleanup_errors() -> None:
    st = MigrationState(MigrationParams("g", "a", "b"))
    st = st.with_error(QemuError("perform broke").at(phase="perform3", host="a"))
    st = st.with_error(OperationInvalidError("resume broke").at(phase="confirm3", host="a"))
    assert st.error is not None and st.error["text"] == "perform broke"
    assert [e["text"] for e in st.cleanup_errors] == ["resume broke"]
    again = MigrationState.from_json(st.to_json())
    assert again == st
    err = rebuild_error(again.error)  # type: ignore[arg-type]
    assert isinstance(err, QemuError)
    assert str(err) == "phase perform3, host a: perform broke"


def test_a_managed_v3_chain_alternates_host_queues_with_job_task_ids() -> None:
    p = MigrationParams("g", "alpha", "beta", job_id="J")
    tasks = build_chain(p).tasks
    assert [(t.task, t.options["queue"], t.options["task_id"]) for t in tasks] == [
        ("ferry.begin3", "host.alpha", "J.begin3"), ("ferry.prepare3", "host.beta", "J.prepare3"),
        ("ferry.perform3", "host.alpha", "J.perform3"), ("ferry.finish3", "host.beta", "J.finish3"),
        ("ferry.confirm3", "host.alpha", "J.confirm3")]
    v2 = build_chain(MigrationParams("g", "alpha", "beta", protocol=2, job_id="K"), "<x/>")
    assert [t.task for t in v2.tasks] == ["ferry.prepare2", "ferry.perform2", "ferry.finish2"]


def test_job_info_names_the_direction_by_the_host_that_asks() -> None:
    rec = {"id": "J", "kind": "migration", "phase": Phase.PERFORM3.value, "source": "alpha",
           "dest": "beta", "started": 100.0, "error": None,
           "progress": {"memory_total": 10, "memory_processed": 4, "memory_remaining": 6,
                        "memory_bps": 5, "downtime": 3}}
    src = jobinfo_view(rec, "alpha", now=101.5)
    dst = jobinfo_view(rec, "beta", now=101.5)
    assert (src["type"], src["operation"], src["phase"]) == ("unbounded", "outgoing_migration",
                                                             "perform3")
    assert dst["operation"] == "incoming_migration"
    assert src["time_elapsed_ms"] == 1500 and src["data_remaining"] == 6
    assert jobinfo_view(None, "alpha")["type"] == "none"
    done = jobinfo_view({"type": "completed", "operation": "incoming_migration",
                         "statistics": {"downtime": 7, "setup_time": 2}}, "beta",
                        completed=True)
    assert (done["type"], done["downtime_ms"], done["setup_time_ms"]) == ("completed", 7, 2)


@pytest.mark.parametrize("data, needle", [
    ([1, 2], "JSON object"),
    ({"domain": "g", "source": "a"}, "lack dest"),
    ({"domain": 5, "source": "a", "dest": "b"}, "'domain'"),
    ({"domain": "g", "source": "a", "dest": "b", "flags": "1"}, "'flags'"),
    ({"domain": "g", "source": "a", "dest": "b", "flags": True}, "'flags'"),
    ({"domain": "g", "source": "a", "dest": "b", "timeout_s": 1.5}, "'timeout_s'"),
    ({"domain": "g", "source": "a", "dest": "b", "xmlin": ["x"]}, "'xmlin'"),
    ({"domain": "g", "source": "a", "dest": "b", "flags": -1}, "flags"),
])
def test_task_messages_with_wrong_types_or_missing_fields_are_clear_errors(
        data: object, needle: str) -> None:
    with pytest.raises(InvalidInputError, match=needle):
        MigrationParams.from_json(data)  # type: ignore[arg-type]


GOOD_PARAMS = {"domain": "g", "source": "a", "dest": "b", "job_id": "J"}


@pytest.mark.parametrize("data, needle", [
    ("state", "JSON object"),
    ({"xml": "<domain/>"}, "lacks params"),
    ({"params": [1]}, "parameters must be a JSON object"),
    ({"params": GOOD_PARAMS, "cookie": 5}, "'cookie' has the wrong type"),
    ({"params": GOOD_PARAMS, "was_running": "yes"}, "'was_running'"),
    ({"params": GOOD_PARAMS, "error": "boom"}, "'error'"),
    ({"params": GOOD_PARAMS, "phases": ["x"]}, "'phases' must be JSON objects"),
    ({"params": GOOD_PARAMS, "phases": [{"phase": "begin3"}]}, "bad phase record"),
    ({"params": GOOD_PARAMS, "cleanup_errors": [3]}, "'cleanup_errors'"),
])
def test_a_migration_state_of_the_wrong_shape_is_a_clear_error(data: object,
                                                               needle: str) -> None:
    with pytest.raises(InvalidInputError, match=needle):
        MigrationState.from_json(data)


def test_a_well_formed_state_still_round_trips() -> None:
    st = MigrationState(MigrationParams(**GOOD_PARAMS), cookie="<qemu-migration/>")
    assert MigrationState.from_json(st.to_json()) == st


def test_a_cancelled_job_stays_cancelled_through_the_status_file() -> None:
    """A source worker restarted twice before Perform still fails Perform."""
    job = ActiveJob("j1", JobOperation.OUTGOING_MIGRATION, Phase.BEGIN3, 1.0, source="a", dest="b",
                    cancelled="the source worker restarted while the dest prepared")
    again = ActiveJob.from_status(job.to_status())
    assert again.cancelled == job.cancelled
    assert ActiveJob.from_status(
        ActiveJob("j2", JobOperation.OUTGOING_MIGRATION, Phase.BEGIN3,
                  1.0).to_status()).cancelled == ""


def test_a_job_and_its_migration_state_survive_the_status_file_as_the_same_strings() -> None:
    st = MigrationState(MigrationParams(**GOOD_PARAMS), cookie="<qemu-migration/>")
    st = st.with_phase(Phase.BEGIN3, "a", 0.0, True)
    job = ActiveJob("J", JobOperation.OUTGOING_MIGRATION, Phase.PERFORM3_DONE, 1.0, state=st)
    text = job.to_status()
    raw = json.loads(text)
    assert (raw["operation"], raw["phase"]) == ("outgoing_migration", "perform3_done")
    assert raw["state"]["phases"][0]["phase"] == "begin3"
    again = ActiveJob.from_status(text)
    assert again.operation is JobOperation.OUTGOING_MIGRATION
    assert again.phase is Phase.PERFORM3_DONE
    assert again.state == st and again.state is not None
    assert again.state.phases[0].phase is Phase.BEGIN3
