"""Scripted chains of migrations for staging, each runnable as `python -m scripts.staging.NAME`.

    evacuate  move every active guest off a host, at most N at a time
    rolling   rolling maintenance: evacuate each host in turn, run a hook, move on
    soak      move one guest back and forth N times, latency percentiles

All talk to the broker named by FERRY_BROKER_URL through `tasks.client`;
`--json` gives machine output; the exit status is 0 only when every
migration succeeded.
"""
