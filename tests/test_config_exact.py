"""Issue 19, the config is exactly what was asked (launch/train.py's main in this process): --preset beats a YAML's
`preset:`, a key given twice is refused, a value of the wrong type is refused (never coerced), every YAML problem
is one line naming the file and the line, and a user DeepSpeed JSON is checked for every key we rely on, in one
line naming the file and the key, before anything starts."""
import importlib.util
import json
from pathlib import Path

import pytest

from moca_fast.config import load_config
from moca_fast.distributed import free_port
from moca_fast.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _launch_module():
    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _resolved(argv):
    launch = _launch_module()
    return launch.resolve_config(launch.parse_args(argv))


def _one_line_exit_2(capsys, argv) -> str:
    """main(argv) exits 2 with one `error:` line, the last on stderr (log lines may precede it), and no
    traceback; returns the line."""
    assert _launch_module().main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and [line for line in err if line.startswith("error: ")] == err[-1:], err
    return err[-1]


def test_the_preset_flag_beats_the_preset_of_the_yaml(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("preset: demo\nepochs: 3\n")
    cfg = _resolved(["--config", str(config), "--preset", "tiny"])
    assert (cfg.embed_dim, cfg.img_size, cfg.epochs) == (32, 64, 3), "tiny's sizes, the YAML's epochs"
    assert _resolved(["--config", str(config)]).embed_dim == 128, "without the flag, the YAML's preset"


@pytest.mark.parametrize("text, line, named", [
    ("epochs: 2\ndepth: 3\nepochs: 4\n", 3, "epochs is given twice (first on line 1)"),
    ("batch-size: 2\nbatch_size: 3\n", 2, "batch_size is given twice (first on line 1)"),
    ("epochs: yes\n", 1, "setting epochs=True: must be an integer, not a bool"),
    ("output: [a, b]\n", 1, "setting output=['a', 'b']: must be a string, not a list"),
    ("preset: [tiny]\n", 1, "preset=['tiny'] must be a preset name, not a list"),
    ("momentum_cosine: 1\n", 1, "setting momentum_cosine=1: must be true or false, not an int"),
    ("mask_ratio: [0.5, yes]\n", 1, "setting mask_ratio=[0.5, True]: must be a list of numbers"),
    ("epochs: 2\n1: 3\n", 2, "the key 1 (int) is not a setting name"),
    (b"epochs: 2\nlog_every: \xff\n", 2, "not UTF-8 text (byte 0xff at column 12)"),
    ("epochs: 2\n  log_every: 3\n", 2, "mapping values are not allowed here"),
    ("epochs: 2\nx: !!python/object:os.system ls\n", 2, "could not determine a constructor"),
    ("- epochs\n- 2\n", 1, "the file must hold a mapping of setting: value, not a list"),
])
def test_every_yaml_problem_is_one_line_naming_the_file_and_line(tmp_path, capsys, text, line, named):
    config = tmp_path / "c.yaml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    error = _one_line_exit_2(capsys, ["--config", str(config), "--preset", "tiny", "--data-backend", "synthetic",
                                      "--output", str(tmp_path / "run")])
    assert error.startswith(f"error: config file {config}, line {line}: ") and named in error, error
    assert not (tmp_path / "run").exists(), "refused before anything starts"


def test_yaml_numbers_are_read_as_written(tmp_path):
    """`1e-4` is a float (YAML 1.2; PyYAML alone reads it as a string), integral floats are integers."""
    config = tmp_path / "c.yaml"
    config.write_text("blr: 1e-4\nepochs: 3.0\nmask_ratio: [0.5, 0.7]\nlr: null\nmomentum_cosine: false\n")
    cfg = load_config("tiny", config)
    assert (cfg.blr, cfg.epochs, cfg.mask_ratio, cfg.lr, cfg.momentum_cosine) == (1e-4, 3, (0.5, 0.7), None, False)
    assert type(cfg.epochs) is int


@pytest.mark.parametrize("overrides, named", [
    (["epochs=3", "epochs=4"], "setting epochs is given twice (epochs=3 and epochs=4)"),
    (["batch-size=3", "batch_size=4"], "setting batch_size is given twice"),
    (["epochs=yes"], "setting epochs='yes'"),
    (["epochs=2.5"], "setting epochs='2.5'"),
])
def test_key_value_overrides_given_twice_or_mistyped_are_one_line(tmp_path, capsys, overrides, named):
    error = _one_line_exit_2(capsys, ["--preset", "tiny", "--data-backend", "synthetic", "--output",
                                      str(tmp_path / "run"), *overrides])
    assert named in error, error


