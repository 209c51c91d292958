"""logs.query, logs.saved_query and logs.create_stream against moto's server, and botocore Stubber.

moto's Logs Insights ignores filter/stats/parse, is Complete at once, and has no StopQuery or
DescribeQueryDefinitions: the moto tests use only ``fields``/``sort``/``limit``, and the rest is stubbed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from botocore.stub import ANY, Stubber
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from structlog.testing import capture_logs

from steps.base import Done, Poll, StepParams
from steps.errors import Permanent, RemoteFailed
from steps.logs import CreateLogStream, QueryLogs, RunSavedQuery
from tests.harness import LocalContext, PagingContext, assert_within_iam, run_step

if TYPE_CHECKING:
    from types_boto3_logs.type_defs import InputLogEventTypeDef

FIELDS_QUERY = "fields @timestamp, @message | sort @timestamp asc"




def stubbed(ctx: LocalContext) -> Stubber:
    """A Stubber on the context's own logs client, so ctx.calls still records every call."""
    stubber = Stubber(ctx.client("logs"))
    stubber.activate()
    return stubber


def write_events(group: str, stream: str, minutes_ago: Sequence[int]) -> None:
    """Create ``group``/``stream`` in moto and write one event per entry, ``m<minutes>`` at now - minutes."""
    logs = boto3.client("logs", region_name="us-east-1")
    logs.create_log_group(logGroupName=group)
    logs.create_log_stream(logGroupName=group, logStreamName=stream)
    now = int(time.time() * 1000)
    if minutes_ago:
        ordered = sorted(minutes_ago, reverse=True)
        events: list[InputLogEventTypeDef] = [
            {"timestamp": now - m * 60_000, "message": f"m{m}"} for m in ordered
        ]
        logs.put_log_events(logGroupName=group, logStreamName=stream, logEvents=events)


def row(**fields: str) -> list[dict[str, str]]:
    """One Logs Insights result row, with the @ptr every row carries."""
    return [{"field": "@ptr", "value": "ptr"}, *({"field": k, "value": v} for k, v in fields.items())]


# --- logs.query on moto -----------------------------------------------------------------------


def test_query_pages_the_events_the_test_wrote(aws: str) -> None:
    """moto: start, then one check that finds it Complete; @ptr dropped, columns in order of appearance."""
    write_events("/app/web", "i-1", [30, 20, 10])
    params = QueryLogs.Params.model_validate(
        {"log_group_name": "/app/web", "query": FIELDS_QUERY, "past": 1, "unit": "Hours"}
    )
    with capture_logs() as logs:
        ctx = LocalContext()
        first = QueryLogs().run(ctx, params)
        assert isinstance(first, Poll)
        assert ctx.checkpoints == [{"query_id": first.state["query_id"]}]
        ctx.state.update(first.state)
        done = QueryLogs().run(ctx, params)
    assert isinstance(done, Done)
    assert ctx.columns == ["@timestamp", "@message"]
    assert [r[1] for r in ctx.rows] == ["m30", "m20", "m10"]
    assert ctx.tables[0][1:] == (["@timestamp", "@message"], ctx.rows)
    assert [e["status"] for e in logs if e["event"] == "logs.status"] == ["Complete"]
    assert done.outputs == {
        "query_id": first.state["query_id"],
        "status": "Complete",
        "records_matched": 0,  # moto returns no statistics
        "records_scanned": 0,
        "bytes_scanned": 0,
        "row_count": 3,
        "truncated": False,
    }
    assert_within_iam(QueryLogs, ctx)


def test_query_over_two_groups_with_limit(aws: str) -> None:
    """moto: several groups are queried together; moto honours the query's own limit, not the parameter."""
    write_events("/app/web", "i-1", [3, 1])
    write_events("/app/worker", "i-2", [2])
    payload = {"log_group_names": ["/app/web", "/app/worker"], "query": "fields @message, @log", "past": 10}
    done, ctx = run_step(QueryLogs, {**payload, "query": "fields @message, @log | limit 2"})
    assert done.outputs["row_count"] == 2
    assert ctx.columns == ["@message", "@log"]
    done, ctx = run_step(QueryLogs, payload)
    assert sorted(r[0] for r in ctx.rows) == ["m1", "m2", "m3"]
    assert_within_iam(QueryLogs, ctx)


