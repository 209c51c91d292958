"""athena.query against moto's server (states, seeded rows, the S3 file) and botocore Stubber (the rest)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from structlog.testing import capture_logs

from steps.athena import QueryAthena, console_url
from steps.base import Done, Poll, Watch
from steps.errors import RemoteFailed
from tests.harness import LocalContext, PagingContext, assert_within_iam, run_step
from worker import sandbox

QUERY = "SELECT instance_id, cnt FROM ops.counts"
URL = "https://us-east-1.console.aws.amazon.com/athena/home?region=us-east-1#/query-editor/history/{}"
IAM_UNUSED_OK = {
    "athena.query": {"athena:BatchGetQueryExecution": "called by the fleet's poll coalescer outside the step "
                     "(worker/quotas/coalesce.py), tested in tests/integration/test_coalesce_e2e.py"},
}




@pytest.fixture
def manual_athena(aws: str) -> Iterator[str]:
    """moto's Athena executions go QUEUED -> RUNNING -> SUCCEEDED, two gets a state (reset keeps it: undo)."""
    body = {"model_name": "athena::execution", "transition": {"progression": "manual", "times": 2}}
    sandbox.moto_post(aws, "/moto-api/state-manager/set-transition", json.dumps(body).encode())
    try:
        yield aws
    finally:
        body = {"model_name": "athena::execution"}
        sandbox.moto_post(aws, "/moto-api/state-manager/unset-transition", json.dumps(body).encode())


def stubbed(ctx: LocalContext, service: str = "athena") -> Stubber:
    """A Stubber on the context's own client, so ctx.calls still records every call."""
    stubber = Stubber(ctx.client(service))
    stubber.activate()
    return stubber


def seed(url: str, rows: list[list[str | None]], columns: list[str]) -> None:
    """Queue one canned result set in moto (rows as Athena returns them, header row included if any)."""
    data = [{"Data": [{} if v is None else {"VarCharValue": v} for v in row]} for row in rows]
    info = [{"Name": name, "Type": "varchar"} for name in columns]
    body = {"results": [{"rows": data, "column_info": info}]}
    sandbox.moto_post(url, "/moto-api/static/athena/query-results", json.dumps(body).encode())


def execution(state: str, **status: Any) -> dict[str, Any]:
    """A GetQueryExecution response in ``state``."""
    return {
        "QueryExecution": {
            "QueryExecutionId": "q-1",
            "Status": {"State": state, **status},
            "ResultConfiguration": {"OutputLocation": "s3://results/q-1.csv"},
            "Statistics": {
                "DataScannedInBytes": 2048,
                "EngineExecutionTimeInMillis": 900,
                "TotalExecutionTimeInMillis": 1200,
            },
        }
    }


def results_page(rows: list[list[str | None]], token: str | None, header: bool = False) -> dict[str, Any]:
    """One GetQueryResults page with columns a, b."""
    all_rows: list[list[str | None]] = [["a", "b"], *rows] if header else rows
    page: dict[str, Any] = {
        "ResultSet": {
            "Rows": [{"Data": [{} if v is None else {"VarCharValue": v} for v in row]} for row in all_rows],
            "ResultSetMetadata": {
                "ColumnInfo": [{"Name": "a", "Type": "varchar"}, {"Name": "b", "Type": "varchar"}]
            },
        }
    }
    return page | ({"NextToken": token} if token else {})


def messages(logs: Sequence[Mapping[str, Any]]) -> list[str]:
    return [entry["message"] for entry in logs if "message" in entry]


# --- moto -------------------------------------------------------------------------------------


