"""host-model expanded as libvirt does: literal XML in, the named model and features out.

The host CPU and its models are literal (what QEMU's query-cpu-model-expansion would
say): an AMD host whose closest AMD model is Opteron_G2-v1; Nehalem-v1 has more
features but is Intel's, EPYC-v1 needs sha-ni, which the host lacks.
"""

from __future__ import annotations

import pytest

from workers.abi import abi_diff
from workers.cpucheck import CpuCaps, cpu_problems
from workers.cpumodel import CpuModel, HostCpu, best_model, expand_host_model, with_running_cpu
from workers.domain import DomainDef
from workers.domain_xml import format_domain_xml, parse_domain_xml
from workers.errors import UnsupportedError
from workers.qemu_devices import cpu_option

UUID = "8a1c2f3e-9d4b-4c5a-8e7f-1a2b3c4d5e6f"
AMD, INTEL = "AuthenticAMD", "GenuineIntel"
HOST = HostCpu(AMD, frozenset({"fpu", "sse", "sse2", "sse4.2", "avx2", "lahf-lm", "svm"}), (
    CpuModel("qemu64-v1", AMD, frozenset({"fpu", "sse"})),
    CpuModel("Opteron_G2-v1", AMD, frozenset({"fpu", "sse", "sse2"})),
    CpuModel("Nehalem-v1", INTEL, frozenset({"fpu", "sse", "sse2", "sse4.2"})),
    CpuModel("EPYC-v1", AMD, frozenset({"fpu", "sse", "sse2", "avx2", "sha-ni"})),
))


def domain(cpu: str) -> DomainDef:
    return parse_domain_xml(
        f"<domain type='qemu'><name>t</name><uuid>{UUID}</uuid><memory>65536</memory>{cpu}"
        "<os><type machine='pc'>hvm</type></os><devices/></domain>")


def cpu_xml(d: DomainDef) -> str:
    text = format_domain_xml(d, migratable=True)
    return "".join(line.strip() for line in
                   text[text.index("<cpu"):text.index("</cpu>") + 6].splitlines())


def test_host_model_becomes_the_closest_model_of_the_hosts_vendor_plus_its_other_features(
        ) -> None:
    d = expand_host_model(domain("<cpu mode='host-model'/>"), HOST)
    assert cpu_xml(d) == (
        '<cpu mode="custom"><model>Opteron_G2-v1</model>'
        '<feature policy="require" name="avx2"/><feature policy="require" name="lahf-lm"/>'
        '<feature policy="require" name="sse4.2"/><feature policy="require" name="svm"/>'
        '</cpu>')
    assert cpu_option(d, use_kvm=False) == (
        "Opteron_G2-v1,+avx2,+lahf-lm,+sse4.2,+svm,enforce")


def test_the_guests_own_features_apply_on_top_of_the_expansion() -> None:
    d = expand_host_model(domain("<cpu mode='host-model'><feature policy='disable' name='svm'/>"
                                 "<feature policy='require' name='avx2'/></cpu>"), HOST)
    assert cpu_xml(d) == (
        '<cpu mode="custom"><model>Opteron_G2-v1</model>'
        '<feature policy="require" name="lahf-lm"/><feature policy="require" name="sse4.2"/>'
        '<feature policy="disable" name="svm"/><feature policy="require" name="avx2"/></cpu>')


def test_hidden_features_are_left_out_of_the_model_and_the_features() -> None:
    d = expand_host_model(domain("<cpu mode='host-model'/>"), HOST, ["sse2", "lahf_lm"])
    assert cpu_xml(d) == (
        '<cpu mode="custom"><model>qemu64-v1</model>'
        '<feature policy="require" name="avx2"/><feature policy="require" name="sse4.2"/>'
        '<feature policy="require" name="svm"/></cpu>')


def test_ties_go_to_the_first_name_and_no_fitting_model_is_refused_by_name() -> None:
    twin = HostCpu(AMD, HOST.features, (*HOST.models, CpuModel("Athlon-v9", AMD,
                                                                frozenset({"fpu", "avx2", "sse"}))))
    assert best_model(twin).name == "Athlon-v9"
    with pytest.raises(UnsupportedError, match="no CPU model of this QEMU fits this host's "
                       "AuthenticAMD CPU"):
        best_model(HOST, ["fpu"])


def test_other_modes_are_left_as_they_are() -> None:
    for cpu in ("<cpu mode='host-passthrough'/>", "<cpu mode='custom'><model>Nehalem</model>"
                "</cpu>", ""):
        assert expand_host_model(domain(cpu), HOST) == domain(cpu)


def test_the_migratable_definition_of_an_expanded_guest_is_checked_like_a_custom_one() -> None:
    """What Prepare gets: a concrete model, so a dest hiding one of its features refuses it."""
    sent = parse_domain_xml(format_domain_xml(expand_host_model(
        domain("<cpu mode='host-model'/>"), HOST), migratable=True))
    assert (sent.cpu_mode, sent.cpu_model) == ("custom", "Opteron_G2-v1")
    dest = CpuCaps("tcg", {"Opteron_G2-v1": frozenset()},
                   frozenset({"fpu", "sse", "sse2", "sse4-2", "avx2", "lahf-lm", "svm"}),
                   {"Opteron_G2-v1": frozenset({"fpu", "sse", "sse2"})})
    assert cpu_problems(sent, dest) == []
    assert cpu_problems(sent, dest, ["avx2"]) == [
        "cpu features avx2 are required but this host lacks them"]


def test_a_host_model_target_definition_takes_the_running_cpu_for_the_abi_check() -> None:
    plain = domain("<cpu mode='host-model'/>")
    running = expand_host_model(plain, HOST)
    assert abi_diff(running, with_running_cpu(plain, running)) == []
    other = domain("<cpu mode='host-model'><feature policy='require' name='vmx'/></cpu>")
    assert with_running_cpu(other, running) == other
    assert abi_diff(running, other)[0] == (
        "target domain cpu mode host-model does not match source custom")
    custom = domain("<cpu mode='custom'><model>Nehalem</model></cpu>")
    assert with_running_cpu(custom, running) == custom
