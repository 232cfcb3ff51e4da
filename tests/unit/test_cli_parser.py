"""`ferry CMD` parses with CMD's parser alone; it must read arguments as the whole one does."""

from __future__ import annotations

import argparse

import pytest

from scripts.cli import image_cmd, main, migrate_cmd

ARGVS = [
    ["list", "-H", "alpha", "--all", "--json"],
    ["dominfo", "web1"],
    ["start", "web1", "--paused"],
    ["qemu-monitor-command", "-H", "a", "web1", "info", "status", "--hmp"],
    ["domblkstat", "web1"],
    ["migrate", "-H", "alpha", "web1", "beta", "--live", "--p2p", "--tunnelled",
     "--bandwidth", "100", "--protocol", "2", "--no-wait"],
    ["migrate-setspeed", "web1", "50"],
    ["domjobinfo", "web1", "--completed"],
    ["save", "web1", "/tmp/w.img", "--compress", "zstd", "--paused"],
    ["dump", "web1", "/tmp/w.core", "--memory-only", "--format", "kdump-zlib"],
    ["restore", "/tmp/w.img", "--running"],
    ["worker", "--host", "alpha", "--state-dir", "/tmp/s"],
    ["up", "--sentinel"],
    ["hosts"],
]


def _plain(ns: argparse.Namespace) -> dict[str, object]:
    """The namespace without its handler (a new closure in every parser)."""
    return {k: v for k, v in vars(ns).items() if k != "handler"}


@pytest.mark.parametrize("argv", ARGVS, ids=[a[0] for a in ARGVS])
def test_a_commands_own_parser_reads_what_the_whole_parser_reads(argv: list[str]) -> None:
    whole = main.build_parser().parse_args(argv)
    own = main.parse(argv)
    assert _plain(own) == _plain(whole)
    assert own.handler.__qualname__ == whole.handler.__qualname__


def test_the_command_lists_are_the_modules_own() -> None:
    assert main.MIGRATE_COMMANDS == migrate_cmd.COMMANDS
    assert main.IMAGE_COMMANDS == image_cmd.COMMANDS
    whole = main.build_parser()
    sub = next(a for a in whole._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {*main.OWN_COMMANDS, *main.MIGRATE_COMMANDS,
                                *main.IMAGE_COMMANDS}


def test_an_argument_error_is_the_whole_parsers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as out:
        main.parse(["list", "--bogus"])
    assert out.value.code == 2
    err = capsys.readouterr().err
    assert "ferry: error: unrecognized arguments: --bogus" in err
    assert "{worker,up,demo," in err  # the usage line of the whole parser