def test_states_are_logged_once_per_change_one_poll_per_phase(manual_athena: str) -> None:
    """moto: the manual state transition makes each get_query_execution one step further."""
    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="results")
    seed(manual_athena, [["instance_id", "cnt"], ["i-0001", "3"]], ["instance_id", "cnt"])
    step, params = QueryAthena(), QueryAthena.Params(query=QUERY, database="ops", bucket="results")
    with capture_logs() as logs:
        ctx = LocalContext()
        first = step.run(ctx, params)
        assert isinstance(first, Poll)
        query_id = first.state["query_id"]
        # The start is marked before the call, so a cancel can find a query whose id was never saved
        assert ctx.checkpoints == [{"starting": True}, {"query_id": query_id}]
        ctx.state.update(first.state)
        for expected in ("QUEUED", "RUNNING", "RUNNING"):
            outcome = step.run(ctx, params)
            assert isinstance(outcome, Poll)
            assert outcome.state == {"query_id": query_id, "last_state": expected}
            ctx.state.update(outcome.state)
        done = step.run(ctx, params)
    assert isinstance(done, Done)
    assert messages(logs) == [
        f"Request successfully sent to Athena, see full results at {URL.format(query_id)}",
        "Current status for fetching results is: QUEUED",
        "Current status for fetching results is: RUNNING",
        "Current status for fetching results is: SUCCEEDED",
        "Here are the first 50 rows of your query, visit the link above for the full output",
    ]
    assert done.outputs["state"] == "SUCCEEDED"
    assert done.outputs["console_url"] == URL.format(query_id)
    assert ctx.calls.count("athena:StartQueryExecution") == 1
    assert_within_iam(QueryAthena, ctx)


def test_seeded_rows_skip_the_header_and_land_in_s3(aws: str) -> None:
    """moto: seeded results come back as rows, NULL included; moto writes the CSV to the output location."""
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="results")
    seed(aws, [["instance_id", "cnt"], ["i-0001", "3"], ["i-0002", None]], ["instance_id", "cnt"])
    done, ctx = run_step(QueryAthena, {"query": QUERY, "output_location": "s3://results/athena/"})
    query_id = done.outputs["query_id"]
    assert ctx.columns == ["instance_id", "cnt"]
    assert ctx.rows == [["i-0001", "3"], ["i-0002", None]]
    assert ctx.tables == [
        ("Athena query results", ["instance_id", "cnt"], [["i-0001", "3"], ["i-0002", "Null Value"]])
    ]
    assert done.outputs["output_location"] == f"s3://results/athena/{query_id}.csv"
    assert done.outputs["row_count"] == 2
    assert done.outputs["truncated"] is False
    assert s3.head_object(Bucket="results", Key=f"athena/{query_id}.csv")["ContentLength"] > 0
    assert_within_iam(QueryAthena, ctx)


def test_a_first_row_that_is_not_the_header_is_kept(aws: str) -> None:
    """moto: results without a header row (e.g. SHOW/DDL output) keep every row."""
    seed(aws, [["ops"], ["web"]], ["database_name"])
    done, ctx = run_step(QueryAthena, {"query": "SHOW DATABASES", "bucket": "results", "preview_rows": 1})
    assert ctx.rows == [["ops"], ["web"]]
    assert ctx.tables[0][2] == [["ops"]]
    assert done.outputs["row_count"] == 2


def test_a_query_with_no_result_set_finishes_without_a_table(aws: str) -> None:
    """moto: an unseeded query has no columns and no rows."""
    done, ctx = run_step(QueryAthena, {"query": "CREATE DATABASE ops", "bucket": "results"})
    assert done.outputs["row_count"] == 0
    assert ctx.tables == []


# --- Stubber ----------------------------------------------------------------------------------


def test_start_sends_the_idempotency_token_and_context(offline: None) -> None:
    """Stubber: checks the exact StartQueryExecution request (moto ignores ClientRequestToken)."""
    ctx = LocalContext()
    stubber = stubbed(ctx)
    expected = {
        "QueryString": QUERY,
        "QueryExecutionContext": {"Catalog": "AwsDataCatalog", "Database": "ops"},
        "WorkGroup": "analytics",
        "ClientRequestToken": ctx.token,
        "ResultConfiguration": {"OutputLocation": "s3://results/"},
    }
    stubber.add_response("start_query_execution", {"QueryExecutionId": "q-1"}, expected)
    params = {"query": QUERY, "database": "ops", "workgroup": "analytics", "bucket": "results"}
    outcome = QueryAthena().run(ctx, QueryAthena.Params.model_validate(params))
    assert outcome == Poll(state={"query_id": "q-1"}, watch=Watch("athena.query", {"q-1": ""}))
    stubber.assert_no_pending_responses()
    assert_within_iam(QueryAthena, ctx)


