"""Argument parsing of the `tokenbridge` command (the subcommands' work is tested in the module tests)."""

from __future__ import annotations

import pytest

from tokenbridge import cli


def _parse(monkeypatch, argv: list[str]):
    seen = []
    for name in ("cmd_repro", "cmd_reconstruct"):
        monkeypatch.setattr(cli, name, seen.append)
    cli.main(argv)
    return seen[0]


def test_overrides_before_and_after_options_are_all_kept(monkeypatch):
    args = _parse(monkeypatch, ["repro", "table2a", "model.levels=16", "--scale", "tiny", "train.steps=400",
                                "eval.cfg=2.0"])
    assert args.name == "table2a" and args.scale == "tiny"
    assert args.overrides == ["model.levels=16", "train.steps=400", "eval.cfg=2.0"]


def test_unknown_options_are_still_rejected(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(monkeypatch, ["repro", "table2a", "--scale", "tiny", "--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(monkeypatch, ["reconstruct", "levels=3"])  # reconstruct takes no overrides
