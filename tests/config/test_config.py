"""The config system as users meet it: files, command-line overrides, errors, dump/reload."""

from __future__ import annotations

import shlex

import pytest
import yaml

from gdseg.config import CfgNode, ConfigError, get_cfg


def _write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- defaults ------------------------------------------------------------------------------


def test_get_cfg_returns_independent_copies():
    a, b = get_cfg(), get_cfg()
    a.SOLVER.BASE_LR = 0.5
    assert b.SOLVER.BASE_LR == 1e-4
    assert isinstance(a.MODEL.MASK_FORMER, CfgNode)


def test_defaults_are_the_published_coco_r50_values():
    cfg = get_cfg()
    assert cfg.MODEL.MASK_FORMER.DEC_LAYERS == 10
    assert cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES == 100
    assert cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS == 12544
    assert (cfg.MODEL.MASK_FORMER.CLASS_WEIGHT, cfg.MODEL.MASK_FORMER.MASK_WEIGHT) == (2.0, 5.0)
    assert cfg.SSL.EMA_DECAY == 0.9996
    assert cfg.SSL.EVAL_WHO == "STUDENT"
    assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE == 0.01


def test_every_key_is_documented():
    cfg = get_cfg()
    undocumented = [k for k in cfg.all_keys() if not cfg.describe(k).strip()]
    assert undocumented == []
    assert "learning rate" in cfg.describe("SOLVER.BASE_LR").lower()


def test_describe_unknown_key_suggests():
    with pytest.raises(ConfigError, match="SOLVER.BASE_LR"):
        get_cfg().describe("SOLVER.BASE_LRR")


# --- merge_from_list (command-line overrides) ----------------------------------------------


@pytest.mark.parametrize(
    "key, raw, expected",
    [
        ("SSL.TRAIN_SSL", "True", True),
        ("SSL.TRAIN_SSL", "False", False),
        ("SSL.TRAIN_SSL", "true", True),  # YAML spelling
        ("SSL.PERCENTAGE", "250", 250.0),  # the published integer code for 0.4 %
        ("SSL.PERCENTAGE", "0.4", 0.4),
        ("SSL.BURNIN_ITER", "20000", 20000),
        ("SOLVER.BASE_LR", "1e-4", 1e-4),
        ("SOLVER.BASE_LR", "0.0002", 2e-4),
        ("SOLVER.STEPS", "(10, 20)", (10, 20)),
        ("SOLVER.STEPS", "[10, 20]", (10, 20)),
        ("DATASETS.TRAIN", "coco_2017_train_250", ("coco_2017_train_250",)),
        ("DATASETS.TRAIN", "('a', 'b')", ("a", "b")),
        ("DATASETS.TRAIN", "()", ()),
        ("OUTPUT_DIR", "out/teacher", "out/teacher"),
        ("SSL.TEACHER_CKPT", "out/teacher/model_final.pth", "out/teacher/model_final.pth"),
        ("SSL.EVAL_WHO", "BOTH", "BOTH"),
        ("MODEL.PIXEL_MEAN", "[1, 2, 3]", (1, 2, 3)),
        ("MODEL.SWIN.QK_SCALE", "None", None),
    ],
)
def test_merge_from_list_parses_values(key, raw, expected):
    cfg = get_cfg()
    cfg.merge_from_list([key, raw])
    node, leaf = cfg, key.split(".")
    for part in leaf:
        node = node[part]
    assert node == expected
    assert type(node) is type(expected)


def test_empty_string_override_clears_a_string_key():
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.WEIGHTS", ""])  # what `MODEL.WEIGHTS ""` gives from a shell
    assert cfg.MODEL.WEIGHTS == ""


def test_string_key_keeps_text_that_looks_like_yaml():
    cfg = get_cfg()
    cfg.merge_from_list(["OUTPUT_DIR", "runs/a: b"])
    assert cfg.OUTPUT_DIR == "runs/a: b"


