"""The `ferry` command's own client (tasks/quick.py) on brokers that ask more of it:
a password and mutual TLS.  It must send without Celery, verify the broker as
every other ferry client does, and print what Celery's client prints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from scripts.testbed.stack import RedisTls, Stack
from tests.certs import ca_and_server, client_of
from tests.conftest import Guest

FERRY = str(Path(sys.executable).with_name("ferry"))
HEAVY = {"celery", "kombu", "redis"}


def _ferry(env: dict[str, str], *args: str, celery: bool = False
           ) -> tuple[int, str, str, set[str]]:
    """(exit status, stdout, the last line of stderr, top-level packages imported)."""
    run_env = dict(env, FERRY_CLI_FAST_PATH="0" if celery else "1")
    proc = subprocess.run([sys.executable, "-X", "importtime", FERRY, *args], env=run_env,
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    lines = proc.stderr.splitlines()
    mods = {line.split("|")[-1].strip().split(".")[0] for line in lines
            if line.startswith("import time:")}
    errors = [line for line in lines if not line.startswith("import time:")]
    return proc.returncode, proc.stdout, (errors[-1] if errors else ""), mods


def test_over_mutual_tls_with_a_password_the_command_sends_without_celery_and_reads_alike(
        make_guest: Callable[..., Guest]) -> None:
    root = Path(tempfile.mkdtemp(prefix="ferry-clq-", dir="/tmp"))
    ca, server = ca_and_server(root)
    mine = client_of(root, ca, "ferry-cli")
    st = Stack(root=root)
    st.extra_env.update({"FERRY_REDIS_CERT": str(mine.cert), "FERRY_REDIS_KEY": str(mine.key)})
    try:
        url = st.start_redis(password="pw-of-the-cli",
                             tls=RedisTls(server.cert, server.key, ca.cert, auth_clients=True))
        assert url.startswith("rediss://:pw-of-the-cli@")
        for name in ("q1", "q2"):
            st.start_worker(name)
        env = st.env()
        guest = make_guest(domain_type="qemu")
        xml = root / "guest.xml"
        xml.write_text(guest.xml)

        rc, out, err, mods = _ferry(env, "define", "-H", "q1", str(xml))
        assert rc == 0 and f"Domain '{guest.name}' defined on q1" in out, err
        assert not mods & HEAVY, mods & HEAVY
        assert _ferry(env, "start", "-H", "q1", guest.name)[0] == 0

        ours = _ferry(env, "dominfo", "-H", "q1", guest.name, "--json")
        theirs = _ferry(env, "dominfo", "-H", "q1", guest.name, "--json", celery=True)
        assert ours[0] == theirs[0] == 0
        assert json.loads(ours[1]) == json.loads(theirs[1])
        assert json.loads(ours[1])["state"] == "running"
        assert "celery" in theirs[3] and not ours[3] & HEAVY

        rc, out, err, mods = _ferry(env, "migrate", "-H", "q1", guest.name, "q2", "--live",
                                    "--json")
        assert rc == 0, err
        assert json.loads(out)["result"] == "completed"
        assert not mods & HEAVY, mods & HEAVY
        info = json.loads(_ferry(env, "dominfo", "-H", "q2", guest.name, "--json")[1])
        assert (info["state"], info["reason"]) == ("running", "migrated")

        # (the guests of a host follow its next heartbeat: left out)
        hosts = [[{k: v for k, v in h.items() if k != "guests"}
                  for h in json.loads(_ferry(env, "hosts", "--json", celery=c)[1])]
                 for c in (False, True)]
        assert hosts[0] == hosts[1] and [h["name"] for h in hosts[0]] == ["q1", "q2"]

        # What the broker refuses, the command reports in one line, as Celery's client
        for broken in ({"FERRY_BROKER_URL": url.replace("pw-of-the-cli", "nope")},
                       {"FERRY_REDIS_CERT": "", "FERRY_REDIS_KEY": ""},
                       {"FERRY_REDIS_CA": str(server.cert)},
                       {"FERRY_BROKER_URL": url.replace("rediss://", "redis://")}):
            bad_env = dict(env, **broken)
            ours = _ferry(bad_env, "list", "-H", "q2")
            theirs = _ferry(bad_env, "list", "-H", "q2", celery=True)
            assert ours[0] == theirs[0] == 1, broken
            assert ours[2].startswith("error: cannot reach the broker at "), ours[2]
            assert theirs[2].startswith("error: cannot reach the broker at "), theirs[2]
            assert not ours[3] & HEAVY
            # the same line up to the cause, whose words depend on when the server's
            # TLS alert arrives (a write or a read fails), for redis-py as for ours
            assert ours[2].split(" (")[0] == theirs[2].split(" (")[0]

        assert _ferry(env, "destroy", "-H", "q2", guest.name)[0] == 0
    finally:
        st.stop(kill_guests=True)
        if not os.environ.get("FERRY_TEST_KEEP"):
            shutil.rmtree(root, ignore_errors=True)
