"""Identity: which AWS principal a worker acts as."""

from __future__ import annotations

from steps.base import AwsParams, Done, Outcome, Step, StepContext


class WhoAmI(Step):
    """Validate credentials: report the account, principal ARN and credential source."""

    type = "sts.whoami"
    title = "AWS / Validate Credentials"
    iam_actions = ("sts:GetCallerIdentity",)

    class Params(AwsParams):
        pass

    def run(self, ctx: StepContext, params: Params) -> Outcome:
        """Call GetCallerIdentity with the resolved credentials."""
        identity = ctx.client("sts").get_caller_identity()
        outputs = {
            "account": identity["Account"],
            "arn": identity["Arn"],
            "user_id": identity["UserId"],
            "region": ctx.region,
            "credential_source": ctx.credential_source,
        }
        ctx.log_table("Caller identity", ["field", "value"], sorted(outputs.items()))
        return Done(outputs)
