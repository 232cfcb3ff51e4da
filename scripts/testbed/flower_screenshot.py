"""A PNG of Flower's task list after a migration, for the README.

    python -m scripts.testbed.flower_screenshot [--out docs/flower.png]

Starts its own redis-server, hosts alpha and beta and Flower (all on free
loopback ports, in a temporary state root), boots a small test guest,
migrates it alpha -> beta -> alpha, takes a screenshot of Flower's tasks
page with headless Chromium (Debian's `chromium` package, not installed by
`make setup`), and stops everything it started, by pid.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from config.settings import load
from scripts.testbed.flowerctl import Flower, start_flower
from scripts.testbed.guestimage import build_image
from scripts.testbed.guestxml import guest_xml
from scripts.testbed.stack import Stack, searchable, wait_for
from tasks.client import Client

NAME = "web1"
HOSTS = ("alpha", "beta")


def chromium_argv(chromium: str, profile: Path, out: Path, url: str) -> list[str]:
    return [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}", "--window-size=1400,900",
            "--virtual-time-budget=5000", "--hide-scrollbars", f"--screenshot={out}", url]


def _migrate(stack: Stack, root: Path, flower: Flower) -> list[str]:
    """Boot the guest on alpha, move it there and back; the job ids."""
    client = Client(load({"FERRY_BROKER_URL": stack.broker_url}))
    disk = build_image(root / "guest.img", dirty_mib=4, rate_mib_s=4)
    client.call("alpha", "define", xml=guest_xml(NAME, disk, root / "guest.serial",
                                                  memory_mib=64, domain_type="qemu"))
    client.call("alpha", "start", domain=NAME)
    jobs = []
    for src, dst in (("alpha", "beta"), ("beta", "alpha")):
        job = client.migrate(NAME, src, dst, live=True)
        summary = job.wait(timeout=120)
        print(f"{src} -> {dst}: {summary['result']} (job {job.id})")
        jobs.append(job.id)
    for job_id in jobs:
        wait_for(lambda j=job_id: len(flower.job_tasks(j)) == 5, 20,  # type: ignore[misc]
                 f"flower to list the phases of {job_id}")
    return jobs


def take(out: Path, chromium: str) -> None:
    root = searchable(Path(tempfile.mkdtemp(prefix="ferry-shot-", dir="/tmp")))
    stack = Stack(root=root)
    flower: Flower | None = None
    try:
        stack.start_redis()
        for name in HOSTS:
            stack.start_worker(name)
        flower = start_flower(stack.broker_url, root / "flower.log", env=stack.env())
        flower.wait_ready(list(HOSTS))
        _migrate(stack, root, flower)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)
        proc = subprocess.run(chromium_argv(chromium, root / "chromium", out.resolve(),
                                            f"{flower.url}/tasks"),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0 or not out.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"chromium failed with status {proc.returncode}: {last}")
        print(f"screenshot of {flower.url}/tasks in {out}")
    finally:
        if flower is not None:
            flower.stop()
        stack.stop(kill_guests=True)
        shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.testbed.flower_screenshot",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/flower.png"),
                        help="where to write the PNG (default: docs/flower.png)")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium")
    if chromium is None:
        print("error: chromium not found; install Debian's package: apt-get install -y chromium",
              file=sys.stderr)
        return 1
    try:
        take(args.out, chromium)
    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
