"""Fixtures of the integration tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray with four CPU device slots, for one test module."""
    import ray

    ray.init(
        address="local",  # a new instance, even if a `ray start` cluster runs here
        num_cpus=2,
        resources={"relay_device": 4},
        include_dashboard=False,
        log_to_driver=False,
        logging_level="warning",
    )
    yield
    ray.shutdown()