def test_absolute_time_range_selects_events(aws: str) -> None:
    """moto applies the time range (it is the one part of the query it honours besides fields/sort/limit)."""
    write_events("/app/web", "i-1", [50, 30, 5])
    now = datetime.now(UTC)
    window = {
        "start": (now - timedelta(minutes=40)).isoformat(),
        "end": (now - timedelta(minutes=10)).isoformat(),
    }
    done, ctx = run_step(QueryLogs, {"log_group_name": "/app/web", "query": "fields @message", **window})
    assert ctx.rows == [["m30"]]
    assert done.outputs["row_count"] == 1


# --- logs.query on Stubber --------------------------------------------------------------------


def test_running_then_complete_with_statistics_and_pages(offline: None) -> None:
    """Stubber: moto is never Running, has no statistics and no nextToken pages."""
    ctx = PagingContext()
    stubber = stubbed(ctx)
    expected = {
        "logGroupNames": ["/app/web"],
        "queryString": "fields @message",
        "startTime": ANY,
        "endTime": ANY,
    }
    stubber.add_response("start_query", {"queryId": "lq-1"}, {**expected, "limit": 500})
    stubber.add_response("get_query_results", {"status": "Running", "results": [row(a="partial")]})
    stubber.add_response("get_query_results", {"status": "Running", "results": []})
    statistics = {"recordsMatched": 3.0, "recordsScanned": 120.0, "bytesScanned": 4096.0}
    first_page = [row(a="1"), row(b="2"), row(a="3", b="4")]
    stubber.add_response(
        "get_query_results",
        {"status": "Complete", "results": first_page, "statistics": statistics, "nextToken": "n1"},
        {"queryId": "lq-1"},
    )
    stubber.add_response(
        "get_query_results",
        {"status": "Complete", "results": [row(c="5")]},
        {"queryId": "lq-1", "nextToken": "n1"},
    )
    params = QueryLogs.Params(log_group_name="/app/web", query="fields @message", past=5, limit=500)
    with capture_logs() as logs:
        outcomes = [QueryLogs().run(ctx, params)]
        while isinstance(outcomes[-1], Poll):
            ctx.state.update(outcomes[-1].state)
            outcomes.append(QueryLogs().run(ctx, params))
    done = outcomes[-1]
    assert isinstance(done, Done)
    assert [type(o).__name__ for o in outcomes] == ["Poll", "Poll", "Poll", "Done"]
    assert [e["status"] for e in logs if e["event"] == "logs.status"] == ["Running", "Complete"]
    assert ctx.columns == ["a", "b", "c"]
    assert ctx.rows == [["1", None], [None, "2"], ["3", "4"], [None, None, "5"]]
    assert ctx.pages == [3, 1]
    assert done.outputs["records_matched"] == 3
    assert done.outputs["records_scanned"] == 120
    assert done.outputs["bytes_scanned"] == 4096
    assert done.outputs["row_count"] == 4
    stubber.assert_no_pending_responses()
    assert_within_iam(QueryLogs, ctx)


@pytest.mark.parametrize("status", ["Failed", "Cancelled", "Timeout", "Unknown"])
def test_a_query_that_does_not_complete_is_a_remote_failure(offline: None, status: str) -> None:
    """Stubber: moto only ever says Complete."""
    ctx = LocalContext()
    ctx.state["query_id"] = "lq-1"
    stubbed(ctx).add_response("get_query_results", {"status": status, "results": []})
    with pytest.raises(RemoteFailed, match=f"ended {status}") as caught:
        QueryLogs().run(ctx, QueryLogs.Params(log_group_name="/app/web", query="fields @message", past=5))
    assert (caught.value.code, caught.value.resource_id) == (status, "lq-1")


