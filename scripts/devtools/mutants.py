"""`make mutants`: deliberate bugs that the test suite must catch, one at a time.

Each mutant is a (file, exact old text, new text) replacement applied to a
scratch copy of the working tree (never to the checkout itself); the tests
chosen for it run against that copy and must fail.  A mutant whose old text
is not found exactly once is an error, so the list cannot silently rot when
the code changes under it.

The copy gets a venv of its own with no packages in it: a .pth file puts the
copy first on sys.path and this venv's site-packages (the dependencies) after
it, and a `ferry` script beside its python, which is what the tests' workers
run.  A canary proves it: the copy's workers package writes the pid and argv
of every process that imports it to FERRY_MUTANT_CANARY, and a run that
needs workers must show a `ferry worker` among them.

    python -m scripts.devtools.mutants [--only NAME,...] [--keep] [--docs]

Before the mutants, every chosen test runs once on the unchanged copy and must
pass (a test that fails anyway kills nothing).  The table goes to stdout;
`--docs` also writes it into docs/testing.md between the mutants markers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "testing.md"
BEGIN, END = "<!-- mutants:begin -->", "<!-- mutants:end -->"
E2E = "tests/e2e/"


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]

    @property
    def needs_workers(self) -> bool:
        return any(t.startswith(E2E) for t in self.tests)


MIGRATION = "tests/e2e/test_migration.py::test_live_migration_there_and_back_keeps_the_guest_" \
            "counting[3]"
PROOFS = "tests/e2e/test_migration_proofs.py::"

MUTANTS = (
    Mutant("confirm-keeps-source", "Confirm leaves the source running after success",
           "workers/migration/source.py",
           "    if dom.active:\n        await agent.kill(dom, ShutoffReason.MIGRATED)",
           "    if dom.active and False:\n        await agent.kill(dom, ShutoffReason.MIGRATED)",
           (MIGRATION,)),
    Mutant("finish-no-cont", "Finish does not start the CPUs (says running all the same)",
           "workers/migration/dest.py",
           "        await run_cpus(agent, dom, RunningReason.MIGRATED)  # takes the leases first",
           "        agent.set_state(dom, DomainState.RUNNING, RunningReason.MIGRATED)",
           (PROOFS + "test_a_restarted_worker_keeps_a_migrated_guest_running_as_migrated",)),
    Mutant("later-error-wins", "the first error replaced by a later one",
           "workers/migration/chain_state.py",
           "        if self.error is None:\n            return replace(self, error=exc.to_dict())",
           "        if True:\n            return replace(self, error=exc.to_dict())",
           ("tests/unit/test_migration_logic.py::test_the_first_error_wins_and_later_ones_are_"
            "kept_as_cleanup_errors",)),
    Mutant("same-host", "the same-host refusal removed (Prepare's cookie check)",
           "workers/migration/cookie.py",
           '    if local_hostuuid is not None and hostuuid == _uuid(local_hostuuid, "local host '
           'uuid"):',
           "    if False:",
           ("tests/unit/test_cookie.py::test_a_cookie_from_the_receiving_host_itself_is_refused",
            "tests/e2e/test_migration_options.py::test_same_host_uuid_is_refused_by_the_client_"
            "and_by_prepare")),
    Mutant("no-lockstate", "the lockstate left out of Perform's cookie",
           "workers/migration/source.py",
           "        lockstate = CookieLockstate(agent.locks.driver, dom.lockstate)",
           "        lockstate = None",
           ("tests/e2e/test_leases.py::test_a_lease_stolen_between_perform_and_finish_makes_"
            "finish_refuse_and_the_source_resume",)),
    Mutant("v2-with-leases", "the v2 refusal under a stateful lock manager removed",
           "workers/migration/guards.py",
           "    if agent.locks.keeps_state:\n        raise UnsupportedError(",
           "    if False:\n        raise UnsupportedError(",
           ("tests/e2e/test_leases.py::test_protocol_v2_is_refused_with_the_lease_manager_and_"
            "nothing_starts",)),
    Mutant("abort-ignored", "an abort signal answered but ignored",
           "workers/jobsignals/handlers.py",
           "async def _abort(agent: HostAgent, dom: DomainObj, args: dict[str, Any]) -> Any:\n",
           "async def _abort(agent: HostAgent, dom: DomainObj, args: dict[str, Any]) -> Any:\n"
           "    return {'aborted': True, 'phase': None, 'status': 'cancelled'}\n",
           ("tests/e2e/test_v2_faults.py::test_a_v2_fault_leaves_at_most_one_copy_and_the_error_"
            "says_where_the_guest_is[v2-managed-abort-copying]",)),
    Mutant("source-not-paused", "the source not paused at completion (kept as running)",
           "workers/migration/source.py",
           "    agent.set_state(dom, DomainState.PAUSED,\n"
           "                    PausedReason.POSTCOPY if postcopy else PausedReason.MIGRATION)",
           "    agent.set_state(dom, DomainState.RUNNING, RunningReason.UNPAUSED)",
           (PROOFS + "test_the_reported_statistics_are_qemus_own_figures",)),
    Mutant("restart-kills-guests", "a restarted worker kills the guests it finds",
           "workers/agent.py",
           "        proc = attach(pid, live.uuid)\n",
           "        proc = attach(pid, live.uuid)\n"
           "        if proc is not None:\n"
           "            os.kill(pid, signal.SIGKILL)\n",
           ("tests/e2e/test_lifecycle.py::test_worker_killed_and_restarted_finds_its_guest_running_"
            "with_the_same_pid",)),
    Mutant("compressor-shell", "a compressor started through a shell",
           "workers/image_stream.py",
           "            proc = await asyncio.create_subprocess_exec(\n"
           "                *argv, stdin=stdin,",
           "            proc = await asyncio.create_subprocess_shell(\n"
           "                ' '.join(argv), stdin=stdin,",
           ("tests/unit/test_no_shell.py",)),
    Mutant("tunnel-cancel-first", "the tunnel's sockets not closed with QEMU's cancel",
           "workers/migration/qemu_migrate.py",
           "    if dom.tunnel is not None:\n        closing = asyncio.get_running_loop()"
           ".run_in_executor(None, dom.tunnel.close)\n",
           "",
           (PROOFS + "test_abort_lands_while_qemu_is_blocked_on_a_full_tunnel",)),
    Mutant("nvram-left-behind", "the NVRAM a failed storage copy's Prepare made is kept",
           "workers/migration/storage_dest.py",
           "    storage.created.append(path)\n    ledger.add(job_id, d.name, path)\n"
           "    log.info(\"created NVRAM",
           "    log.info(\"created NVRAM",
           ("tests/e2e/test_guest_devices.py::test_a_failed_storage_copy_removes_the_nvram_"
            "prepare_made_and_the_source_runs_on",)),
    Mutant("swept-job-keeps-lines", "a job the sweeper ends keeps its admission places",
           "workers/sweeper.py",
           "                give_back_all(agent.redis, job_id, agent.host, "
           "str(rec.get(\"dest\") or \"\"))\n",
           "",
           ("tests/e2e/test_faults.py::test_a_job_record_whose_phases_were_lost_is_ended_by_"
            "the_sweeper_and_the_guest_moves",)),
    Mutant("abort-before-migrate-lost", "an abort just before QEMU's migrate left to the "
           "switch-over", "workers/migration/source.py",
           "        if job.abort:  # it came after check_abort",
           "        if False:  # it came after check_abort",
           ("tests/e2e/test_job_control.py::test_an_abort_just_before_qemus_migrate_cancels_"
            "the_stream_it_then_starts",)),
    Mutant("ioh3420-as-generic", "an ioh3420 root port started as QEMU's generic one",
           "workers/qemu_devices.py",
           '        out += ["-device", opts(f"{c.device},port=',
           '        out += ["-device", opts(f"pcie-root-port,port=',
           ("tests/unit/test_libvirt_domains.py::test_an_older_q35_guests_ioh3420_root_port_is_"
            "kept_in_its_xml_argv_and_abi",
            "tests/e2e/test_guest_devices.py::test_an_older_q35_guests_ioh3420_root_port_moves_"
            "with_its_device_behind_it")),
)

CANARY = """