def test_published_tuple_strings_in_files(tmp_path):
    """Published YAML files write tuples as Python text: ``TRAIN: ("coco_2017_train",)``."""
    f = _write(
        tmp_path / "published.yaml",
        'DATASETS:\n  TRAIN: ("coco_2017_train",)\nSOLVER:\n  STEPS: (327778, 355092)\n',
    )
    cfg = get_cfg()
    cfg.merge_from_file(f)
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",)
    assert cfg.SOLVER.STEPS == (327778, 355092)


def test_float_key_given_an_int_becomes_a_float():
    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.BASE_LR", "1"])
    assert cfg.SOLVER.BASE_LR == 1.0 and isinstance(cfg.SOLVER.BASE_LR, float)


def test_published_command_lines_apply():
    cfg = get_cfg()
    cfg.merge_from_list(
        shlex.split(
            "SSL.PERCENTAGE 5 SSL.TRAIN_SSL True SSL.TEACHER_CKPT out/teacher/model_final.pth "
            "OUTPUT_DIR out/student SSL.BURNIN_ITER 20000 SSL.EVAL_WHO BOTH"
        )
    )
    assert cfg.SSL.PERCENTAGE == 5.0
    assert cfg.SSL.TRAIN_SSL is True
    assert cfg.SSL.TEACHER_CKPT == "out/teacher/model_final.pth"
    assert cfg.OUTPUT_DIR == "out/student"
    assert cfg.SSL.BURNIN_ITER == 20000
    assert cfg.SSL.EVAL_WHO == "BOTH"


def test_merge_from_list_later_pairs_win():
    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.MAX_ITER", "10", "SOLVER.MAX_ITER", "20"])
    assert cfg.SOLVER.MAX_ITER == 20


def test_merge_from_list_odd_number_of_items():
    with pytest.raises(ConfigError, match="KEY VALUE"):
        get_cfg().merge_from_list(["SOLVER.MAX_ITER"])


# --- errors ---------------------------------------------------------------------------------


def test_unknown_key_on_command_line_names_it_and_suggests():
    with pytest.raises(ConfigError) as e:
        get_cfg().merge_from_list(["SOLVER.BASE_LRR", "0.1"])
    assert "SOLVER.BASE_LRR" in str(e.value)
    assert "SOLVER.BASE_LR" in str(e.value).split("Did you mean", 1)[1]


def test_unknown_key_suggests_from_the_last_component():
    with pytest.raises(ConfigError) as e:
        get_cfg().merge_from_list(["SSL.BURNIN_ITERS", "3"])
    assert "SSL.BURNIN_ITER" in str(e.value).split("Did you mean", 1)[1]


def test_unknown_namespace_is_an_error():
    with pytest.raises(ConfigError, match="MODEL.SWINN.EMBED_DIM"):
        get_cfg().merge_from_list(["MODEL.SWINN.EMBED_DIM", "96"])


def test_unknown_key_in_file_names_it_and_suggests(tmp_path):
    f = _write(tmp_path / "c.yaml", "MODEL:\n  MASK_FORMER:\n    NUM_OBJECT_QUERY: 50\n")
    with pytest.raises(ConfigError) as e:
        get_cfg().merge_from_file(f)
    msg = str(e.value)
    assert "MODEL.MASK_FORMER.NUM_OBJECT_QUERY" in msg
    assert "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES" in msg.split("Did you mean", 1)[1]


@pytest.mark.parametrize(
    "key, raw, expected_type",
    [
        ("SOLVER.MAX_ITER", "abc", "int"),
        ("SOLVER.MAX_ITER", "1.5", "int"),
        ("SOLVER.MAX_ITER", "True", "int"),  # a bool is not an int here
        ("SSL.TRAIN_SSL", "1", "bool"),
        ("SOLVER.BASE_LR", "fast", "float"),
        ("OUTPUT_DIR", "[1, 2]", "str"),
        ("SOLVER.STEPS", "5", "tuple"),
    ],
)
def test_wrong_type_names_key_and_expected_type(key, raw, expected_type):
    with pytest.raises(ConfigError) as e:
        get_cfg().merge_from_list([key, raw])
    msg = str(e.value)
    assert key in msg
    assert expected_type in msg
    assert "command line" in msg


