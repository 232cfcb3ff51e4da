"""The shipped `ferry` command (main.py) and the commands it runs.

    main         the parser and the domain commands; `ferry = scripts.cli.main:main`
    common       helpers every command module shares (client, host, output)
    migrate_cmd  migrate, domjobinfo and the job signals
    image_cmd    save, restore, dump
    worker       `ferry worker`: one host
    up, demo     a local ferry in the foreground; the guided demo
    formats      human (virsh-like) output
"""
