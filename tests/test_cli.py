"""_cli.parse_with_overrides: flags anywhere among KEY VALUE overrides, every VALUE as the user wrote it."""

from __future__ import annotations

import pytest
import yaml

from normkd_plugin._cli import parse_with_overrides
from normkd_plugin.train import parser

# VALUEs that argparse reads as negative numbers (-1), as unknown flags (-1e-3, -inf, -x, --weird)
OVERRIDES = [
    "SOLVER.LR", "-1", "EXPERIMENT.SEED", "-1", "SOLVER.WEIGHT_DECAY", "-1e-3", "SOLVER.MOMENTUM", "-inf",
    "EXPERIMENT.NAME", "-x", "EXPERIMENT.TAG", "--weird",
]  # fmt: skip
FLAGS = ["--cfg", "a", "--resume", "--device", "cpu", "--seeds=0,1", "--time-limit", "8m"]


@pytest.mark.parametrize(
    "argv",
    [
        [*FLAGS, *OVERRIDES],
        [*OVERRIDES, *FLAGS],
        [*OVERRIDES[:2], *FLAGS[:3], *OVERRIDES[2:10], *FLAGS[3:5], *OVERRIDES[10:], *FLAGS[5:]],
        [*FLAGS[:2], *OVERRIDES[:10], *FLAGS[2:], "--", *OVERRIDES[10:]],
    ],
    ids=["flags before", "flags after", "flags between", "flags between and --"],
)
def test_flags_anywhere_and_values_as_written(argv):
    args = parse_with_overrides(parser(), argv)
    assert args.opts == OVERRIDES and args.key_without_value is None
    assert (args.cfg, args.resume, args.device, args.seeds, args.time_limit) == (["a"], True, "cpu", "0,1", "8m")
    # plain strings: the namespace can be written as YAML like any other
    assert yaml.safe_load(yaml.safe_dump(vars(args))) == vars(args)


@pytest.mark.parametrize(
    ("argv", "opts", "key"),
    [
        (["A", "1", "B", "--resume", "C", "2"], ["A", "1", "C", "2"], "B"),
        (["A", "1", "B", "--res"], ["A", "1"], "B"),  # an abbreviated flag is a flag, after a KEY too
        (["B", "--device", "cpu", "A", "1"], ["A", "1"], "B"),
        (["A", "1", "B"], ["A", "1"], "B"),
        (["B", "--", "1"], [], "B"),  # -- ends the flags; it is not B's VALUE
        (["--", "A", "--resume", "B"], ["A", "--resume"], "B"),
    ],
)
def test_a_key_followed_by_a_flag_or_nothing_has_no_value(argv, opts, key):
    args = parse_with_overrides(parser(), argv)
    assert (args.opts, args.key_without_value) == (opts, key)


@pytest.mark.parametrize("stray", ["-1", "--nope", "-x"])
def test_a_stray_dash_token_where_a_key_should_stand_is_refused(stray, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_with_overrides(parser(), ["A", "1", stray, "--resume"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"normkd-train: error: unrecognized arguments: {stray}"