def test_row_cap_stops_paging_and_marks_truncated(offline: None) -> None:
    """Stubber: add_rows returning False (the runner's cap) ends paging; the next page is never asked for."""
    ctx = PagingContext(max_rows=2)
    ctx.state["query_id"] = "lq-1"
    stubber = stubbed(ctx)
    page = {"status": "Complete", "results": [row(a="1"), row(a="2"), row(a="3")], "nextToken": "n1"}
    stubber.add_response("get_query_results", page)
    done = QueryLogs().run(ctx, QueryLogs.Params(log_group_name="/app/web", query="fields a", past=5))
    assert isinstance(done, Done)
    assert (done.outputs["truncated"], len(ctx.rows)) == (True, 2)
    stubber.assert_no_pending_responses()


def test_cancel_stops_the_checkpointed_query(offline: None) -> None:
    """Stubber: moto has no StopQuery."""
    ctx = LocalContext()
    ctx.state["query_id"] = "lq-1"
    stubber = stubbed(ctx)
    stubber.add_response("stop_query", {"success": True}, {"queryId": "lq-1"})
    QueryLogs().cancel(ctx, QueryLogs.Params(log_group_name="/app/web", query="fields a", past=5))
    stubber.assert_no_pending_responses()
    assert_within_iam(QueryLogs, ctx)


def test_cancel_before_start_calls_nothing(offline: None) -> None:
    ctx = LocalContext()
    QueryLogs().cancel(ctx, QueryLogs.Params(log_group_name="/app/web", query="fields a", past=5))
    assert ctx.calls == []


@pytest.mark.parametrize(
    ("step", "payload"),
    [
        (QueryLogs, {"log_group_name": "/app/web", "query": "fields a", "past": 5}),
        (RunSavedQuery, {"query_name": "errors", "past": 5}),
    ],
)
def test_redelivered_first_phase_does_not_start_again(
    offline: None, step: type[QueryLogs | RunSavedQuery], payload: dict[str, Any]
) -> None:
    """Stubber: with query_id checkpointed, only GetQueryResults is expected (no StartQuery, no lookup)."""
    ctx = LocalContext()
    ctx.state["query_id"] = "lq-1"
    stubber = stubbed(ctx)
    stubber.add_response("get_query_results", {"status": "Running", "results": []}, {"queryId": "lq-1"})
    outcome = step().run(ctx, step.Params.model_validate(payload))
    assert outcome == Poll(state={"query_id": "lq-1", "last_status": "Running"})
    assert ctx.calls == ["logs:GetQueryResults"]
    stubber.assert_no_pending_responses()


# --- logs.saved_query (Stubber: moto has no DescribeQueryDefinitions) ---------------------------


