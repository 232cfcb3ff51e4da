"""Developer tools, not shipped behaviour.

    faults    run the fault matrix and print its table
    setup.sh  Debian packages and the venv (`make setup`)
"""
