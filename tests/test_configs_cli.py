"""normkd-configs --method: a method is named by its DISTILLER.TYPE or by the folder its configs sit in."""

from __future__ import annotations

import pytest
import yaml

from normkd_plugin import configs_cli
from normkd_plugin.config import resolve_config


def _table(capsys, *argv: str) -> list[list[str]]:
    configs_cli.main(list(argv))
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"{len(lines) - 2} configs"
    return [line.split() for line in lines[1:-1]]


@pytest.mark.parametrize("method", ["vanilla", "VANILLA", "none", "NONE"])
def test_the_vanilla_folder_and_its_type_none_list_the_same_configs(capsys, method):
    rows = _table(capsys, "--method", method)
    names = [row[-1] for row in rows]
    assert len(names) == 11 and all(name.startswith("cifar100/vanilla/") for name in names)
    for name in names:  # each file really is the student alone
        assert yaml.safe_load(resolve_config(name).read_text())["DISTILLER"]["TYPE"] == "NONE"


@pytest.mark.parametrize("method", ["kd", "normkd", "NORMDKD"])
def test_a_method_whose_folder_is_its_type_lists_that_folder(capsys, method):
    rows = _table(capsys, "--method", method, "--dataset", "cifar100")
    assert len(rows) == 11 and {row[-1].split("/")[1] for row in rows} == {method.lower()}


def test_a_misspelt_folder_name_is_one_line_with_the_near_name(capsys):
    with pytest.raises(SystemExit) as stop:
        configs_cli.main(["--method", "vanila"])
    captured = capsys.readouterr()
    assert stop.value.code == 2 and captured.out == ""
    assert captured.err == "normkd-configs: --method 'vanila': no packaged config has it; did you mean VANILLA?\n"
