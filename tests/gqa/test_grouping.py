"""The grouping type: canonical form, validation messages, JSON round trip, KV-cache cost."""

import json

import pytest

from gqa.grouping import Grouping, GroupingError, neighbour_partition


def test_relabelled_groupings_are_equal_and_hash_equal():
    a = Grouping.create(4, [[[3, 1], [0], [2]]], [[[0, 1, 2, 3]]])
    b = Grouping.create(4, [[[2], [1, 3], [0]]], [[[3, 2, 1, 0]]])
    assert a == b
    assert hash(a) == hash(b)
    assert a.layers[0].k == ((0,), (1, 3), (2,))
    assert len({a, b}) == 1


def test_k_and_v_may_differ_in_membership_and_count():
    g = Grouping.create(4, [[[0, 1], [2, 3]]], [[[0], [1, 2, 3]]])
    assert g.layers[0].num_k_groups == 2
    assert g.layers[0].v == ((0,), (1, 2, 3))
    assert not g.layers[0].shared


def test_neighbour_when_groups_do_not_divide_heads():
    assert neighbour_partition(9, 2) == ((0, 1, 2, 3, 4), (5, 6, 7, 8))
    assert neighbour_partition(9, 4) == ((0, 1, 2), (3, 4), (5, 6), (7, 8))
    g = Grouping.neighbour(9, 3, [1, 9, 2])
    assert [layer.num_k_groups for layer in g.layers] == [1, 9, 2]


def test_kv_bytes_formula():
    g = Grouping.create(
        6, [[[0, 1, 2], [3, 4, 5]], [[0], [1], [2, 3, 4, 5]]], [[[0, 1, 2, 3, 4, 5]]] * 2
    )
    # layer 0: 2 K + 1 V, layer 1: 3 K + 1 V -> 7 heads
    assert g.kv_heads() == 7
    assert g.kv_bytes_per_token(head_dim=64, dtype_bytes=2) == 7 * 64 * 2


def test_uniform_shared_detection():
    assert Grouping.create(4, [[[0, 3], [1, 2]]] * 2).is_uniform_shared()
    assert not Grouping.create(4, [[[0, 3], [1, 2]]], [[[0, 1], [2, 3]]]).is_uniform_shared()
    assert not Grouping.create(4, [[[0], [1, 2, 3]]]).is_uniform_shared()
    assert not Grouping.create(4, [[[0, 1], [2, 3]], [[0, 1, 2, 3]]]).is_uniform_shared()


@pytest.mark.parametrize(
    "groups, message",
    [
        ([[0, 1], [1, 2, 3]], "not a partition: head 1 is in groups 0 and 1"),
        ([[0, 1], [2]], r"not a partition: heads \[3\] are in no group"),
        ([[0, 1, 2, 3], []], "group 1 is empty"),
        ([[0, 1, 2], [3, 7]], r"head 7 in group 1 is out of range 0..3"),
        ([[0, 1, 2], [-1, 3]], r"head -1 in group 1 is out of range"),
        ([], "G = 0"),
        ([[0], [1], [2], [3], [4]], "5 groups for 4 heads: more groups than heads"),
        ([[0, 1.5], [2, 3]], "head 1.5 in group 0 is not an integer"),
    ],
)
def test_validation_messages(groups, message):
    with pytest.raises(GroupingError, match=message) as info:
        Grouping.create(4, [[[0, 1], [2, 3]], groups])
    assert str(info.value).startswith("layer 1 K: ")


def test_wrong_number_of_layers_and_heads_for_model():
    g = Grouping.neighbour(4, 2, 2)
    with pytest.raises(
        GroupingError, match="wrong number of layers: grouping has 2, the model has 3"
    ):
        g.check_model(num_layers=3, num_heads=4)
    with pytest.raises(GroupingError, match="grouping is for 4 query heads but the model has 8"):
        g.check_model(num_layers=2, num_heads=8)


def test_json_round_trip(tmp_path):
    g = Grouping.create(
        5, [[[4, 0], [1, 2, 3]], [[0], [1], [2], [3], [4]]], [[[0, 1, 2, 3, 4]]] * 2
    )
    assert Grouping.from_json(g.to_json()) == g
    path = tmp_path / "sub" / "g.json"
    g.save(path)
    assert Grouping.load(path) == g
    data = json.loads(path.read_text())
    assert data["format"] == "headgroup.grouping" and data["version"] == 1
    assert not list(path.parent.glob(".*tmp"))  # atomic write leaves no temporary file


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "bad JSON: Expecting property name"),
        ("[1, 2]", "bad JSON: a grouping must be a JSON object"),
        ('{"format": "other", "version": 1}', "bad JSON: 'format' must be"),
        ('{"format": "headgroup.grouping", "version": 9}', "bad JSON: unsupported version 9"),
        (
            '{"format": "headgroup.grouping", "version": 1, "num_heads": 2, "layers": [{"k": []}]}',
            "bad JSON: 'layers' must be",
        ),
        (
            '{"format": "headgroup.grouping", "version": 1, "layers": []}',
            "bad JSON: 'num_heads' is missing",
        ),
    ],
)
def test_bad_json_messages(text, message):
    with pytest.raises(GroupingError, match=message):
        Grouping.from_json(text)


def test_load_names_the_file(tmp_path):
    path = tmp_path / "g.json"
    path.write_text("{")
    with pytest.raises(GroupingError, match=f"{path}: bad JSON"):
        Grouping.load(path)
    with pytest.raises(GroupingError, match="does not exist"):
        Grouping.load(tmp_path / "missing.json")


def test_atomic_write_replaces_whole_file_with_plain_permissions(tmp_path):
    import os

    from gqa.grouping import write_text_atomic

    path = tmp_path / "sub" / "report.md"
    write_text_atomic(path, "first\n")
    write_text_atomic(path, "second\n")
    assert path.read_text() == "second\n"
    assert [p.name for p in path.parent.iterdir()] == ["report.md"]  # no temporary left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
