"""One ferry host in this process: the host agent and the services on its loop.

The agent (workers/agent.py) owns the guests; beside it run the job-signal
listener (workers/jobsignals/), which answers for the jobs the agent runs,
and the sweeper (workers/sweeper.py), which cleans up what a crash left.
Both use the agent, so they are built here, not by the agent.  The worker
entry point builds a Host, starts it, and stops it when the worker ends.
"""

from __future__ import annotations

import contextlib
import functools

from config.settings import Settings
from workers import sweeper
from workers.agent import HostAgent
from workers.jobsignals import handlers
from workers.jobsignals.listener import SignalListener


class Host:
    def __init__(self, settings: Settings) -> None:
        self.signals = SignalListener(settings)
        self.agent = HostAgent(settings, self.signals)

    def start(self) -> None:
        """Guests reconnected, signals answered, sweeper running; then the host is live."""
        agent = self.agent
        agent.start()
        agent.call(self.signals.start(functools.partial(handlers.dispatch, agent)), timeout=30)
        agent.spawn(sweeper.run_forever(agent))
        agent.announce()

    def stop(self) -> None:
        """Stop watching; never touches a guest (they outlive the worker)."""
        self.agent.withdraw()
        with contextlib.suppress(Exception):
            self.agent.call(self.signals.stop(), timeout=5)
        self.agent.stop()
