"""CloudWatch Logs: Logs Insights queries (ad hoc and saved) and log streams."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from botocore.exceptions import ClientError
from pydantic import AfterValidator, BeforeValidator, Field, StringConstraints, model_validator

from steps import outputs
from steps.base import AwsParams, Done, Outcome, Poll, Step, StepContext
from steps.errors import Permanent, RemoteFailed

if TYPE_CHECKING:
    from types_boto3_logs import CloudWatchLogsClient
    from types_boto3_logs.type_defs import (
        GetQueryResultsResponseTypeDef,
        QueryDefinitionTypeDef,
        ResultFieldTypeDef,
    )

RUNNING = frozenset({"Scheduled", "Running"})
COMPLETE = frozenset({"Complete"})
FAILED = frozenset({"Failed", "Cancelled", "Timeout", "Unknown"})
FAILURE_HINTS = {
    "Failed": "check the query syntax and that the log groups exist",
    "Cancelled": "it was stopped; run the step again",
    "Timeout": "it ran past the Logs Insights time limit; narrow the time range or the log groups",
    "Unknown": "Logs Insights no longer knows the query; run the step again",
}

UNITS = {unit: timedelta(**{unit: 1}) for unit in ("minutes", "hours", "days", "weeks")}
MAX_SPAN = timedelta(days=7305)  # 20 years: older than any CloudWatch Logs data
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ROWS_PER_PAGE = 1000  # rows per ctx.add_rows call
PREVIEW_ROWS = 50  # rows shown in the step log, as the reference product shows for Athena
INSIGHTS_ACTIONS = ("logs:StartQuery", "logs:GetQueryResults", "logs:StopQuery")
MAX_GROUPS = 50  # StartQuery: "You can include up to 50 log groups."
# StartQuery needs log groups "The exception is queries using the OpenSearch Service SQL query language,
# where you specify the log group names inside the querystring"; Logs Insights QL names them with SOURCE.
GROUPS_IN_QUERY = frozenset({"SQL", "PPL"})
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
ParameterName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]

LogGroupName = Annotated[str, StringConstraints(pattern=r"^[.\-_/#A-Za-z0-9]{1,512}$")]
LogStreamName = Annotated[str, StringConstraints(pattern=r"^[^:*]{1,512}$")]
InsightsQuery = Annotated[str, StringConstraints(min_length=1, max_length=10_000, pattern=r"\S")]
Row = list[str | None]


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def _assume_utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


TimeUnit = Annotated[Literal["minutes", "hours", "days", "weeks"], BeforeValidator(_lower)]
Instant = Annotated[datetime, AfterValidator(_assume_utc)]


def _error_code(err: ClientError) -> str:
    return err.response.get("Error", {}).get("Code", "")


class TimeRangeParams(AwsParams):
    """A Logs Insights time range: relative (``past`` + ``unit``) or absolute (``start``, ``end``)."""

    past: int | None = Field(None, ge=1, description="Past Time Range: query the last <past> units, e.g. 5")
    unit: TimeUnit = Field("minutes", description="Unit of Time for past: minutes, hours, days or weeks")
    start: Instant | None = Field(
        None, description="Start of an absolute range (ISO 8601; no offset means UTC)"
    )
    end: Instant | None = Field(None, description="End of an absolute range (ISO 8601; no offset means UTC)")
    limit: int | None = Field(None, ge=1, le=10_000, description="Most log events the query returns")

    @model_validator(mode="after")
    def _one_range(self) -> Self:
        absolute = self.start is not None or self.end is not None
        if self.past is not None and absolute:
            raise ValueError("give either past (with unit) or start and end, not both")
        if self.past is None and not absolute:
            raise ValueError("give a time range: past (with unit), or start and end")
        if self.past is None:
            return self._check_absolute()
        if self.past > MAX_SPAN // UNITS[self.unit]:
            raise ValueError(f"past reaches back more than {MAX_SPAN.days} days")
        return self

    def _check_absolute(self) -> Self:
        if "unit" in self.model_fields_set:
            raise ValueError("unit goes with past, not with start and end")
        if self.start is None or self.end is None:
            raise ValueError("an absolute range needs both start and end")
        if not EPOCH <= self.start < self.end:
            raise ValueError("start must come before end (and after 1970-01-01)")
        return self

    def window(self, now: datetime) -> tuple[int, int]:
        """(startTime, endTime) in epoch seconds; a relative range ends at ``now``."""
        if self.start is not None and self.end is not None:
            return math.floor(self.start.timestamp()), math.ceil(self.end.timestamp())
        span = (self.past or 0) * UNITS[self.unit]
        return math.floor((now - span).timestamp()), math.ceil(now.timestamp())

    def start_request(self, query: str, groups: Sequence[str], now: datetime) -> dict[str, Any]:
        """StartQuery's arguments for ``query`` over ``groups``."""
        start, end = self.window(now)
        request: dict[str, Any] = {"queryString": query} | ({"logGroupNames": list(groups)} if groups else {})
        request |= {"startTime": start, "endTime": end}
        return request | ({"limit": self.limit} if self.limit is not None else {})


