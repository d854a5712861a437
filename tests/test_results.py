import json

import pytest

from fedattn.errors import FedAttnError
from fedattn.evaluation.results import ResultStore


def test_resume_skips_finished_items_and_drops_a_torn_line(tmp_path):
    store = ResultStore(tmp_path, {"model": "tiny-random", "split": "TokEx"})
    store.append({"key": "0", "em": 1})
    store.append({"key": "1", "em": 0})
    with store.records_path.open("a") as handle:  # an interruption mid-write
        handle.write('{"key": "2", "em"')
    reopened = ResultStore(tmp_path, {"model": "tiny-random", "split": "TokEx"})
    assert reopened.done_keys() == {"0", "1"}
    reopened.append({"key": "2", "em": 1})
    assert [record["key"] for record in reopened.records()] == ["0", "1", "2"]
    assert all(json.loads(line) for line in reopened.records_path.read_text().splitlines())


def test_another_configuration_is_refused(tmp_path):
    ResultStore(tmp_path, {"model": "tiny-random", "split": "TokEx"})
    with pytest.raises(FedAttnError, match="differs in split"):
        ResultStore(tmp_path, {"model": "tiny-random", "split": "SemAg"})


def test_summary_carries_the_configuration(tmp_path):
    store = ResultStore(tmp_path, {"h": 4})
    path = store.write_summary({"em": 0.5})
    assert json.loads(path.read_text()) == {"em": 0.5, "config": {"h": 4}}


def test_refusal_names_only_the_setting_that_changed(tmp_path):
    ResultStore(tmp_path, {"sync_layers": (0, 4), "split": "TokEx"})
    with pytest.raises(FedAttnError) as info:
        ResultStore(tmp_path, {"sync_layers": (0, 4), "split": "SemAg"})
    assert "differs in split)" in str(info.value)
