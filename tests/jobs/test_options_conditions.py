"""Option values (typed, required/default, pattern, enum) and the ``when:`` expression language."""

from __future__ import annotations

from typing import Any

import pytest

from worker.jobs import conditions
from worker.jobs.options import Option, OptionError, values_for

DECLARED = {
    "env": Option(type="enum", choices=["dev", "prod"], default="dev"),
    "count": Option(type="integer", required=True),
    "ids": Option(type="list", pattern=r"^i-[0-9a-f]+$"),
    "dry": Option(type="boolean", default=False),
    "name": Option(type="string", pattern=r"^[a-z]+$"),
}


def test_text_values_are_parsed_to_the_option_types() -> None:
    values = values_for(DECLARED, {"count": "3", "ids": "i-1,i-2", "dry": "true", "name": "web"}, from_text=True)
    assert values == {"env": "dev", "count": 3, "ids": ["i-1", "i-2"], "dry": True, "name": "web"}


@pytest.mark.parametrize(("given", "option", "message"), [
    ({}, "count", "is required"),
    ({"count": "x"}, "count", "takes integer"),
    ({"count": "1", "env": "staging"}, "env", "is one of dev, prod"),
    ({"count": "1", "ids": "i-1,vol-2"}, "ids", "does not match"),
    ({"count": "1", "dry": "maybe"}, "dry", "takes boolean"),
    ({"count": "1", "name": "Web"}, "name", "does not match"),
    ({"count": "1", "colour": "red"}, "colour", "unknown option"),
])
def test_bad_values_name_the_option(given: dict[str, Any], option: str, message: str) -> None:
    with pytest.raises(OptionError) as raised:
        values_for(DECLARED, given, from_text=True)
    assert raised.value.option == option
    assert message in str(raised.value)


def test_json_values_are_not_coerced() -> None:
    with pytest.raises(OptionError, match="takes integer"):
        values_for(DECLARED, {"count": "3"})
    with pytest.raises(OptionError, match="takes integer"):
        values_for(DECLARED, {"count": True})


OUTPUTS = {"check": {"count": 2, "failed": ["i-1"], "state": "ok", "empty": []}}


@pytest.mark.parametrize(("expression", "expected"), [
    ("${steps.check.outputs.count} > 0", True),
    ("${steps.check.outputs.count} >= 3", False),
    ("${steps.check.outputs.failed}", True),
    ("${steps.check.outputs.empty}", False),
    ("not ${steps.check.outputs.empty}", True),
    ("${steps.check.outputs.state} == 'ok' and ${steps.check.outputs.count} != 1", True),
    ("${steps.check.outputs.state} == \"bad\" or (1 < 2 and not false)", True),
    ("'i-1' in ${steps.check.outputs.failed}", True),
    ("${steps.check.outputs.state} in ['ok', 'warn']", True),
    ("${steps.check.outputs.failed[0]} == 'i-1'", True),
    ("null == null", True),
    ("-1.5 < 0", True),
    ("false or ${steps.check.outputs.missing}", "fails"),
    ("${steps.check.outputs.state} > 1", "fails"),
])
def test_conditions(expression: str, expected: bool | str) -> None:
    if expected == "fails":
        with pytest.raises(conditions.ConditionFailed):
            conditions.holds(expression, {}, OUTPUTS)
    else:
        assert conditions.holds(expression, {}, OUTPUTS) is expected


@pytest.mark.parametrize("expression", [
    "__import__('os')", "1 +", "a.b", "1 = 1", "(1 < 2", "[${steps.check.outputs.count}]", "1 < 2 3", "x" * 1001,
])
def test_no_eval_and_syntax_errors_are_refused(expression: str) -> None:
    with pytest.raises(conditions.ConditionInvalid):
        conditions.parse(expression)