@dataclass
class _Results:
    """Logs Insights rows as lists aligned to the union of their field names, fed to the result in pages."""

    ctx: StepContext
    columns: list[str] = field(default_factory=list)
    preview: list[Row] = field(default_factory=list)
    count: int = 0
    truncated: bool = False

    def feed(self, results: Sequence[Sequence[ResultFieldTypeDef]]) -> bool:
        """Add one GetQueryResults page; False once the runner's row cap is reached."""
        records = [
            {f.get("field", ""): f.get("value") for f in row if f.get("field") != "@ptr"} for row in results
        ]
        known = len(self.columns)
        for record in records:
            self.columns.extend(name for name in record if name not in self.columns)
        if len(self.columns) > known:
            self.ctx.set_columns(self.columns)  # columns only grow: earlier rows stay aligned as prefixes
        rows: list[Row] = [[record.get(name) for name in self.columns] for record in records]
        for first in range(0, len(rows), ROWS_PER_PAGE):
            page = rows[first : first + ROWS_PER_PAGE]
            self.preview.extend(page[: PREVIEW_ROWS - len(self.preview)])
            self.count += len(page)
            if not self.ctx.add_rows(page):
                self.truncated = True
                return False
        return True


class _InsightsQuery(Step):
    """What both Logs Insights steps share: start once, check once a phase, page the rows, stop on cancel."""

    Outputs = outputs.LogsResult

    def run(self, ctx: StepContext, params: Any) -> Outcome:
        """Start the query once (its id is checkpointed); each later phase checks it once."""
        query_id = ctx.state.get("query_id")
        if query_id is None:
            return self._start(ctx, self.start_request(ctx, params))
        client = ctx.client("logs")
        response = client.get_query_results(queryId=query_id)
        status = response["status"]
        if status != ctx.state.get("last_status"):
            ctx.log.info("logs.status", query_id=query_id, status=status)
        if status in FAILED:
            raise RemoteFailed(
                f"Logs Insights query {query_id} ended {status}: {FAILURE_HINTS[status]}.",
                code=status,
                resource_id=query_id,
            )
        if status in COMPLETE:
            return Done(self._collect(ctx, client, query_id, response))
        return Poll(state={"query_id": query_id, "last_status": status})

    def cancel(self, ctx: StepContext, params: Any) -> None:
        """Stop the query an earlier phase started."""
        query_id = ctx.state.get("query_id")
        if query_id is None:
            return
        try:
            stopped = ctx.client("logs").stop_query(queryId=query_id)["success"]
        except ClientError as err:
            # A query that finished meanwhile cannot be stopped, and needs no stopping.
            if _error_code(err) not in {"InvalidParameterException", "ResourceNotFoundException"}:
                raise
            ctx.log.info("logs.stop_skipped", query_id=query_id, reason=str(err))
            return
        ctx.log.info("logs.stopped", query_id=query_id, success=stopped)

    def start_request(self, ctx: StepContext, params: Any) -> dict[str, Any]:
        """StartQuery's arguments for this step's params."""
        raise NotImplementedError

    @staticmethod
    def _start(ctx: StepContext, request: Mapping[str, Any]) -> Poll:
        # StartQuery takes no client token: checkpoint the id before anything else can fail.
        query_id = ctx.client("logs").start_query(**request)["queryId"]
        ctx.checkpoint(query_id=query_id)
        ctx.log.info("logs.query_started", query_id=query_id, log_groups=len(request.get("logGroupNames", ())))
        return Poll(state={"query_id": query_id})

    @staticmethod
    def _collect(
        ctx: StepContext,
        client: CloudWatchLogsClient,
        query_id: str,
        response: GetQueryResultsResponseTypeDef,
    ) -> dict[str, Any]:
        results = _Results(ctx)
        statistics = response.get("statistics", {})
        page = response
        while results.feed(page["results"]) and page.get("nextToken"):
            page = client.get_query_results(queryId=query_id, nextToken=page["nextToken"])
        ctx.log.info("logs.results", query_id=query_id, rows=results.count, truncated=results.truncated)
        if results.columns:
            ctx.log_table("CloudWatch Logs query results", results.columns, results.preview)
        return {
            "query_id": query_id,
            "status": response["status"],
            "records_matched": int(statistics.get("recordsMatched", 0)),
            "records_scanned": int(statistics.get("recordsScanned", 0)),
            "bytes_scanned": int(statistics.get("bytesScanned", 0)),
            "row_count": results.count,
            "truncated": results.truncated,
        }


