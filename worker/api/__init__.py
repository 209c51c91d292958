"""The HTTP API (the ``dispatcher`` process): the Python API's operations as JSON under ``/v1``.

Importing this package needs nothing beyond the core install; ``worker.api.app`` needs the ``[api]`` extra.
"""