def test_redelivered_first_phase_does_not_start_again(offline: None) -> None:
    """Stubber: with query_id already checkpointed, only GetQueryExecution is expected (no start)."""
    ctx = LocalContext()
    ctx.state["query_id"] = "q-1"
    stubber = stubbed(ctx)
    stubber.add_response("get_query_execution", execution("RUNNING"), {"QueryExecutionId": "q-1"})
    outcome = QueryAthena().run(ctx, QueryAthena.Params(query=QUERY))
    assert outcome == Poll(state={"query_id": "q-1", "last_state": "RUNNING"},
                           watch=Watch("athena.query", {"q-1": "RUNNING"}))
    assert ctx.calls == ["athena:GetQueryExecution"]
    stubber.assert_no_pending_responses()


def test_failed_query_raises_with_athenas_reason(offline: None) -> None:
    """Stubber: moto never produces FAILED."""
    ctx = LocalContext()
    ctx.state.update(query_id="q-1", last_state="RUNNING")
    stubber = stubbed(ctx)
    status = {
        "StateChangeReason": "COLUMN_NOT_FOUND: line 1:8: Column 'x' cannot be resolved",
        "AthenaError": {
            "ErrorCategory": 2,
            "ErrorType": 1006,
            "ErrorMessage": "Column 'x' cannot be resolved",
        },
    }
    stubber.add_response("get_query_execution", execution("FAILED", **status))
    with capture_logs() as logs, pytest.raises(RemoteFailed) as caught:
        QueryAthena().run(ctx, QueryAthena.Params(query=QUERY))
    assert "COLUMN_NOT_FOUND: line 1:8: Column 'x' cannot be resolved" in str(caught.value)
    assert "; Column 'x' cannot be resolved" in str(caught.value)
    assert (caught.value.code, caught.value.resource_id) == ("FAILED", "q-1")
    assert messages(logs) == ["Current status for fetching results is: FAILED"]
    assert_within_iam(QueryAthena, ctx)


def test_cancelled_query_is_a_remote_failure(offline: None) -> None:
    """Stubber: a query stopped outside the step ends the step."""
    ctx = LocalContext()
    ctx.state["query_id"] = "q-1"
    stubbed(ctx).add_response("get_query_execution", execution("CANCELLED"))
    with pytest.raises(RemoteFailed, match="ended CANCELLED: Athena gave no reason"):
        QueryAthena().run(ctx, QueryAthena.Params(query=QUERY))


def succeeded_with_pages(ctx: LocalContext, pages: int) -> Stubber:
    """Stub a SUCCEEDED execution and ``pages`` of its results (header + 2 rows, then 3 rows per page)."""
    ctx.state.update(query_id="q-1", last_state="RUNNING")
    stubber = stubbed(ctx)
    stubber.add_response("get_query_execution", execution("SUCCEEDED"))
    bodies = [
        results_page([["1", "x"], ["2", "y"]], "t1", header=True),
        results_page([["3", "x"], ["4", "y"], ["5", "z"]], "t2"),
        results_page([["6", "x"], ["7", "y"], ["8", None]], None),
    ]
    for number, body in enumerate(bodies[:pages]):
        token = {"NextToken": f"t{number}"} if number else {}
        stubber.add_response(
            "get_query_results", body, {"QueryExecutionId": "q-1", "MaxResults": 1000, **token}
        )
    return stubber