class QueryLogs(_InsightsQuery):
    """Query CloudWatch log groups with Logs Insights and page the matching rows into the result."""

    type = "logs.query"
    title = "AWS / CloudWatch / Logs"
    iam_actions = INSIGHTS_ACTIONS

    class Params(TimeRangeParams):
        """The query, the log groups it reads and its time range."""

        query: InsightsQuery = Field(description="Query for CloudWatch logs using Logs Insights query syntax")
        log_group_names: tuple[LogGroupName, ...] | None = Field(
            None, min_length=1, max_length=50, description="Log groups to query (1 to 50)"
        )
        log_group_name: LogGroupName | None = Field(None, description="Shorthand for a single log group")

        @model_validator(mode="after")
        def _one_group_form(self) -> Self:
            if (self.log_group_names is None) == (self.log_group_name is None):
                raise ValueError("give log_group_names or log_group_name (exactly one)")
            return self

        @property
        def groups(self) -> tuple[str, ...]:
            """The log groups to query, whichever field named them."""
            return self.log_group_names or (self.log_group_name or "",)

    def start_request(self, ctx: StepContext, params: Params) -> dict[str, Any]:
        """StartQuery's arguments: the query over the given groups and time range."""
        return params.start_request(params.query, params.groups, datetime.now(UTC))


class RunSavedQuery(_InsightsQuery):
    """Run a saved Logs Insights query (by folder and name) and page its rows into the result."""

    type = "logs.saved_query"
    title = "AWS / CloudWatch / Execute Saved Query"
    iam_actions = (*INSIGHTS_ACTIONS, "logs:DescribeQueryDefinitions")

    class Params(TimeRangeParams):
        """Which saved query to run, optionally over other log groups, and its time range."""

        query_name: str = Field(min_length=1, max_length=255, pattern=r"\S", description="Saved query's name")
        query_path: str | None = Field(
            None, pattern=r"^[^/]+(/[^/]+)*$", description="Folder the query lives in, e.g. infra/nginx"
        )
        log_group_names: tuple[LogGroupName, ...] | None = Field(
            None,
            min_length=1,
            max_length=MAX_GROUPS,
            description="Log groups to query instead of the saved ones (1 to 50)",
        )
        parameters: dict[ParameterName, Annotated[str, StringConstraints(max_length=4096)]] = Field(
            default_factory=dict, max_length=50,
            description="Values for the saved query's {{name}} placeholders (its defaults fill the rest)",
        )

        @model_validator(mode="after")
        def _name_fits(self) -> Self:
            if len(self.full_name) > 255:
                raise ValueError("query_path/query_name is longer than CloudWatch's 255 characters")
            return self

        @property
        def full_name(self) -> str:
            """The definition's name as CloudWatch stores it: folders are a ``path/`` name prefix."""
            return f"{self.query_path}/{self.query_name}" if self.query_path else self.query_name

    def start_request(self, ctx: StepContext, params: Params) -> dict[str, Any]:
        """StartQuery's arguments taken from the saved definition (log groups overridable)."""
        definition = find_definition(ctx.client("logs"), params.full_name)
        groups = params.log_group_names or tuple(definition.get("logGroupNames", ()))
        query = _substituted(definition, params.parameters, params.full_name)
        in_query = definition.get("queryLanguage") in GROUPS_IN_QUERY or query.lstrip().upper().startswith("SOURCE")
        if not groups and not in_query:
            raise Permanent(
                f"saved query {params.full_name!r} names no log groups; give log_group_names",
                code="NoLogGroups",
                resource_id=params.full_name,
            )
        request = params.start_request(query, groups, datetime.now(UTC))
        if "queryLanguage" in definition:
            request["queryLanguage"] = definition["queryLanguage"]
        return request