def definition(name: str, groups: list[str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "queryDefinitionId": f"id-{name}",
        "name": name,
        "queryString": f"fields @message # {name}",
    }
    return body | ({"logGroupNames": groups} if groups else {})


def test_saved_query_runs_the_exact_match_from_paged_definitions(offline: None) -> None:
    """Stubber: the prefix lookup pages with nextToken; a longer name sharing the prefix is not chosen."""
    ctx = LocalContext()
    stubber = stubbed(ctx)
    prefix = {"queryDefinitionNamePrefix": "infra/nginx/fetch-nginx", "maxResults": 1000}
    longer = definition("infra/nginx/fetch-nginx-5xx", ["/other"])
    exact = definition("infra/nginx/fetch-nginx", ["/ec2/nginx/logs", "/ec2/nginx/errors"])
    stubber.add_response(
        "describe_query_definitions", {"queryDefinitions": [longer], "nextToken": "d1"}, prefix
    )
    stubber.add_response(
        "describe_query_definitions", {"queryDefinitions": [exact]}, {**prefix, "nextToken": "d1"}
    )
    expected = {
        "logGroupNames": ["/ec2/nginx/logs", "/ec2/nginx/errors"],
        "queryString": "fields @message # infra/nginx/fetch-nginx",
        "startTime": ANY,
        "endTime": ANY,
    }
    stubber.add_response("start_query", {"queryId": "lq-9"}, expected)
    params = RunSavedQuery.Params(query_path="infra/nginx", query_name="fetch-nginx", past=30, unit="minutes")
    outcome = RunSavedQuery().run(ctx, params)
    assert outcome == Poll(state={"query_id": "lq-9"})
    assert ctx.checkpoints == [{"query_id": "lq-9"}]
    stubber.assert_no_pending_responses()
    assert_within_iam(RunSavedQuery, ctx)


def test_saved_query_log_groups_can_be_overridden(offline: None) -> None:
    """Stubber: log_group_names replaces the saved groups; the saved query language is passed on."""
    ctx = LocalContext()
    stubber = stubbed(ctx)
    saved = definition("errors", ["/saved"]) | {"queryLanguage": "CWLI"}
    stubber.add_response("describe_query_definitions", {"queryDefinitions": [saved]})
    expected = {"logGroupNames": ["/mine"], "queryString": ANY, "startTime": ANY, "endTime": ANY, "limit": 10}
    stubber.add_response("start_query", {"queryId": "lq-2"}, {**expected, "queryLanguage": "CWLI"})
    params = RunSavedQuery.Params(
        query_name="errors", log_group_names=("/mine",), past=1, unit="days", limit=10
    )
    assert RunSavedQuery().run(ctx, params) == Poll(state={"query_id": "lq-2"})
    stubber.assert_no_pending_responses()


def test_saved_query_not_found_names_the_closest(offline: None) -> None:
    """Stubber: nothing under the full name, so every definition is listed for the closest names."""
    ctx = LocalContext()
    stubber = stubbed(ctx)
    stubber.add_response("describe_query_definitions", {"queryDefinitions": []})
    names = ["infra/nginx/fetch-ngnix", "infra/nginx/fetch-nginx-5xx", "billing/daily"]
    stubber.add_response(
        "describe_query_definitions",
        {"queryDefinitions": [definition(n) for n in names]},
        {"maxResults": 1000},
    )
    params = RunSavedQuery.Params(query_path="infra/nginx", query_name="fetch-nginx", past=5)
    with pytest.raises(
        Permanent, match=r"closest: infra/nginx/fetch-ngnix, infra/nginx/fetch-nginx-5xx\)"
    ) as caught:
        RunSavedQuery().run(ctx, params)
    assert caught.value.code == "QueryDefinitionNotFound"
    assert "billing/daily" not in str(caught.value)
    assert "logs:StartQuery" not in ctx.calls
    stubber.assert_no_pending_responses()
    assert_within_iam(RunSavedQuery, ctx)


def test_saved_query_without_log_groups_is_rejected(offline: None) -> None:
    """Stubber: neither the definition nor the params name a log group."""
    ctx = LocalContext()
    stubbed(ctx).add_response("describe_query_definitions", {"queryDefinitions": [definition("errors")]})
    with pytest.raises(Permanent, match="names no log groups; give log_group_names"):
        RunSavedQuery().run(ctx, RunSavedQuery.Params(query_name="errors", past=5))
    assert "logs:StartQuery" not in ctx.calls


# --- logs.create_stream on moto ---------------------------------------------------------------


def create(payload: dict[str, Any]) -> tuple[Done, LocalContext]:
    return run_step(
        CreateLogStream, {"log_group_name": "/audit/trail", "log_stream_name": "run-1", **payload}
    )


def test_create_stream_in_an_existing_group(aws: str) -> None:
    """moto: a new stream is created and checkpointed."""
    boto3.client("logs", region_name="us-east-1").create_log_group(logGroupName="/audit/trail")
    done, ctx = create({})
    assert done.outputs == {"log_group_name": "/audit/trail", "log_stream_name": "run-1", "created": True}
    assert ctx.checkpoints == [{"created": True}]
    streams = boto3.client("logs", region_name="us-east-1").describe_log_streams(logGroupName="/audit/trail")
    assert [s["logStreamName"] for s in streams["logStreams"]] == ["run-1"]
    assert_within_iam(CreateLogStream, ctx)


def test_existing_stream_succeeds_with_a_warning(aws: str) -> None:
    """moto: CreateLogStream's ResourceAlreadyExistsException is accepted by default."""
    write_events("/audit/trail", "run-1", [])
    with capture_logs() as logs:
        done, _ = create({})
    assert done.outputs["created"] is False
    assert [e["log_level"] for e in logs if e["event"] == "logs.stream_exists"] == ["warning"]


def test_existing_stream_fails_when_asked(aws: str) -> None:
    write_events("/audit/trail", "run-1", [])
    with pytest.raises(Permanent, match="already exists") as caught:
        create({"fail_if_exists": True})
    assert caught.value.code == "ResourceAlreadyExistsException"


def test_missing_group_is_created_when_asked(aws: str) -> None:
    """moto: create_group creates the group first; run again, the existing group is fine."""
    with pytest.raises(Permanent, match="set create_group: true"):
        create({})
    done, ctx = create({"create_group": True})
    assert done.outputs["created"] is True
    done, ctx = create({"create_group": True, "log_stream_name": "run-2"})
    assert done.outputs["created"] is True
    assert ctx.calls == ["logs:CreateLogGroup", "logs:CreateLogStream"]
    assert_within_iam(CreateLogStream, ctx)


def test_redelivered_create_reports_the_earlier_creation(offline: None) -> None:
    """Stubber: a checkpointed creation is not repeated (no calls are stubbed)."""
    ctx = LocalContext()
    ctx.state["created"] = True
    stubber = stubbed(ctx)
    done, _ = run_step(CreateLogStream, {"log_group_name": "/audit/trail", "log_stream_name": "run-1"}, ctx)
    assert done.outputs["created"] is True
    assert ctx.calls == []
    stubber.assert_no_pending_responses()


# --- params -----------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
PLAUSIBLE = st.sampled_from(
    ["fields @message", " ", "/app/web", ["/app/web"], "errors", "infra/nginx", "/bad", "Days", "MINUTES",
     "fortnights", 0, 1, 5, 10_000, 10**12, -3, True, "2026-01-01T00:00:00Z", "2026-01-01T01:00:00",
     "2026-01-01T00:30:00+05:00", "0001-01-01T00:00:00", "9999-12-31T23:59:59-23:59"]
)  # fmt: skip


def fuzz_payloads(params: type[StepParams]) -> st.SearchStrategy[dict[str, Any]]:
    keys = st.sampled_from(sorted(params.model_fields)) | st.text(max_size=8)
    return st.dictionaries(keys, PLAUSIBLE | JSON, max_size=9)


def check_fuzz(params: type[StepParams], payload: dict[str, Any]) -> StepParams | None:
    try:
        return params.model_validate(payload)
    except ValidationError:
        return None


@settings(max_examples=400, deadline=None)
@given(fuzz_payloads(QueryLogs.Params))
def test_query_params_fuzz(payload: dict[str, Any]) -> None:
    """Arbitrary JSON gives a model whose request builds (start before end), or a ValidationError."""
    model = check_fuzz(QueryLogs.Params, payload)
    if isinstance(model, QueryLogs.Params):
        request = model.start_request(model.query, model.groups, datetime.now(UTC))
        assert 0 <= request["startTime"] < request["endTime"]
        assert 1 <= len(request["logGroupNames"]) <= 50


@settings(max_examples=400, deadline=None)
@given(fuzz_payloads(RunSavedQuery.Params))
def test_saved_query_params_fuzz(payload: dict[str, Any]) -> None:
    model = check_fuzz(RunSavedQuery.Params, payload)
    if isinstance(model, RunSavedQuery.Params):
        start, end = model.window(datetime.now(UTC))
        assert 0 <= start < end
        assert len(model.full_name) <= 255


@settings(max_examples=200, deadline=None)
@given(fuzz_payloads(CreateLogStream.Params))
def test_create_stream_params_fuzz(payload: dict[str, Any]) -> None:
    check_fuzz(CreateLogStream.Params, payload)


QUERY = {"log_group_name": "/app/web", "query": "fields @message"}


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (QUERY, "give a time range"),
        ({**QUERY, "past": 5, "start": "2026-01-01T00:00:00Z", "end": "2026-01-02T00:00:00Z"}, "not both"),
        (
            {**QUERY, "start": "2026-01-02T00:00:00Z", "end": "2026-01-01T00:00:00Z"},
            "start must come before end",
        ),
        (
            {**QUERY, "start": "2026-01-01T00:00:00Z", "end": "2026-01-01T00:00:00Z"},
            "start must come before end",
        ),
        (
            {**QUERY, "start": "2026-01-01T01:00:00+01:00", "end": "2026-01-01T00:00:00"},
            "start must come before",
        ),
        ({**QUERY, "start": "2026-01-01T00:00:00Z"}, "needs both start and end"),
        (
            {**QUERY, "unit": "days", "start": "2026-01-01T00:00:00Z", "end": "2026-01-02T00:00:00Z"},
            "unit goes",
        ),
        ({**QUERY, "unit": "days"}, "give a time range"),
        ({**QUERY, "past": 0}, "greater than or equal to 1"),
        ({**QUERY, "past": 5, "unit": "fortnights"}, "Input should be 'minutes', 'hours', 'days' or 'weeks'"),
        ({**QUERY, "past": 10**9, "unit": "weeks"}, "reaches back more than"),
        ({**QUERY, "past": 5, "limit": 10_001}, "less than or equal to 10000"),
        ({"query": "fields @message", "past": 5}, "exactly one"),
        ({**QUERY, "log_group_names": ["/a"], "past": 5}, "exactly one"),
        (
            {**QUERY, "log_group_name": None, "log_group_names": [f"/g{n}" for n in range(51)], "past": 5},
            "at most 50",
        ),
        ({**QUERY, "log_group_name": None, "log_group_names": [], "past": 5}, "at least 1"),
        ({**QUERY, "log_group_name": "bad group", "past": 5}, "String should match pattern"),
        ({**QUERY, "query": "   ", "past": 5}, "String should match pattern"),
        ({**QUERY, "query": "x" * 10_001, "past": 5}, "at most 10000"),
    ],
)
def test_bad_query_params_are_rejected(payload: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        QueryLogs.Params.model_validate(payload)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"query_name": "q", "past": 5, "log_group_names": [f"/g{n}" for n in range(51)]}, "at most 50"),
        ({"query_name": "q", "query_path": "/infra", "past": 5}, "String should match pattern"),
        ({"query_name": "q", "query_path": "infra/", "past": 5}, "String should match pattern"),
        ({"query_name": "q" * 200, "query_path": "p" * 60, "past": 5}, "longer than"),
        ({"query_name": "q"}, "give a time range"),
    ],
)
def test_bad_saved_query_params_are_rejected(payload: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        RunSavedQuery.Params.model_validate(payload)


def test_relative_window_ends_now_and_naive_times_are_utc() -> None:
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    relative = QueryLogs.Params.model_validate({**QUERY, "past": 2, "unit": "Days"})
    assert relative.window(now) == (int((now - timedelta(days=2)).timestamp()), int(now.timestamp()))
    absolute = QueryLogs.Params.model_validate(
        {**QUERY, "start": "2026-03-01T10:00:00", "end": "2026-03-01T12:00:00"}
    )
    assert absolute.window(now) == (int((now - timedelta(hours=2)).timestamp()), int(now.timestamp()))


def test_create_stream_rejects_bad_names() -> None:
    with pytest.raises(ValidationError, match="String should match pattern"):
        CreateLogStream.Params.model_validate({"log_group_name": "/a", "log_stream_name": "bad:name"})


# --- what a real account does that moto does not (issue 15) ------------------------------------------------


def test_saved_sql_and_source_queries_run_without_log_group_names(offline: None) -> None:
    """Stubber. Finding 10: StartQuery needs log groups — "The exception is queries using the OpenSearch
    Service SQL query language, where you specify the log group names inside the querystring instead of
    here" — and a Logs Insights QL query can name them itself with SOURCE."""
    for saved in (
        {**definition("sql"), "queryLanguage": "SQL", "queryString": "SELECT * FROM `/app/web` LIMIT 5"},
        {**definition("source"), "queryString": "SOURCE logGroups(namePrefix: ['/app']) | fields @message"},
    ):
        ctx = LocalContext()
        stubber = stubbed(ctx)
        stubber.add_response("describe_query_definitions", {"queryDefinitions": [saved]})
        expected = {"queryString": saved["queryString"], "startTime": ANY, "endTime": ANY}
        if "queryLanguage" in saved:
            expected["queryLanguage"] = saved["queryLanguage"]
        stubber.add_response("start_query", {"queryId": "lq-1"}, expected)
        assert RunSavedQuery().run(ctx, RunSavedQuery.Params(query_name=saved["name"], past=5)) == Poll(
            state={"query_id": "lq-1"})
        stubber.assert_no_pending_responses()


def test_saved_query_placeholders_are_filled(offline: None) -> None:
    """Stubber. Finding 10: QueryParameter — "placeholder variables that you can reference in a query string
    using the {{parameterName}} syntax. Each parameter can include a default value"; sending them unfilled
    makes Logs Insights fail the query."""
    saved = {**definition("by-status", ["/app/web"]),
             "queryString": "fields @message | filter status = {{status}} and host = '{{ host }}'",
             "parameters": [{"name": "status"}, {"name": "host", "defaultValue": "web-1"}]}
    ctx = LocalContext()
    stubber = stubbed(ctx)
    stubber.add_response("describe_query_definitions", {"queryDefinitions": [saved]})
    stubber.add_response("start_query", {"queryId": "lq-1"}, {
        "logGroupNames": ["/app/web"], "startTime": ANY, "endTime": ANY,
        "queryString": "fields @message | filter status = 500 and host = 'web-1'"})
    RunSavedQuery().run(ctx, RunSavedQuery.Params(query_name="by-status", past=5, parameters={"status": "500"}))
    stubber.assert_no_pending_responses()

    ctx = LocalContext()
    stubbed(ctx).add_response("describe_query_definitions", {"queryDefinitions": [saved]})
    with pytest.raises(Permanent, match="give parameters for status"):
        RunSavedQuery().run(ctx, RunSavedQuery.Params(query_name="by-status", past=5))


def test_saved_query_takes_up_to_fifty_override_groups() -> None:
    """Finding 10: StartQuery "You can include up to 50 log groups" (the step capped it at 20)."""
    groups = [f"/g{n}" for n in range(50)]
    assert len(RunSavedQuery.Params(query_name="q", past=5, log_group_names=groups).log_group_names or ()) == 50


@pytest.mark.parametrize("step", [QueryLogs, RunSavedQuery])
def test_cancel_of_a_query_that_already_finished_is_not_a_failure(offline: None, step: type[Any]) -> None:
    """Stubber. Finding 13: StopQuery of a query that is no longer running is refused
    (InvalidParameterException); the step then has nothing to stop, and says so."""
    ctx = LocalContext()
    ctx.state["query_id"] = "lq-1"
    stubbed(ctx).add_client_error("stop_query", service_error_code="InvalidParameterException",
                                  service_message="Query lq-1 is not running", expected_params={"queryId": "lq-1"})
    payload = {"query": "fields a", "log_group_name": "/app/web"} if step is QueryLogs else {"query_name": "q"}
    with capture_logs() as logs:
        step().cancel(ctx, step.Params.model_validate({**payload, "past": 5}))
    assert [entry["event"] for entry in logs] == ["logs.stop_skipped"]
