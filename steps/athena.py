"""Amazon Athena: run a SQL query, follow its state, and page its rows into the step result."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Self

from botocore.exceptions import ClientError
from pydantic import Field, StringConstraints, model_validator

from steps import outputs, permissions
from steps.base import AwsParams, Done, Outcome, Poll, S3Uri, Step, StepContext, Watch
from steps.errors import RemoteFailed
from steps.permissions import Grant

if TYPE_CHECKING:
    from types_boto3_athena.type_defs import (
        PaginatorConfigTypeDef,
        QueryExecutionStatusTypeDef,
        QueryExecutionTypeDef,
        RowTypeDef,
    )

RUNNING = frozenset({"QUEUED", "RUNNING"})
FAILED = frozenset({"FAILED", "CANCELLED"})
SUCCEEDED = frozenset({"SUCCEEDED"})

PAGE_SIZE = 1000  # GetQueryResults' largest page
WATCH = "athena.query"  # the watch kind of a query's state (worker/quotas/coalesce.py reads them in batches)
NULL_TEXT = "Null Value"  # how the reference product shows SQL NULL in its log table
CONSOLE_URL = (
    "https://{region}.console.aws.amazon.com/athena/home?region={region}#/query-editor/history/{query_id}"
)

BucketName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")]
Sql = Annotated[str, StringConstraints(min_length=1, max_length=262_144, pattern=r"\S")]
Row = list[str | None]


def _token(ctx: StepContext) -> str:
    """The ClientRequestToken of the current attempt: the step's own, then one per resubmit."""
    attempt = int(ctx.state.get("attempt", 0))
    return ctx.token if attempt == 0 else f"{ctx.token}-resubmit-{attempt}"


def console_url(region: str, query_id: str) -> str:
    """The Athena console page of one query execution (the link the reference product prints)."""
    return CONSOLE_URL.format(region=region, query_id=query_id)


def state_reason(status: QueryExecutionStatusTypeDef) -> str:
    """Athena's reason for a state: StateChangeReason, plus AthenaError's message when it adds something."""
    parts = (status.get("StateChangeReason", ""), status.get("AthenaError", {}).get("ErrorMessage", ""))
    return "; ".join(dict.fromkeys(part for part in parts if part))


def _values(row: RowTypeDef, width: int, utility: bool) -> Row:
    values = [datum.get("VarCharValue") for datum in row.get("Data", [])]
    # Utility statements (DESCRIBE, SHOW, EXPLAIN) come back as one tab-joined cell per row, while
    # ColumnInfo lists every column: split the cell so rows line up with the columns.
    if utility and width > 1 and len(values) == 1 and values[0] is not None and "\t" in values[0]:
        cells: Row = [part.strip() for part in values[0].split("\t")]
        return cells[:width]
    return values


@dataclass
class _ResultPages:
    """Feeds the result one GetQueryResults page at a time, keeping only a small preview in memory.

    Each page is stored with the token of the page after it, so a phase that dies or is retried
    midway resumes from the next page instead of paging (and storing) from the start.
    """

    ctx: StepContext
    max_rows: int | None
    preview_size: int
    count: int = 0
    truncated: bool = False
    previewed: bool = False
    columns: list[str] = field(default_factory=list)
    preview: list[Row] = field(default_factory=list)

    def feed(self, rows: list[Row], next_token: str | None) -> bool:
        """Add one page of rows; False once the result is full (``truncated`` says whether rows were left)."""
        room = rows if self.max_rows is None else rows[: self.max_rows - self.count]
        self.preview.extend(room[: self.preview_size - len(self.preview)])
        self.count += len(room)
        cursor = {"page_token": next_token, "rows_seen": self.count, "previewed": self.previewed,
                  "columns": self.columns}
        accepted = self.ctx.add_rows(room, cursor=cursor)
        capped = self.max_rows is not None and self.count >= self.max_rows
        # The runner's cap may drop rows inside this page, so its refusal always means truncated.
        self.truncated = not accepted or (capped and (bool(next_token) or len(room) < len(rows)))
        return accepted and not capped