def _substituted(definition: QueryDefinitionTypeDef, values: Mapping[str, str], name: str) -> str:
    """The saved query string with its ``{{name}}`` placeholders filled from ``values``, then the defaults."""
    query = definition.get("queryString", "")
    defaults = {p["name"]: p["defaultValue"] for p in definition.get("parameters", []) if "defaultValue" in p}
    known = {p["name"] for p in definition.get("parameters", [])} | set(PLACEHOLDER.findall(query))
    unknown = sorted(set(values) - known)
    filled = {**defaults, **values}
    missing = sorted(set(PLACEHOLDER.findall(query)) - filled.keys())
    if unknown or missing:
        raise Permanent(
            f"saved query {name!r}: " + "; ".join(
                part for part in (f"no placeholder named {', '.join(unknown)}" if unknown else "",
                                  f"give parameters for {', '.join(missing)}" if missing else "") if part),
            code="QueryParameters",
            resource_id=name,
        )
    return PLACEHOLDER.sub(lambda match: filled[match.group(1)], query)


def find_definition(client: CloudWatchLogsClient, name: str) -> QueryDefinitionTypeDef:
    """The saved query named exactly ``name``; a Permanent error naming the closest ones if there is none."""
    for definition in _definitions(client, name):
        if definition.get("name") == name:
            return definition
    names = [definition.get("name", "") for definition in _definitions(client, None)]
    closest = ", ".join(difflib.get_close_matches(name, names, n=5, cutoff=0.5)) or "none"
    raise Permanent(
        f"no saved Logs Insights query is named {name!r} (closest: {closest}); fix query_path or query_name",
        code="QueryDefinitionNotFound",
        resource_id=name,
    )


def _definitions(client: CloudWatchLogsClient, prefix: str | None) -> Iterator[QueryDefinitionTypeDef]:
    request: dict[str, Any] = {"maxResults": 1000} | ({"queryDefinitionNamePrefix": prefix} if prefix else {})
    while True:
        page = client.describe_query_definitions(**request)
        yield from page.get("queryDefinitions", [])
        if not page.get("nextToken"):
            return
        request["nextToken"] = page["nextToken"]


class CreateLogStream(Step):
    """Create a log stream in a log group, optionally creating the group first."""

    type = "logs.create_stream"
    title = "AWS / Cloud / Audit / Trail / Logs"
    iam_actions = ("logs:CreateLogGroup", "logs:CreateLogStream")

    class Params(AwsParams):
        """The group and stream to create."""

        log_group_name: LogGroupName = Field(description="Log Group Name")
        log_stream_name: LogStreamName = Field(description="Log Stream Name")
        create_group: bool = Field(
            False, description="Create the log group first (an existing group is fine)"
        )
        fail_if_exists: bool = Field(
            False, description="Fail when the stream exists (default: warn, succeed)"
        )

    def run(self, ctx: StepContext, params: Params) -> Outcome:
        """Create the stream (and the group when asked); a redelivered phase reports the earlier creation."""
        created = bool(ctx.state.get("created")) or self._create(ctx, params)
        names = {"log_group_name": params.log_group_name, "log_stream_name": params.log_stream_name}
        return Done({**names, "created": created})

    @staticmethod
    def _create(ctx: StepContext, params: Params) -> bool:
        client = ctx.client("logs")
        group, stream = params.log_group_name, params.log_stream_name
        try:
            if params.create_group:
                _create_group(client, group)
            client.create_log_stream(logGroupName=group, logStreamName=stream)
        except ClientError as err:
            return _existing_stream(ctx, params, err)
        ctx.checkpoint(created=True)
        ctx.log.info("logs.stream_created", log_group=group, log_stream=stream)
        return True


def _create_group(client: CloudWatchLogsClient, group: str) -> None:
    try:
        client.create_log_group(logGroupName=group)
    except ClientError as err:
        if _error_code(err) != "ResourceAlreadyExistsException":
            raise


def _existing_stream(ctx: StepContext, params: CreateLogStream.Params, err: ClientError) -> bool:
    """Turn CreateLogStream's expected errors into an answer: False for an accepted existing stream."""
    group, stream = params.log_group_name, params.log_stream_name
    code = _error_code(err)
    if code == "ResourceNotFoundException":
        message = f"log group {group!r} does not exist; create it first or set create_group: true"
        raise Permanent(message, code=code, resource_id=group) from err
    if code != "ResourceAlreadyExistsException":
        raise err
    if params.fail_if_exists:
        message = f"log stream {stream!r} already exists in {group!r}; unset fail_if_exists to accept it"
        raise Permanent(message, code=code, resource_id=stream) from err
    ctx.log.warning("logs.stream_exists", log_group=group, log_stream=stream)
    return False