# --- mutant canary (scripts/devtools/mutants.py; only in the scratch copy) ---
def _canary() -> None:
    import os
    import sys
    path = os.environ.get("FERRY_MUTANT_CANARY")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {' '.join(sys.argv[:3])}\\n")


_canary()
"""


@dataclass
class Outcome:
    mutant: Mutant
    result: str  # killed, SURVIVED, or error: ...
    seconds: float
    detail: str = ""


def copy_tree(dest: Path) -> None:
    """The working tree as it is (tracked and untracked, not ignored) into `dest`."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def make_venv(copy: Path) -> Path:
    """A venv whose python finds the copy first and this venv's packages after it."""
    venv = copy / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"], check=True,
                             capture_output=True, text=True).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    Path(purelib, "ferry-mutants.pth").write_text(f"{copy}\n{ours}\n")
    ferry = venv / "bin" / "ferry"
    ferry.write_text(f"#!{python}\nimport sys\nfrom scripts.cli.main import main\n"
                     "sys.exit(main())\n")
    ferry.chmod(0o755)
    return python


def apply(copy: Path, m: Mutant) -> str:
    """The file's text before the mutant; raises if the old text is not there exactly once."""
    path = copy / m.path
    text = path.read_text()
    if text.count(m.old) != 1:
        raise RuntimeError(f"mutant {m.name}: its old text is in {m.path} "
                           f"{text.count(m.old)} times, not once (the code changed?)")
    path.write_text(text.replace(m.old, m.new))
    return text