def test_python_values_of_the_wrong_type_are_refused():
    for overrides, named in [({"epochs": True}, "epochs=True"), ({"output": ["a", "b"]}, "output=['a', 'b']"),
                             ({"data": 3}, "data=3"), ({"batch_size": 2.5}, "2.5 is not an integer")]:
        with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
            load_config("tiny", overrides=overrides)


# ---------------------------------------------------------------------- --deepspeed_config
DEEPSPEED_CASES = {
    "stage null": ({"zero_optimization": {"stage": None}}, "zero_optimization.stage=null conflicts"),
    "stage true": ({"zero_optimization": {"stage": True}}, "zero_optimization.stage=true conflicts"),
    "stage 2.0": ({"zero_optimization": {"stage": 2.0}}, "zero_optimization.stage=2.0 conflicts"),
    "zero not a dict": ({"zero_optimization": 3}, "zero_optimization=3 must be a JSON object"),
    "fp16 true": ({"fp16": True}, "'fp16.enabled' is not accepted"),
    "fp16 enabled text": ({"fp16": {"enabled": "true"}}, "'fp16.enabled' is not accepted"),
    "bfloat16 alias": ({"bfloat16": {"enabled": True}}, "'bfloat16' is not accepted"),
    "bf16 not a dict": ({"bf16": True}, "bf16=true must be a JSON object"),
    "steps_per_print 0": ({"steps_per_print": 0}, "steps_per_print=0 must be an integer >= 1"),
    "gradient_clipping null": ({"gradient_clipping": None}, "gradient_clipping=null conflicts"),
    "batch as text": ({"train_micro_batch_size_per_gpu": "4"}, 'train_micro_batch_size_per_gpu="4" conflicts'),
    "breakdown as text": ({"wall_clock_breakdown": "false"}, 'wall_clock_breakdown="false" must be true or false'),
    "predivide 0": ({"gradient_predivide_factor": 0}, "gradient_predivide_factor=0 must be a number > 0"),
    "bucket as text": ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "x"}},
                       "zero_optimization.reduce_bucket_size: DeepSpeed refuses it: Input should be a valid integer"),
    "unknown zero key": ({"zero_optimization": {"stage": 2, "overlap_com": True}},
                         "zero_optimization.overlap_com: DeepSpeed refuses it: Extra inputs are not permitted"),
    "section not a dict": ({"comms_logger": 5}, "comms_logger: DeepSpeed refuses it"),
    "bad data type": ({"communication_data_type": "fp7"}, "communication_data_type: DeepSpeed refuses it"),
    "key twice": ('{"steps_per_print": 5, "steps_per_print": 6}', "'steps_per_print' is given twice"),
    "not UTF-8": (b'{"steps_per_print": "\xff"}', "line 1: not UTF-8 text"),
}


@pytest.mark.parametrize("case", sorted(DEEPSPEED_CASES))
def test_a_bad_deepspeed_json_is_one_line_naming_the_file_and_key(tmp_path, case):
    from moca_fast.train.engine import deepspeed_config

    content, named = DEEPSPEED_CASES[case]
    path = tmp_path / "ds.json"
    path.write_bytes(content if isinstance(content, bytes) else
                     (content if isinstance(content, str) else json.dumps(content)).encode())
    with pytest.raises(ConfigError) as refused:
        deepspeed_config(load_config("tiny"), 1, "fp32", path)
    message = str(refused.value)
    assert message.startswith(f"DeepSpeed config {path}") and named in message and "\n" not in message, message


def test_a_good_deepspeed_json_is_merged(tmp_path):
    from moca_fast.train.engine import deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"steps_per_print": 10, "gradient_clipping": 0.1, "fp16": {"enabled": False},
                                "zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}}))
    merged = deepspeed_config(load_config("tiny"), 1, "fp32", path)
    assert merged["steps_per_print"] == 10 and merged["zero_optimization"]["reduce_bucket_size"] == 1000
    assert merged["zero_optimization"]["contiguous_gradients"] is True, "our generated keys stay"


@pytest.fixture
def one_process_group(monkeypatch):
    import torch.distributed as dist

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_the_trainer_refuses_a_bad_deepspeed_json_before_anything_starts(one_process_group, tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": null}}')
    out = tmp_path / "run"
    error = _one_line_exit_2(capsys, ["--preset", "tiny", "--data-backend", "synthetic", "--output", str(out),
                                      "--deepspeed_config", str(ds)])
    assert error == (f"error: DeepSpeed config {ds}: zero_optimization.stage=null conflicts with the value 2 from "
                     f"our config; set zero_stage instead")
    assert not out.exists(), "no run folder, no lock: nothing started"
