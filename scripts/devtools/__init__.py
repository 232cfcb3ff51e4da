"""Developer tools, not shipped behaviour.

    faults    run the fault matrix; `--docs` writes its table into docs/faults.md
    setup.sh  Debian packages and the venv (`make setup`)
"""