def run_tests(python: Path, copy: Path, tests: tuple[str, ...], canary: Path,
              timeout: float) -> tuple[int, str]:
    env = {**os.environ, "FERRY_MUTANT_CANARY": str(canary),
           "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    try:
        proc = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               *tests], cwd=copy, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f}s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    why = next((ln.strip()[:160] for ln in lines if ln.startswith("E ")), "")
    last = lines[-1] if lines else proc.stderr.strip()[-300:]
    return proc.returncode, f"{last}; {why}" if why else last


def check_canary(canary: Path, copy: Path, workers: bool) -> str | None:
    """None if the copy's code ran where it had to; else what is wrong."""
    lines = canary.read_text().splitlines() if canary.exists() else []
    if not lines:
        return "the copy's code was not imported (canary silent)"
    if workers and not any(" worker" in ln for ln in lines):
        return "no spawned worker ran the copy's code (canary)"
    return None


def one(python: Path, copy: Path, m: Mutant, timeout: float) -> Outcome:
    canary = copy / f".canary-{m.name}"
    started = time.monotonic()
    before = apply(copy, m)
    try:
        rc, last = run_tests(python, copy, m.tests, canary, timeout)
    finally:
        (copy / m.path).write_text(before)
    took = time.monotonic() - started
    wrong = check_canary(canary, copy, m.needs_workers)
    if wrong:
        return Outcome(m, f"error: {wrong}", took, last)
    if rc == 1:
        return Outcome(m, "killed", took, last)
    if rc == 0:
        return Outcome(m, "SURVIVED", took, last)
    return Outcome(m, f"error: pytest exit {rc}", took, last)


def baseline(python: Path, copy: Path, mutants: list[Mutant], timeout: float) -> None:
    tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
    canary = copy / ".canary-baseline"
    rc, last = run_tests(python, copy, tests, canary, timeout * len(mutants))
    if rc != 0:
        raise SystemExit(f"the chosen tests fail without any mutant ({last}): fix them first")
    wrong = check_canary(canary, copy, any(m.needs_workers for m in mutants))
    if wrong:
        raise SystemExit(f"the scratch copy is not what runs: {wrong}")
    print(f"baseline: {len(tests)} tests pass on the unchanged copy ({last})", flush=True)


def table(outcomes: list[Outcome]) -> str:
    lines = ["| mutant | bug | file | tests run | result | s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for o in outcomes:
        tests = "<br>".join(t.replace("tests/", "").replace("_", "\\_") for t in o.mutant.tests)
        lines.append(f"| {o.mutant.name} | {o.mutant.what} | {o.mutant.path} | {tests} | "
                     f"{o.result} | {o.seconds:.0f} |")
    return "\n".join(lines) + "\n"


def write_docs(text: str) -> None:
    doc = DOCS.read_text()
    block = f"{BEGIN}\n{text}{END}"
    if BEGIN in doc and END in doc:
        doc = doc[:doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    DOCS.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--only", help="comma-separated mutant names")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy")
    ap.add_argument("--docs", action="store_true", help="write the table into docs/testing.md")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per mutant's tests")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only.split(",")]
    work = Path(tempfile.mkdtemp(prefix="ferry-mutants-", dir="/tmp"))
    copy = work / "ferry"
    try:
        copy_tree(copy)
        for m in chosen:  # every old text is there before any test runs
            apply(copy, m)
            shutil.copy2(ROOT / m.path, copy / m.path)
        Path(copy / "workers" / "__init__.py").write_text(
            (ROOT / "workers" / "__init__.py").read_text() + CANARY)
        python = make_venv(copy)
        baseline(python, copy, chosen, args.timeout)
        outcomes = []
        for m in chosen:
            o = one(python, copy, m, args.timeout)
            print(f"{m.name}: {o.result} in {o.seconds:.0f}s ({o.detail})", flush=True)
            outcomes.append(o)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = table(outcomes)
    survived = sum(o.result != "killed" for o in outcomes)
    stamp = dt.date.today().isoformat()
    summary = f"{len(outcomes) - survived} of {len(outcomes)} mutants killed ({stamp})\n"
    print("\n" + text + "\n" + summary)
    if args.docs and not args.only:
        write_docs(f"Last run {stamp}: {len(outcomes) - survived} of {len(outcomes)} mutants "
                   f"killed.\n\n{text}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
