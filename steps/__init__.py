"""The step catalog: one module per AWS product, each step a small registered class.

Importing this package registers every step type.
"""

from steps import athena, autoscaling, core, ec2, ec2_images, ecs, ecs_exec, logs, ssm, sts, vpc  # noqa: F401  (registration)
from steps.base import Done, Poll, Step, StepContext, StepParams, get_step, registry

__all__ = ["Done", "Poll", "Step", "StepContext", "StepParams", "get_step", "registry"]
