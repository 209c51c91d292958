"""Nodes: the node model, the EC2 and ECS/Fargate node sources, and node filters.

Pure functions of a boto3 client and their settings, so steps can resolve their targets at
dispatch; the worker caches whole snapshots in Redis (``worker.nodes``).
"""

from steps.nodes.filters import FilterError, NodeFilter, parse_filter
from steps.nodes.model import Node

__all__ = ["FilterError", "Node", "NodeFilter", "parse_filter"]