def test_wrong_type_in_file_names_key_type_and_file(tmp_path):
    f = _write(tmp_path / "bad_type.yaml", "SOLVER:\n  IMS_PER_BATCH: sixteen\n")
    with pytest.raises(ConfigError) as e:
        get_cfg().merge_from_file(f)
    msg = str(e.value)
    assert "SOLVER.IMS_PER_BATCH" in msg and "int" in msg and "bad_type.yaml" in msg


def test_value_given_to_a_namespace_is_an_error():
    with pytest.raises(ConfigError, match="MODEL.SWIN"):
        get_cfg().merge_from_list(["MODEL.SWIN", "3"])


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "missing.yaml"
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        get_cfg().merge_from_file(str(missing))


def test_missing_base_file_names_its_path(tmp_path):
    f = _write(tmp_path / "child.yaml", "_BASE_: not_there.yaml\n")
    with pytest.raises(FileNotFoundError, match="not_there.yaml"):
        get_cfg().merge_from_file(f)


def test_circular_base_chain_is_an_error(tmp_path):
    _write(tmp_path / "a.yaml", "_BASE_: b.yaml\n")
    _write(tmp_path / "b.yaml", "_BASE_: a.yaml\n")
    with pytest.raises(ConfigError, match="Circular"):
        get_cfg().merge_from_file(str(tmp_path / "a.yaml"))


def test_file_that_is_not_a_mapping_is_an_error(tmp_path):
    f = _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        get_cfg().merge_from_file(f)


def test_python_object_tags_are_refused(tmp_path):
    """Configs are parsed with yaml.safe_load: a Python tag neither runs nor loads."""
    marker = tmp_path / "pwned"
    f = _write(
        tmp_path / "evil.yaml",
        f'OUTPUT_DIR: !!python/object/apply:builtins.open ["{marker}", "w"]\n',
    )
    with pytest.raises(ConfigError, match="evil.yaml"):
        get_cfg().merge_from_file(f)
    assert not marker.exists()


def test_published_python_expression_is_refused(tmp_path):
    """The published Cityscapes base writes MIN_SIZE_TRAIN as a Python expression."""
    f = _write(
        tmp_path / "published.yaml",
        "INPUT:\n  MIN_SIZE_TRAIN: !!python/object/apply:eval "
        '["[int(x * 0.1 * 1024) for x in range(5, 21)]"]\n',
    )
    with pytest.raises(ConfigError):
        get_cfg().merge_from_file(f)


# --- _BASE_ inheritance ---------------------------------------------------------------------


def test_base_inheritance_and_override_order(tmp_path):
    (tmp_path / "sub").mkdir()
    _write(
        tmp_path / "base.yaml",
        "SOLVER:\n  MAX_ITER: 100\n  BASE_LR: 0.1\n  IMS_PER_BATCH: 4\nOUTPUT_DIR: base\n",
    )
    _write(tmp_path / "mid.yaml", "_BASE_: base.yaml\nSOLVER:\n  BASE_LR: 0.2\n")
    # _BASE_ is relative to the file, not to the working directory.
    leaf = _write(
        tmp_path / "sub" / "leaf.yaml", "_BASE_: ../mid.yaml\nSOLVER:\n  IMS_PER_BATCH: 8\n"
    )
    cfg = get_cfg()
    cfg.merge_from_file(leaf)
    assert cfg.SOLVER.MAX_ITER == 100  # from base, untouched by the partial overrides
    assert cfg.SOLVER.BASE_LR == 0.2  # mid overrides base
    assert cfg.SOLVER.IMS_PER_BATCH == 8  # leaf overrides mid
    assert cfg.OUTPUT_DIR == "base"
    assert cfg.SOLVER.WEIGHT_DECAY == get_cfg().SOLVER.WEIGHT_DECAY  # default kept
    cfg.merge_from_list(["SOLVER.BASE_LR", "0.3"])  # command line overrides every file
    assert cfg.SOLVER.BASE_LR == 0.3


