"""The one report schema: what --json, the harness's records and the plots all read."""

import json

import pytest

from fedattn.errors import FedAttnError
from fedattn.report.schema import PartyReport, RunReport, merge


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


def test_aliases_are_copies_that_reading_drops():
    report = sample()
    report.aliases = {"participants": "parties", "codec": "config.codec"}
    document = json.loads(json.dumps(report.to_json()))
    assert document["participants"] == document["parties"] and document["codec"] == "float32"
    assert document["aliases"] == report.aliases
    again = RunReport.from_json(document)
    assert again == report and "participants" not in again.details


def test_merge_adds_up_the_ranks():
    first, second = sample(), sample()
    for party in second.parties:
        party.rank += 2
        party.name += "-b"
    first.baselines, second.baselines = {"all-gather": 500}, {"all-gather": 700}
    first.timing, second.timing = {"wall_s": 2.0, "prefill_s": 0.5}, {"wall_s": 1.5, "prefill_s": 0.75}
    second.answer, second.answer_token_ids = "43", [7]
    merged = merge([first, second])
    assert [party.name for party in merged.parties] == ["party-1", "publisher", "party-1-b", "publisher-b"]
    assert merged.expected_bytes == {"sent": 220, "received": 200}
    assert merged.measured_bytes == {"sent": 220, "received": 200}
    assert merged.baselines == {"all-gather": 1200}
    assert merged.timing == {"wall_s": 2.0, "prefill_s": 0.75}  # the ranks ran at once: the slowest
    assert (merged.answer, merged.answer_token_ids) == ("43", [7])  # the last rank asked


def test_merge_refuses_ranks_of_different_systems():
    other = sample()
    other.system = "specfed"
    with pytest.raises(FedAttnError, match="different systems"):
        merge([sample(), other])


# the keys of a party in FedAttn's --json before the one schema; scripts read them
FEDATTN_PARTY_KEYS = {
    "rank",
    "name",
    "tokens",
    "kept_tokens",
    "bytes_sent",
    "bytes_received",
    "frames_sent",
    "frames_received",
    "kv_payload_sent",
    "prefill_s",
    "decode_s",
    "wait_s",
    "block_wait_s",
    "generated_tokens",
    "expected_bytes_sent",
    "expected_bytes_received",
    "expected_kv_bytes_sent",
    "expected_kv_bytes_received",
    "prefill_flops",
}
# the top-level keys the README documents for --json
FEDATTN_RUN_KEYS = {
    "answer",
    "answer_token_ids",
    "sync_layers",
    "participants",
    "expected_bytes",
    "measured_bytes",
    "flops",
    "timing",
}


def test_a_fedattn_query_reports_through_the_schema(tiny):
    from fedattn.runtime.decoding import stop_rule
    from fedattn.runtime.dims import ModelDims
    from fedattn.runtime.prompting import build_segments
    from fedattn.systems.fedattn.config import RunConfig
    from fedattn.systems.fedattn.costs import run_costs
    from fedattn.systems.fedattn.inprocess import run_in_process
    from fedattn.systems.fedattn.query import answer_question
    from fedattn.systems.fedattn.schedule import Schedule, every

    model, tokenizer = tiny
    config = RunConfig(Schedule(8, every(2, 8)), max_new_tokens=3)
    contexts, question = ["alpha beta", "gamma"], "which?"
    report = answer_question(model, tokenizer, contexts, question, config, model_info={"name": "tiny-random"})
    document = json.loads(json.dumps(report.to_json()))
    assert RunReport.from_json(document) == report
    assert FEDATTN_RUN_KEYS <= set(document)
    assert document["participants"] == document["parties"]
    assert document["measured_bytes"]["sent"] == document["expected_bytes"]["sent"]  # the cost model, exactly
    assert document["measured_bytes"]["received"] == document["expected_bytes"]["received"]
    # every party's figures are the runner's own, and the cost model's for the same segments
    segments = build_segments(tokenizer, contexts, question)
    result = run_in_process(model, segments, config, stop_rule(tokenizer, model))
    costs = run_costs(ModelDims.from_config(model.config), config, [len(segment) for segment in segments])
    for party, outcome, cost in zip(document["parties"], result.parties, costs, strict=True):
        assert FEDATTN_PARTY_KEYS <= set(party)
        for key in ("rank", "name", "tokens", "kept_tokens", "bytes_sent", "bytes_received", "kv_payload_sent"):
            assert party[key] == getattr(outcome, key), key
        assert party["generated_tokens"] == outcome.generated_tokens
        assert (party["expected_bytes_sent"], party["expected_kv_bytes_received"]) == (
            cost.wire_bytes_sent,
            cost.kv_bytes_received,
        )
    assert [party["role"] for party in document["parties"]] == ["collaborator", "collaborator", "publisher"]
    assert document["answer_token_ids"] == result.answer_token_ids == document["parties"][-1]["answer_token_ids"]
    all_gather = run_costs(ModelDims.from_config(model.config), config, [len(s) for s in segments], all_answers=True)
    assert document["all_gather_bytes_sent"] == sum(cost.wire_bytes_sent for cost in all_gather)
