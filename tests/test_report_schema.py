"""The one report schema: what --json, the harness's records and the plots all read."""

import json

import pytest

from fedattn.errors import FedAttnError
from fedattn.report.schema import PartyReport, RunReport


def sample() -> RunReport:
    parties = [
        PartyReport(
            "party-1",
            0,
            "collaborator",
            100,
            0,
            2,
            0,
            100,
            0,
            130,
            {"prefill_s": 0.5, "wait_s": 0.0},
            details={"tokens": 7, "block_wait_s": {"0": 0.1}},
        ),
        PartyReport(
            "publisher",
            1,
            "publisher",
            10,
            100,
            1,
            2,
            10,
            100,
            None,
            {"prefill_s": 0.25, "decode_s": 1.0},
            answer="42",
            answer_token_ids=[5, 6],
            details={"tokens": 3},
        ),
    ]
    return RunReport(
        "fedattn",
        "inprocess",
        {"name": "tiny-random", "identity": "x"},
        {"codec": "float32"},
        "42",
        [5, 6],
        parties,
        {"sent": 110, "received": 100},
        {"wall_s": 2.0},
        {"sync_layers": [0, 4]},
    )


def test_json_is_flat_where_readers_look_and_round_trips():
    report = sample()
    document = json.loads(json.dumps(report.to_json()))
    assert document["parties"][0]["prefill_s"] == 0.5 and document["parties"][0]["tokens"] == 7
    assert document["sync_layers"] == [0, 4]
    # measured totals are sums over the parties (not stored twice)
    assert document["measured_bytes"] == {"sent": 110, "received": 100}
    again = RunReport.from_json(document)
    assert again == report
    assert again.party("party-1").details["block_wait_s"] == {"0": 0.1}


def test_link_totals_only_when_every_party_measured_its_links():
    report = sample()
    assert "link_sent" not in report.measured_bytes
    report.parties[1].link_bytes_sent = 20
    assert report.measured_bytes["link_sent"] == 150


def test_details_may_not_shadow_fields():
    report = sample()
    report.details["answer"] = "other"
    with pytest.raises(ValueError, match="shadow"):
        report.to_json()


@pytest.mark.parametrize("document", [{}, {"schema": 99}, {"schema": 1, "system": "fedattn"}, [1, 2]])
def test_malformed_documents_are_refused(document):
    with pytest.raises(FedAttnError):
        RunReport.from_json(document)


def test_a_fedattn_query_reports_through_the_schema(tiny):
    from fedattn.runtime.dims import ModelDims
    from fedattn.systems.fedattn.config import RunConfig
    from fedattn.systems.fedattn.query import answer_question
    from fedattn.systems.fedattn.reporting import run_report
    from fedattn.systems.fedattn.schedule import Schedule, every

    model, tokenizer = tiny
    config = RunConfig(Schedule(8, every(2, 8)), max_new_tokens=3)
    query = answer_question(model, tokenizer, ["alpha beta", "gamma"], "which?", config)
    report = run_report(
        query.result,
        query.expected,
        ModelDims.from_config(model.config),
        config,
        {"name": "tiny-random"},
        query.answer_texts,
        query.wall_s,
    )
    document = RunReport.from_json(json.loads(json.dumps(report.to_json()))).to_json()
    legacy = query.to_json()
    assert document["measured_bytes"] == legacy["measured_bytes"]
    assert document["expected_bytes"] == legacy["expected_bytes"]
    assert document["measured_bytes"]["sent"] == document["expected_bytes"]["sent"]  # the cost model, exactly
    for ours, theirs in zip(document["parties"], legacy["participants"], strict=True):
        assert {key: ours[key] for key in theirs if key != "block_wait_s"} == {
            key: value for key, value in theirs.items() if key != "block_wait_s"
        }
    assert [party["role"] for party in document["parties"]] == ["collaborator", "collaborator", "publisher"]
