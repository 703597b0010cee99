"""The `vitsparse` command line, run in-process."""

from __future__ import annotations

import json

import pytest

from vitsparse.bench.cli import main, parse_assignment


def test_info_prints_structure_and_costs_as_json(capsys) -> None:
    code = main(["info", "deit_tiny_patch16_224", "--set", "img_size=32", "--set", "depth=2", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["depth"] == 2 and report["embed_dim"] == 192 and report["num_prefix_tokens"] == 1
    assert report["macs"] > 0 and 0 < report["nonzero_params"] <= report["params"]


def test_info_text_names_the_blocks(capsys) -> None:
    assert main(["info", "deit_tiny_patch16_224", "--set", "img_size=32", "--set", "depth=1"]) == 0
    out = capsys.readouterr().out
    assert "block 0: 3 heads x 64" in out and "MACs per image" in out


@pytest.mark.parametrize("name,message", [("resnet18", "VisionTransformer"), ("deit_tinny", "deit_tiny")])
def test_info_reports_user_mistakes_in_one_line(capsys, name: str, message: str) -> None:
    assert main(["info", name]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitsparse info: error:") and message in err and "Traceback" not in err


def test_env_lists_engines(capsys) -> None:
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "engine onnxruntime: available" in out and "default engine:" in out


def test_parse_assignment_reads_literals() -> None:
    assert parse_assignment("img_size=224") == ("img_size", 224)
    assert parse_assignment("qk_norm=True") == ("qk_norm", True)
    assert parse_assignment("global_pool=avg") == ("global_pool", "avg")
    for word, value in (("false", False), ("FALSE", False), ("true", True), ("none", None), ("Null", None)):
        assert parse_assignment(f"class_token={word}") == ("class_token", value)  # not the string 'false'
    with pytest.raises(Exception, match="key=value"):
        parse_assignment("no-equals")


@pytest.mark.parametrize("setting, says", [
    ("class_token=yes", "class_token='yes': VisionTransformer takes bool for class_token, not text"),
    ("global_pool=avgg", "global_pool='avgg': VisionTransformer takes one of '', 'avg'"),
    ("img_size=big", "takes Union[int, Tuple[int, int]] for img_size"),
])
def test_set_refuses_text_the_constructor_does_not_take(setting, says, capsys) -> None:
    assert main(["info", "deit_tiny_patch16_224", "--set", setting]) == 2
    assert says in capsys.readouterr().err


def test_set_passes_text_where_the_constructor_takes_it(capsys) -> None:
    assert main(["info", "deit_tiny_patch16_224", "--set", "act_layer=gelu", "--set", "global_pool=avg"]) == 0


def test_building_the_command_line_imports_no_torch() -> None:
    """Every command pays for the parser: prune-and-bench's method list is read only when its help
    is printed (the registry imports torch)."""
    import subprocess
    import sys

    code = ("import sys; from vitsparse.bench.cli import build_parser; build_parser(); "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_prune_refuses_a_misspelt_engine_before_any_work(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code = main(["prune", "digits-vit", "--recipe", "recipes/magnitude.yaml", "--data", str(tmp_path),
                 "-o", str(out), "--engines", "onnxruntime,openvinoo"])
    assert code == 2
    assert "unknown engine 'openvinoo'" in capsys.readouterr().err
    assert not out.exists()