def test_three_pages_are_added_one_page_per_call(offline: None) -> None:
    """Stubber: moto ignores MaxResults/NextToken, so paging is only reachable with stubbed pages."""
    ctx = PagingContext()
    stubber = succeeded_with_pages(ctx, pages=3)
    done = QueryAthena().run(ctx, QueryAthena.Params(query=QUERY))
    assert isinstance(done, Done)
    assert ctx.pages == [2, 3, 3]
    assert [row[0] for row in ctx.rows] == ["1", "2", "3", "4", "5", "6", "7", "8"]
    assert ctx.rows[-1] == ["8", None]
    assert done.outputs == {
        "query_id": "q-1",
        "state": "SUCCEEDED",
        "output_location": "s3://results/q-1.csv",
        "data_scanned_bytes": 2048,
        "engine_execution_time_ms": 900,
        "total_execution_time_ms": 1200,
        "row_count": 8,
        "truncated": False,
        "console_url": URL.format("q-1"),
    }
    stubber.assert_no_pending_responses()
    assert_within_iam(QueryAthena, ctx)


def test_max_rows_stops_paging_and_points_at_the_s3_file(offline: None) -> None:
    """Stubber: with max_rows=4 the third page is never requested (only two are stubbed)."""
    ctx = PagingContext()
    stubber = succeeded_with_pages(ctx, pages=2)
    with capture_logs() as logs:
        done = QueryAthena().run(ctx, QueryAthena.Params(query=QUERY, max_rows=4, preview_rows=3))
    assert isinstance(done, Done)
    assert ctx.pages == [2, 2]
    assert [row[0] for row in ctx.rows] == ["1", "2", "3", "4"]
    assert (done.outputs["row_count"], done.outputs["truncated"]) == (4, True)
    assert done.outputs["output_location"] == "s3://results/q-1.csv"
    assert ctx.tables[0][2] == [["1", "x"], ["2", "y"], ["3", "x"]]
    warning = next(entry for entry in logs if entry["event"] == "athena.truncated")
    assert warning["full_output"] == "s3://results/q-1.csv"
    stubber.assert_no_pending_responses()


def test_max_rows_equal_to_the_result_is_not_truncated(offline: None) -> None:
    """Stubber: exactly max_rows rows on the last page means nothing was left out."""
    ctx = PagingContext()
    succeeded_with_pages(ctx, pages=3)
    done = QueryAthena().run(ctx, QueryAthena.Params(query=QUERY, max_rows=8))
    assert isinstance(done, Done)
    assert (done.outputs["row_count"], done.outputs["truncated"]) == (8, False)


def test_the_runners_row_cap_also_stops_paging(offline: None) -> None:
    """Stubber: add_rows returning False (the runner's cap) ends paging and marks the result truncated."""
    ctx = PagingContext(max_rows=3)
    stubber = succeeded_with_pages(ctx, pages=2)
    done = QueryAthena().run(ctx, QueryAthena.Params(query=QUERY))
    assert isinstance(done, Done)
    assert len(ctx.rows) == 3
    assert done.outputs["truncated"] is True
    stubber.assert_no_pending_responses()


def test_cancel_stops_the_checkpointed_query(offline: None) -> None:
    """Stubber: exact StopQueryExecution request."""
    ctx = LocalContext()
    ctx.state["query_id"] = "q-1"
    stubber = stubbed(ctx)
    stubber.add_response("stop_query_execution", {}, {"QueryExecutionId": "q-1"})
    QueryAthena().cancel(ctx, QueryAthena.Params(query=QUERY))
    stubber.assert_no_pending_responses()
    assert_within_iam(QueryAthena, ctx)


def test_cancel_ignores_a_query_that_already_finished(offline: None) -> None:
    """Stubber: Athena's InvalidRequestException for a finished query is not an error."""
    ctx = LocalContext()
    ctx.state["query_id"] = "q-1"
    stubbed(ctx).add_client_error(
        "stop_query_execution", "InvalidRequestException", "Query has already finished"
    )
    QueryAthena().cancel(ctx, QueryAthena.Params(query=QUERY))


