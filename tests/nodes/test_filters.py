"""The node filter grammar: a table of filters over a fixed node set, and the parser's errors.

Nothing external: the parser and matcher are pure functions.
"""

from __future__ import annotations

import pytest

from steps.nodes.filters import FilterError, parse_filter
from steps.nodes.model import Node


def node(iid: str, name: str, tags: tuple[str, ...], **attrs: str) -> Node:
    raw = {k.removeprefix("tag_"): v for k, v in attrs.items() if k.startswith("tag_")}
    plain = {k: v for k, v in attrs.items() if not k.startswith("tag_")}
    attributes = {"name": name, "instanceId": iid, **plain, **raw, **{f"tag:{k}": v for k, v in raw.items()}}
    return Node(f"ec2:1/us-east-1/{iid}", attributes, tags, raw)


NODES = [
    node("i-1", "web1", ("ec2", "running", "web", "prod"), state="running", osFamily="unix", tag_Env="prod"),
    node("i-2", "web2", ("ec2", "running", "web", "dev"), state="running", osFamily="unix", tag_Env="dev"),
    node("i-3", "db1", ("ec2", "stopped", "db", "prod"), state="stopped", osFamily="unix", tag_Env="prod"),
    node("i-4", "win1", ("ec2", "running", "web", "prod"), state="running", osFamily="windows",
         tag_Env="prod", tag_Role="iis"),
    node("i-5", "web1", ("ec2", "running"), state="running", osFamily="unix"),  # shares a name with i-1
    node("i-6", "api v2", ("ecs",), **{"ECS:Container-Image": "spring:3", "ECS:Cluster-Name": "blue"}),
]
ALL = {n.attributes["instanceId"] for n in NODES}

CASES = [
    ("", ALL),
    ("web1", {"i-1", "i-5"}),
    ("web.*", {"i-1", "i-2", "i-5"}),
    ("web1 web2", {"i-1", "i-2", "i-5"}),
    ("name: web1", {"i-1", "i-5"}),
    ("nodename: web1", {"i-1", "i-5"}),
    ("name: web1,db1", {"i-1", "i-3", "i-5"}),
    ("name: web.*,db1", {"i-3"}),  # a list is exact match: no regex inside it
    ("name: web1 name: db1", {"i-1", "i-3", "i-5"}),  # repeats concatenate into an exact list
    ("name: web[12]", {"i-1", "i-2", "i-5"}),
    ("name: web", set()),  # a regex must match the whole value
    ("name: .*1", {"i-1", "i-3", "i-4", "i-5"}),
    ("name: w.*|d.*", {"i-1", "i-2", "i-3", "i-4", "i-5"}),
    ("!name: web1", ALL - {"i-1", "i-5"}),
    ("!web1", ALL - {"i-1", "i-5"}),
    ("state: running", {"i-1", "i-2", "i-4", "i-5"}),
    ("!state: running", {"i-3", "i-6"}),  # a missing attribute is not excluded by a negation
    ("state: running !osFamily: windows", {"i-1", "i-2", "i-5"}),
    ("osFamily: windows", {"i-4"}),
    ("tags: web", {"i-1", "i-2", "i-4"}),
    ("tags: web+prod", {"i-1", "i-4"}),
    ("tags: web+prod,db", {"i-1", "i-3", "i-4"}),
    ("tags: db,dev", {"i-2", "i-3"}),
    ("tags: web+dev+running", {"i-2"}),
    ("tags: web+nope", set()),
    ("!tags: web", {"i-3", "i-5", "i-6"}),
    ("tags: ecs", {"i-6"}),
    ("tags: web name: win.*", {"i-4"}),
    ("tag:Env: prod", {"i-1", "i-3", "i-4"}),
    ("tag:Env: prod,dev", {"i-1", "i-2", "i-3", "i-4"}),
    ("!tag:Env: prod", {"i-2", "i-5", "i-6"}),
    ("Env: prod", {"i-1", "i-3", "i-4"}),  # every tag is also an attribute of its own
    ("tag:Role: iis", {"i-4"}),
    ("tag:Role: .*", {"i-4"}),
    ("tag:Missing: .*", set()),
    ("ECS:Container-Image: spring.*", {"i-6"}),
    ("ECS:Cluster-Name: blue,green", {"i-6"}),
    ('"api v2"', {"i-6"}),
    ("name: 'api v2'", {"i-6"}),
    ("instanceId: i-1,i-2", {"i-1", "i-2"}),
    ("instanceId: i-[34]", {"i-3", "i-4"}),
    ("  web2   ", {"i-2"}),
    ("tags: prod !tags: db state: running", {"i-1", "i-4"}),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_filter_selects(text: str, expected: set[str]) -> None:
    # Given the fixed nodes, when the filter is applied, then exactly the expected instances remain.
    selected = parse_filter(text).select(NODES)
    assert {n.attributes["instanceId"] for n in selected} == expected


ERRORS = [
    ("name:", 5, "a value after 'name:'"),
    ("name: ", 6, "a value after 'name:'"),
    ("name: state: x", 6, "a value after 'name:'"),
    (": x", 0, "an attribute name before ':'"),
    ("!: x", 0, "an attribute name before ':'"),
    ("!", 0, "an attribute or a name after '!'"),
    ("name:web1", 5, "a space after ':'"),
    ("tag:Env:prod", 4, "a space after ':'"),
    ("name: a,,b", 8, "a value between separators"),
    ("name: a,", 8, "a value between separators"),
    ("tags: a++b", 6, "a value between separators"),
    ("tags: +a", 6, "a value between separators"),
    ("tags: a,", 8, "a value between separators"),
    ("name: (", 6, "a valid regular expression"),
    ("web[", 3, "a valid regular expression"),
    ('name: "abc', 6, 'a closing "'),
    ("'", 0, "a closing '"),
]


@pytest.mark.parametrize(("text", "position", "expected"), ERRORS)
def test_filter_errors_name_position_and_expected_token(text: str, position: int, expected: str) -> None:
    with pytest.raises(FilterError) as caught:
        parse_filter(text)
    assert caught.value.position == position
    assert expected in caught.value.expected
    assert f"at position {position}: expected" in str(caught.value)


def test_table_is_large_enough() -> None:
    assert len(CASES) + len(ERRORS) >= 40
