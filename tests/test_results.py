import json
import subprocess
import sys

import pytest

from fedattn.errors import FedAttnError
from fedattn.evaluation.results import ResultStore

CONFIG = {"model": "tiny-random", "split": "TokEx"}


def test_resume_skips_finished_items_and_drops_a_torn_line_with_a_warning(tmp_path, capsys):
    with ResultStore(tmp_path, CONFIG) as store:
        store.append({"key": "0", "em": 1})
        store.append({"key": "1", "em": 0})
    with store.records_path.open("a") as handle:  # an interruption mid-write
        handle.write('{"key": "2", "em"')
    with ResultStore(tmp_path, CONFIG) as reopened:
        warning = capsys.readouterr().err
        assert f"{reopened.records_path}:3: dropped a half-written record" in warning
        assert len(warning.strip().splitlines()) == 1
        assert reopened.done_keys() == {"0", "1"}
        reopened.append({"key": "2", "em": 1})
        assert [record["key"] for record in reopened.records()] == ["0", "1", "2"]
    assert [json.loads(line)["key"] for line in reopened.records_path.read_text().splitlines()] == ["0", "1", "2"]
    with ResultStore(tmp_path, CONFIG):
        assert capsys.readouterr().err == ""  # nothing torn any more: nothing reported


def test_another_configuration_is_refused(tmp_path):
    ResultStore(tmp_path, CONFIG).close()
    with pytest.raises(FedAttnError, match="differs in split"):
        ResultStore(tmp_path, {"model": "tiny-random", "split": "SemAg"})


def test_summary_carries_the_configuration(tmp_path):
    with ResultStore(tmp_path, {"h": 4}) as store:
        path = store.write_summary({"em": 0.5})
    assert json.loads(path.read_text()) == {"em": 0.5, "config": {"h": 4}}


def test_refusal_names_only_the_setting_that_changed(tmp_path):
    ResultStore(tmp_path, {"sync_layers": (0, 4), "split": "TokEx"}).close()
    with pytest.raises(FedAttnError) as info:
        ResultStore(tmp_path, {"sync_layers": (0, 4), "split": "SemAg"})
    assert "differs in split)" in str(info.value)


def test_a_second_writer_is_refused_until_the_first_closes(tmp_path):
    with ResultStore(tmp_path, CONFIG) as first:
        with pytest.raises(FedAttnError) as info:
            ResultStore(tmp_path, CONFIG)
        assert str(info.value) == f"{tmp_path} is in use by another run (one writer at a time)"
        first.append({"key": "0"})
    with ResultStore(tmp_path, CONFIG) as second:  # released on close
        assert second.done_keys() == {"0"}


def test_a_second_writer_in_another_process_is_refused(tmp_path):
    """Two runs of the command on one folder: the second stops at once and writes nothing."""
    script = (
        "import sys; from pathlib import Path; from fedattn.errors import FedAttnError; "
        "from fedattn.evaluation.results import ResultStore\n"
        "try:\n    ResultStore(Path(sys.argv[1]), {'model': 'tiny-random', 'split': 'TokEx'}).append({'key': '9'})\n"
        "except FedAttnError as error:\n    print(error); sys.exit(2)"
    )
    with ResultStore(tmp_path, CONFIG) as store:
        store.append({"key": "0"})
        other = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert other.returncode == 2 and "in use by another run" in other.stdout, other.stderr
    assert [json.loads(line)["key"] for line in store.records_path.read_text().splitlines()] == ["0"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("{not json", "is not readable JSON"), ("[1, 2]", "is not a JSON object"), ("", "is not readable JSON")],
)
def test_a_corrupt_configuration_is_named(tmp_path, text, fragment):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(FedAttnError) as info:
        ResultStore(tmp_path, CONFIG)
    assert str(info.value).startswith(f"{tmp_path / 'config.json'} {fragment}")
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize(
    ("lines", "number", "fragment"),
    [
        (['{"key": "0"}', "garbage", '{"key": "2"}'], 2, "not a record"),
        (['{"key": "0"}', "[1, 2]"], 2, "not a record"),  # complete (newline-terminated) but not an object
        (['{"em": 1}'], 1, "not a record"),  # an object without a key
        (['{"key": 0}'], 1, "not a record"),  # a key that is not a string
        (['{"key": "0"}', '{"key": "0"}'], 2, "a second record for key '0'"),  # two writers' leftovers
    ],
)
def test_a_line_that_is_not_a_record_is_named_with_its_line(tmp_path, lines, number, fragment):
    ResultStore(tmp_path, CONFIG).close()
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(FedAttnError, match=rf"records\.jsonl:{number}: {fragment}"):
        ResultStore(tmp_path, CONFIG)
    with pytest.raises(FedAttnError):  # refused, not repaired: the folder is left as it was
        ResultStore(tmp_path, CONFIG)


def test_a_record_is_written_once(tmp_path):
    with ResultStore(tmp_path, CONFIG) as store:
        store.append({"key": "0"})
        with pytest.raises(ValueError, match="already"):
            store.append({"key": "0"})