def test_list_of_bases_later_wins(tmp_path):
    _write(tmp_path / "a.yaml", "SOLVER:\n  MAX_ITER: 1\n  BASE_LR: 0.1\n")
    _write(tmp_path / "b.yaml", "SOLVER:\n  MAX_ITER: 2\n")
    f = _write(tmp_path / "c.yaml", "_BASE_: [a.yaml, b.yaml]\n")
    cfg = get_cfg()
    cfg.merge_from_file(f)
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.BASE_LR) == (2, 0.1)


def test_child_replaces_a_list_rather_than_appending(tmp_path):
    _write(tmp_path / "a.yaml", "SOLVER:\n  STEPS: [1, 2, 3]\n")
    f = _write(tmp_path / "b.yaml", "_BASE_: a.yaml\nSOLVER:\n  STEPS: [7]\n")
    cfg = get_cfg()
    cfg.merge_from_file(f)
    assert cfg.SOLVER.STEPS == (7,)


# --- dump / reload --------------------------------------------------------------------------


def _reload(cfg: CfgNode, tmp_path) -> CfgNode:
    f = _write(tmp_path / "dumped.yaml", cfg.dump())
    out = get_cfg()
    out.merge_from_file(f)
    return out


def test_dump_round_trip_of_defaults(tmp_path):
    cfg = get_cfg()
    assert _reload(cfg, tmp_path) == cfg


def test_dump_round_trip_after_overrides(tmp_path):
    cfg = get_cfg()
    cfg.merge_from_list(
        [
            "SSL.PERCENTAGE", "0.4",
            "SSL.TRAIN_SSL", "True",
            "SOLVER.STEPS", "(5, 9)",
            "DATASETS.TRAIN", "('a', 'b')",
            "DATASETS.UNLABELED", "unl",
            "MODEL.SWIN.QK_SCALE", "0.125",
            "OUTPUT_DIR", "out dir/with spaces",
            "MODEL.WEIGHTS", "''",
        ]
    )  # fmt: skip
    back = _reload(cfg, tmp_path)
    assert back == cfg
    assert back.SOLVER.STEPS == (5, 9) and back.DATASETS.TRAIN == ("a", "b")
    assert back.OUTPUT_DIR == "out dir/with spaces"
    assert back.MODEL.WEIGHTS == ""
    assert back.dump() == cfg.dump()


def test_dump_is_plain_safe_yaml():
    text = get_cfg().dump()
    assert "!!" not in text  # no Python tags (tuples are written as lists)
    data = yaml.safe_load(text)
    assert data["SOLVER"]["BASE_LR"] == 1e-4
    assert data["DATASETS"]["TRAIN"] == ["coco_2017_train"]


# --- freeze / clone -------------------------------------------------------------------------


def test_freeze_prevents_writes():
    cfg = get_cfg().freeze()
    assert cfg.is_frozen()
    with pytest.raises(AttributeError, match="frozen"):
        cfg.SOLVER.BASE_LR = 0.5
    with pytest.raises(AttributeError, match="frozen"):
        cfg.OUTPUT_DIR = "x"
    with pytest.raises(AttributeError, match="frozen"):
        cfg.merge_from_list(["SOLVER.MAX_ITER", "1"])
    with pytest.raises(AttributeError, match="frozen"):
        cfg["SEED"] = 3
    assert cfg.SOLVER.BASE_LR == 1e-4


def test_freeze_prevents_merge_from_file(tmp_path):
    f = _write(tmp_path / "c.yaml", "SOLVER:\n  MAX_ITER: 3\n")
    cfg = get_cfg().freeze()
    with pytest.raises(AttributeError, match="frozen"):
        cfg.merge_from_file(f)


def test_clone_of_frozen_is_writable_and_independent():
    cfg = get_cfg().freeze()
    c = cfg.clone()
    c.SOLVER.BASE_LR = 0.5
    assert cfg.SOLVER.BASE_LR == 1e-4
    cfg.defrost()
    cfg.SOLVER.BASE_LR = 0.25
    assert cfg.SOLVER.BASE_LR == 0.25


def test_reading_a_misspelled_attribute_suggests_the_key():
    cfg = get_cfg()
    with pytest.raises(AttributeError) as e:
        _ = cfg.SOLVER.MAX_ITERR
    assert "MAX_ITERR" in str(e.value) and "MAX_ITER?" in str(e.value)
