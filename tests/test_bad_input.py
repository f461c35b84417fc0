"""Bad input stops with exit code 2 and one line naming the record or key; skip mode goes on."""

import json

import pytest

from mmadapt.errors import InputError
from mmadapt.export import read_versioned_json
from mmadapt.run import main
from tests.helpers import deepspeed_launcher, run_train, shapes_subset, tiny_overrides


def _corrupt(data, tmp_path, kind: str):
    records = [json.loads(line) for line in data["train"].read_text().splitlines()]
    bad = records[3]
    if kind == "missing image":
        bad["images"] = [str(tmp_path / "nowhere.png")]
    elif kind == "corrupt image":
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        bad["images"] = [str(broken)]
    elif kind == "placeholder count":
        bad["images"] = bad["images"] * 2
    data["train"].write_text("".join(json.dumps(r) + "\n" for r in records))
    return bad["id"]


def _run(capsys, overrides):
    code = main(["--config", "configs/xcomposer.yaml", *overrides])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "kind, message",
    [("missing image", "nowhere.png not found"), ("corrupt image", "not a readable image"), ("placeholder count", "<image>")],
)
def test_bad_record_is_one_line_naming_file_line_and_id(tmp_path, capsys, kind, message):
    data = shapes_subset(tmp_path / "data")
    record_id = _corrupt(data, tmp_path, kind)
    code, lines = _run(capsys, tiny_overrides(data, tmp_path / "out", "train.max_steps=2"))
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 2 and len(errors) == 1
    assert f"{data['train']}:4 (id='{record_id}')" in errors[0] and message in errors[0]


def test_skip_mode_counts_bad_records_and_trains(tmp_path, capsys):
    data = shapes_subset(tmp_path / "data")
    _corrupt(data, tmp_path, "missing image")
    out = tmp_path / "out"
    code, lines = _run(capsys, tiny_overrides(data, out, "train.max_steps=2", "data.on_bad_record=skip"))
    assert code == 0
    assert any("skipped 1 bad records" in line for line in lines)
    assert json.loads((out / "skipped.json").read_text()) == {str(data["train"]): {"missing file": 1}}
    assert (out / "adapter" / "adapter.safetensors").exists()


def test_empty_data_file(tmp_path, capsys):
    data = shapes_subset(tmp_path / "data")
    data["train"].write_text("")
    code, lines = _run(capsys, tiny_overrides(data, tmp_path / "out"))
    assert code == 2 and lines[-1].startswith("error: data.train") and str(data["train"]) in lines[-1]


@pytest.mark.parametrize(
    "override, message",
    [("train.batchsize=4", "unknown config key 'train.batchsize' (did you mean 'train.batch_size'?)"),
     ("train.lr=fast", "config key 'train.lr'")],
)
def test_config_errors(capsys, override, message):
    code, lines = _run(capsys, ["model=models/tiny.yaml", override])
    assert code == 2 and len(lines) == 1 and message in lines[0]


@pytest.mark.deepspeed_launch
def test_two_ranks_print_the_error_once(tmp_path):
    data = shapes_subset(tmp_path / "data")
    _corrupt(data, tmp_path, "missing image")
    result = run_train(tiny_overrides(data, tmp_path / "out"), launcher=deepspeed_launcher("--num_gpus", "2"))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count("error: ") == 1 and "(id='train-00003')" in output



@pytest.mark.parametrize(
    "content, message",
    [
        ('{"format_version": 1,', r"meta.json: not valid JSON \(Expecting"),
        ("[1, 2]", "meta.json: expected a JSON object, found list"),
        ('{"format_version": 2}', "meta.json: format_version 2 is not 1"),
    ],
)
def test_versioned_json_names_the_file_and_the_fault(tmp_path, content, message):
    path = tmp_path / "meta.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_versioned_json(path, 1, "no meta.json")
    with pytest.raises(InputError, match="no meta.json"):
        read_versioned_json(tmp_path / "absent.json", 1, "no meta.json")