class QueryAthena(Step):
    """Run an Athena SQL query, poll until it finishes, and page its rows into the result."""

    type = "athena.query"
    Outputs = outputs.AthenaResult
    title = "AWS / Athena / Query"
    iam_actions = (
        "athena:StartQueryExecution",
        "athena:GetQueryExecution",
        "athena:GetQueryResults",
        "athena:StopQueryExecution",
        "athena:BatchGetQueryExecution",  # (the worker answers polls in batches: worker/quotas/coalesce.py)
    )
    # Athena reads the catalog and writes the results as the caller (GetQueryResults: "must have
    # permissions to the Amazon S3 GetObject action for the Athena query results location").
    iam_grants = (
        Grant(("s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"),
              ("arn:aws:s3:::{output_bucket}",), why="Athena lists and locates the results bucket"),
        Grant(("s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"),
              ("arn:aws:s3:::{output_bucket}/{output_prefix}*",), why="Athena writes and reads the results"),
        Grant(("glue:GetDatabase", "glue:GetDatabases", "glue:GetTable", "glue:GetTables", "glue:GetPartition",
               "glue:GetPartitions", "glue:BatchGetPartition"),
              ("arn:aws:glue:*:*:catalog", "arn:aws:glue:*:*:database/{database}",
               "arn:aws:glue:*:*:table/{database}/*"), why="Athena reads the Glue Data Catalog"),
        Grant(("kms:Decrypt", "kms:GenerateDataKey"), (permissions.KMS_KEY,),
              {"StringLike": {"kms:ViaService": ("s3.*.amazonaws.com",)}},
              why="results encrypted with SSE-KMS, or tables over SSE-KMS data"),
    )

    class Params(AwsParams):
        """What to run and where Athena writes the full output."""

        query: Sql = Field(description="The SQL query to make to the Athena database")
        database: str | None = Field(
            None,
            min_length=1,
            max_length=255,
            description="The Athena database to query; leave blank when the query names its tables in full",
        )
        catalog: str = Field("AwsDataCatalog", min_length=1, max_length=256, description="Data catalog")
        workgroup: str = Field("primary", pattern=r"^[a-zA-Z0-9._-]{1,128}$", description="Athena workgroup")
        output_location: S3Uri | None = Field(
            None, description="s3:// URI Athena writes the results to; blank uses the workgroup's setting"
        )
        bucket: BucketName | None = Field(
            None, description="Shorthand for output_location s3://<bucket>/ (the reference product's field)"
        )
        max_rows: int | None = Field(
            None, ge=1, description="Most rows to keep in the result; blank keeps up to the runner's cap"
        )
        preview_rows: int = Field(50, ge=0, le=1000, description="Rows shown in the step log")
        resubmits: int = Field(
            2, ge=0, le=5, description="Times to resubmit a query whose failure Athena marks Retryable"
        )

        @model_validator(mode="after")
        def _one_location(self) -> Self:
            if self.bucket is not None and self.output_location is not None:
                raise ValueError("give output_location or bucket, not both")
            return self

        @property
        def location(self) -> str | None:
            """Where Athena writes the results: output_location, or the bucket's root (None: the workgroup's)."""
            return self.output_location or (f"s3://{self.bucket}/" if self.bucket else None)

        @property
        def output_bucket(self) -> str | None:
            """The results bucket, when the params name it."""
            return self.location[5:].split("/", 1)[0] if self.location else None

        @property
        def output_prefix(self) -> str:
            """The key prefix of the results under the bucket ('' for the root)."""
            return self.location[5:].partition("/")[2] if self.location else ""

        def start_request(self, token: str) -> dict[str, Any]:
            """StartQueryExecution's arguments; Athena starts one query per ``token``."""
            context = {"Catalog": self.catalog} | ({"Database": self.database} if self.database else {})
            location = self.location
            request: dict[str, Any] = {
                "QueryString": self.query,
                "QueryExecutionContext": context,
                "WorkGroup": self.workgroup,
                "ClientRequestToken": token,
            }
            if location:
                request["ResultConfiguration"] = {"OutputLocation": location}
            return request

    def run(self, ctx: StepContext, params: Params) -> Outcome:
        """Start the query once; each later phase checks its state and pages the rows once it succeeded."""
        query_id = ctx.state.get("query_id")
        if query_id is None:
            return self._start(ctx, params)
        execution = ctx.client("athena").get_query_execution(QueryExecutionId=query_id)["QueryExecution"]
        status = execution["Status"]
        state = status["State"]
        if state != ctx.state.get("last_state"):
            text = f"Current status for fetching results is: {state}"
            ctx.log.info("athena.status", query_id=query_id, state=state, message=text)
        if state in FAILED and self._may_resubmit(ctx, params, status):
            return self._resubmit(ctx, params, query_id, status)
        if state in FAILED:
            raise self._failure(query_id, state, status)
        if state in SUCCEEDED:
            return Done(self._fetch(ctx, params, execution))
        return Poll(state={"query_id": query_id, "last_state": state}, watch=Watch(WATCH, {query_id: state}))

    def cancel(self, ctx: StepContext, params: Params) -> None:
        """Stop the query an earlier phase started; a query that already finished is left as it is.

        A delivery that died between StartQueryExecution and saving the id left only its ``starting``
        mark: the same ClientRequestToken makes Athena hand back that query's id (starting nothing new
        if it had started), and the query is stopped.
        """
        query_id = ctx.state.get("query_id")
        if query_id is None and ctx.state.get("starting"):
            request = params.start_request(_token(ctx))
            query_id = ctx.client("athena").start_query_execution(**request)["QueryExecutionId"]
        if query_id is None:
            return
        try:
            ctx.client("athena").stop_query_execution(QueryExecutionId=query_id)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") != "InvalidRequestException":
                raise
            ctx.log.info("athena.stop_skipped", query_id=query_id, reason=str(err))
            return
        ctx.log.info("athena.stopped", query_id=query_id)

    @staticmethod
    def _may_resubmit(ctx: StepContext, params: Params, status: QueryExecutionStatusTypeDef) -> bool:
        """AthenaError.Retryable: "True if the query might succeed if resubmitted" (within the budget)."""
        retryable = bool(status.get("AthenaError", {}).get("Retryable"))
        return retryable and status["State"] == "FAILED" and int(ctx.state.get("attempt", 0)) < params.resubmits

    def _resubmit(
        self, ctx: StepContext, params: Params, query_id: str, status: QueryExecutionStatusTypeDef
    ) -> Poll:
        # A resubmit with the same ClientRequestToken would return the same failed query ("the same
        # response is returned and another query is not created"): each attempt has a token of its own.
        attempt = int(ctx.state.get("attempt", 0)) + 1
        ctx.log.warning("athena.resubmitting", query_id=query_id, attempt=attempt, of=params.resubmits,
                        reason=state_reason(status))
        ctx.checkpoint(attempt=attempt, query_id=None, starting=False, last_state=None)
        return self._start(ctx, params)

    def _start(self, ctx: StepContext, params: Params) -> Poll:
        ctx.checkpoint(starting=True)
        response = ctx.client("athena").start_query_execution(**params.start_request(_token(ctx)))
        query_id = response["QueryExecutionId"]
        ctx.checkpoint(query_id=query_id)
        url = console_url(ctx.region, query_id)
        text = f"Request successfully sent to Athena, see full results at {url}"
        ctx.log.info("athena.started", query_id=query_id, console_url=url, message=text)
        return Poll(state={"query_id": query_id}, watch=Watch(WATCH, {query_id: ""}))

    @staticmethod
    def _failure(query_id: str, state: str, status: QueryExecutionStatusTypeDef) -> RemoteFailed:
        reason = state_reason(status) or "Athena gave no reason"
        hint = "fix the query, its tables or the permissions" if state == "FAILED" else "run the step again"
        message = (
            f"Athena query {query_id} ended {state}: {reason}. Check it in the Athena console, then {hint}."
        )
        return RemoteFailed(message, code=state, resource_id=query_id)

    def _fetch(self, ctx: StepContext, params: Params, execution: QueryExecutionTypeDef) -> Mapping[str, Any]:
        query_id = execution["QueryExecutionId"]
        pages = _ResultPages(ctx, params.max_rows, params.preview_rows, count=int(ctx.state.get("rows_seen", 0)),
                             previewed=bool(ctx.state.get("previewed")), columns=list(ctx.state.get("columns", [])))
        self._page_rows(ctx, params, execution, pages)
        output_location = execution.get("ResultConfiguration", {}).get("OutputLocation", "")
        if not pages.previewed:
            self._log_preview(ctx, params, pages)
        if pages.truncated:
            ctx.log.warning(
                "athena.truncated", query_id=query_id, row_count=pages.count, full_output=output_location
            )
        statistics = execution.get("Statistics", {})
        return {
            "query_id": query_id,
            "state": execution["Status"]["State"],
            "output_location": output_location,
            "data_scanned_bytes": statistics.get("DataScannedInBytes", 0),
            "engine_execution_time_ms": statistics.get("EngineExecutionTimeInMillis", 0),
            "total_execution_time_ms": statistics.get("TotalExecutionTimeInMillis", 0),
            "row_count": pages.count,
            "truncated": pages.truncated,
            "console_url": console_url(ctx.region, query_id),
        }

    def _page_rows(
        self, ctx: StepContext, params: Params, execution: QueryExecutionTypeDef, pages: _ResultPages
    ) -> None:
        """Page every row into ``pages`` (a DML header row skipped), from the saved page token if any."""
        query_id = execution["QueryExecutionId"]
        # Only DML results start with a header row; a utility or DDL statement's first row is data.
        statement = execution.get("StatementType", "DML")
        paginator = ctx.client("athena").get_paginator("get_query_results")
        config: PaginatorConfigTypeDef = {"PageSize": PAGE_SIZE}
        resumed = ctx.state.get("page_token")
        if resumed:
            config["StartingToken"] = resumed
        for number, page in enumerate(paginator.paginate(QueryExecutionId=query_id, PaginationConfig=config)):
            result_set = page["ResultSet"]
            if number == 0 and not resumed:
                columns = [c["Name"] for c in result_set.get("ResultSetMetadata", {}).get("ColumnInfo", [])]
                ctx.set_columns(columns)
                pages.columns = columns
            width, utility = len(pages.columns), statement == "UTILITY"
            rows = [_values(row, width, utility) for row in result_set.get("Rows", [])]
            if number == 0 and not resumed and statement == "DML" and rows and rows[0] == pages.columns:
                rows = rows[1:]
            more = pages.feed(rows, page.get("NextToken"))
            if not pages.previewed and (len(pages.preview) >= params.preview_rows or not more):
                self._log_preview(ctx, params, pages)
            if not more:
                break

    @staticmethod
    def _log_preview(ctx: StepContext, params: Params, pages: _ResultPages) -> None:
        pages.previewed = True
        columns = pages.columns
        if params.preview_rows == 0 or not columns:
            return
        size = params.preview_rows
        text = f"Here are the first {size} rows of your query, visit the link above for the full output"
        ctx.log.info("athena.preview", rows=len(pages.preview), message=text)
        table = [[NULL_TEXT if value is None else value for value in row] for row in pages.preview]
        ctx.log_table("Athena query results", columns, table)
