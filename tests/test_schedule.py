"""Schedules worked out by hand from the spec's formulas."""

import pytest

from fedattn.errors import FedAttnError
from fedattn.systems.fedattn.schedule import (
    Schedule,
    all_layers,
    check_layers,
    every,
    format_layers,
    parse_layers,
    placement,
    sync_count,
)


def test_every():
    assert every(1, 4) == (0, 1, 2, 3)
    assert every(4, 24) == (0, 4, 8, 12, 16, 20)
    assert every(5, 24) == (0, 5, 10, 15, 20)
    assert sync_count(5, 24) == 5


def test_placements_24_blocks_k4():
    # shallow-half: (i * 12) // 4 for i in 0..3
    assert placement("shallow-half", 4, 24) == (0, 3, 6, 9)
    assert placement("deep-half", 4, 24) == (14, 17, 20, 23)
    # progressive: gaps 1,2,3 of 23 total -> 0, 23/6=3.83->4, 23*3/6=11.5->12 (banker's: 12), 23
    assert placement("progressive", 4, 24) == (0, 4, 12, 23)
    # regressive: gaps 3,2,1 -> 0, 11.5->12, 23*5/6=19.17->19, 23
    assert placement("regressive", 4, 24) == (0, 12, 19, 23)


def test_graded_placement_pushes_duplicates_apart():
    assert placement("progressive", 5, 5) == (0, 1, 2, 3, 4)
    assert placement("regressive", 1, 8) == (0,)


def test_visibility_rules():
    schedule = Schedule(8, (0, 4), publisher_layers=all_layers(8), publisher_sync_every=3)
    assert schedule.publisher_sync_layers == (3, 6)
    assert schedule.receivers(0, 1, 3, everyone_decodes=True) == [0, 2]
    assert schedule.receivers(1, 0, 3, everyone_decodes=True) == [2]  # publisher-dense
    assert schedule.receivers(1, 2, 3, everyone_decodes=True) == []
    assert schedule.receivers(3, 2, 3, everyone_decodes=True) == [0, 1]  # extra publisher sync


def test_only_later_parties_receive_when_only_the_publisher_decodes():
    schedule = Schedule(8, (0, 4), publisher_layers=all_layers(8), publisher_sync_every=3)
    assert schedule.receivers(0, 1, 3, everyone_decodes=False) == [2]
    assert schedule.receivers(0, 0, 3, everyone_decodes=False) == [1, 2]
    assert schedule.receivers(3, 2, 3, everyone_decodes=False) == []  # the publisher's sync helps no prefill


def test_layer_ranges_read_back():
    assert parse_layers("12-14,3") == (3, 12, 13, 14)
    assert format_layers((0, 1, 2, 5, 12, 13)) == "0-2,5,12-13"
    assert parse_layers(format_layers((0, 1, 2, 5, 12, 13))) == (0, 1, 2, 5, 12, 13)


def test_publisher_receive_blocks():
    schedule = Schedule(8, (0,), publisher_layers=(5, 6))
    assert not schedule.publisher_dense
    assert schedule.receivers(5, 0, 3, everyone_decodes=False) == [2]
    assert schedule.receivers(4, 0, 3, everyone_decodes=False) == []
    assert schedule.receivers(0, 0, 3, everyone_decodes=False) == [1, 2]
    with pytest.raises(FedAttnError, match="publisher receive block 9"):
        Schedule(8, (), publisher_layers=(9,))


@pytest.mark.parametrize(
    "text, message",
    [
        ("-1", "expected comma-separated"),
        ("a,b", "expected comma-separated"),
        ("3-1", "runs backwards"),
        ("", "no block"),
    ],
)
def test_bad_layers(text, message):
    with pytest.raises(FedAttnError, match=message) as raised:
        parse_layers(text)
    assert "--" not in str(raised.value)  # the library says what is wrong with the text, not which option held it


def test_blocks_the_model_lacks():
    assert check_layers((0, 23), 24) == (0, 23)
    with pytest.raises(FedAttnError, match=r"^block 99 is out of range: the model has blocks 0\.\.23$"):
        check_layers((0, 99), 24)