def test_cancel_before_start_calls_nothing(offline: None) -> None:
    """Stubber: nothing was started, so nothing is stopped."""
    ctx = LocalContext()
    stubber = stubbed(ctx)
    QueryAthena().cancel(ctx, QueryAthena.Params(query=QUERY))
    assert ctx.calls == []
    stubber.assert_no_pending_responses()


def test_console_url_matches_the_reference_link() -> None:
    assert console_url("eu-west-1", "abc") == (
        "https://eu-west-1.console.aws.amazon.com/athena/home?region=eu-west-1#/query-editor/history/abc"
    )


# --- params -----------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
PLAUSIBLE = st.sampled_from(
    ["SELECT 1", " ", "", "s3://results/athena/", "s3://Bad", "results", "ops", 0, 1, 50]
)
FIELDS = st.sampled_from(sorted(QueryAthena.Params.model_fields)) | st.text(max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(FIELDS, PLAUSIBLE | JSON, max_size=8))
def test_params_fuzz_validate_or_reject_cleanly(payload: dict[str, Any]) -> None:
    """Arbitrary JSON gives a model whose request builds, or a ValidationError, never anything else."""
    try:
        params = QueryAthena.Params.model_validate(payload)
    except ValidationError:
        return
    request = params.start_request("t" * 36)
    assert request["QueryString"].strip()
    location = request.get("ResultConfiguration", {}).get("OutputLocation", "s3://")
    assert location.startswith("s3://")


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"query": QUERY, "output_location": "https://results/"}, "String should match pattern"),
        ({"query": QUERY, "output_location": "results"}, "String should match pattern"),
        ({"query": QUERY, "bucket": "results", "output_location": "s3://results/"}, "not both"),
        ({"query": "   "}, "String should match pattern"),
        ({"query": ""}, "at least 1 character"),
        ({"database": "ops"}, "Field required"),
        ({"query": QUERY, "workgroup": "bad group"}, "String should match pattern"),
        ({"query": QUERY, "max_rows": 0}, "greater than or equal to 1"),
        ({"query": QUERY, "preview_rows": -1}, "greater than or equal to 0"),
        ({"query": QUERY, "bucket": "Bad_Bucket"}, "String should match pattern"),
        ({"query": QUERY, "sql": "x"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_params_are_rejected(payload: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        QueryAthena.Params.model_validate(payload)


def test_database_may_be_left_out() -> None:
    """A fully qualified query needs no database: the context carries only the catalog."""
    request = QueryAthena.Params(query=QUERY).start_request("t" * 36)
    assert request["QueryExecutionContext"] == {"Catalog": "AwsDataCatalog"}
    assert "ResultConfiguration" not in request


# --- what a real account does that moto does not (issue 15) ------------------------------------------------


def failed_retryable(query_id: str, retryable: bool = True) -> dict[str, Any]:
    """GetQueryExecution of a query Athena failed; AthenaError.Retryable: "True if the query might succeed if
    resubmitted" (Athena API reference, AthenaError)."""
    status = {"StateChangeReason": "Query exhausted resources at this scale factor",
              "AthenaError": {"ErrorCategory": 1, "ErrorType": 1000, "Retryable": retryable,
                              "ErrorMessage": "Query exhausted resources at this scale factor"}}
    body = execution("FAILED", **status)
    body["QueryExecution"]["QueryExecutionId"] = query_id
    return body


def test_a_retryable_failure_is_resubmitted_with_a_token_of_its_own(offline: None) -> None:
    """Stubber (moto never fails a query). Finding 2: ClientRequestToken — "If another StartQueryExecution
    request is received, the same response is returned and another query is not created" — so resubmitting
    with the step's token would hand back the failed query; each attempt sends a new token."""
    ctx = LocalContext()
    ctx.state.update(query_id="q-1", last_state="RUNNING")
    stubber = stubbed(ctx)
    stubber.add_response("get_query_execution", failed_retryable("q-1"), {"QueryExecutionId": "q-1"})
    stubber.add_response("start_query_execution", {"QueryExecutionId": "q-2"},
                         {"QueryString": QUERY, "QueryExecutionContext": {"Catalog": "AwsDataCatalog"},
                          "WorkGroup": "primary", "ClientRequestToken": f"{ctx.token}-resubmit-1"})
    params = QueryAthena.Params(query=QUERY, resubmits=1)
    with capture_logs() as logs:
        outcome = QueryAthena().run(ctx, params)
    assert outcome == Poll(state={"query_id": "q-2"}, watch=Watch("athena.query", {"q-2": ""}))
    assert any(entry["event"] == "athena.resubmitting" for entry in logs)
    ctx.state.update(outcome.state)
    stubber.add_response("get_query_execution", failed_retryable("q-2"), {"QueryExecutionId": "q-2"})
    with pytest.raises(RemoteFailed, match="ended FAILED: Query exhausted resources"):
        QueryAthena().run(ctx, params)  # the budget (one resubmit) is spent
    stubber.assert_no_pending_responses()


def test_a_failure_athena_does_not_mark_retryable_is_not_resubmitted(offline: None) -> None:
    ctx = LocalContext()
    ctx.state.update(query_id="q-1")
    stubbed(ctx).add_response("get_query_execution", failed_retryable("q-1", retryable=False))
    with pytest.raises(RemoteFailed):
        QueryAthena().run(ctx, QueryAthena.Params(query=QUERY))


def utility_results(statement: str, columns: list[str], cells: list[list[str]]) -> tuple[dict[str, Any], ...]:
    """A SUCCEEDED execution of ``statement`` type and its one page of rows, as Athena returns them."""
    done = execution("SUCCEEDED")
    done["QueryExecution"]["StatementType"] = statement
    page = {"ResultSet": {
        "Rows": [{"Data": [{"VarCharValue": v} for v in row]} for row in cells],
        "ResultSetMetadata": {"ColumnInfo": [{"Name": name, "Type": "string"} for name in columns]},
    }}
    return done, page


def test_describe_rows_are_split_into_their_columns(offline: None) -> None:
    """Stubber (moto's results are what the test seeds). Finding 12: StatementType "UTILITY indicates query
    statements other than DDL and DML, such as SHOW CREATE TABLE, EXPLAIN, DESCRIBE, or SHOW TABLES" (Athena
    API reference); their rows come back as one tab-joined cell while ColumnInfo names three columns."""
    ctx = LocalContext()
    ctx.state.update(query_id="q-1")
    stubber = stubbed(ctx)
    done, page = utility_results("UTILITY", ["col_name", "data_type", "comment"],
                                 [["instance_id         \tstring              \t                    "],
                                  ["cnt                 \tbigint              \tper hour            "]])
    stubber.add_response("get_query_execution", done)
    stubber.add_response("get_query_results", page)
    QueryAthena().run(ctx, QueryAthena.Params(query="DESCRIBE ops.counts"))
    assert ctx.columns == ["col_name", "data_type", "comment"]
    assert ctx.rows == [["instance_id", "string", ""], ["cnt", "bigint", "per hour"]]


def test_a_utility_first_row_equal_to_the_column_names_is_kept(offline: None) -> None:
    """Finding 12: only DML results start with a header row; SHOW TABLES of a table named like its column
    must keep it."""
    ctx = LocalContext()
    ctx.state.update(query_id="q-1")
    stubber = stubbed(ctx)
    done, page = utility_results("UTILITY", ["tab_name"], [["tab_name"], ["counts"]])
    stubber.add_response("get_query_execution", done)
    stubber.add_response("get_query_results", page)
    QueryAthena().run(ctx, QueryAthena.Params(query="SHOW TABLES IN ops"))
    assert ctx.rows == [["tab_name"], ["counts"]]
