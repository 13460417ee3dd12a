"""The ClientApp: each node job's message type reaches its handler, and that handler knows the job by its name."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from client.app import app as client_app
from common.phases import NODE_JOBS
from inprocess_grid import InProcessGrid


@pytest.mark.parametrize("job", NODE_JOBS, ids=lambda job: job.name)
def test_the_client_app_answers_each_job_under_its_name(job):
    """Flower routes each phase's message type to a handler, and that handler's fault injection knows it by the
    job's name: a node told to fail in exactly this job fails there, naming it."""
    grid = InProcessGrid(client_app, 1)
    config = ConfigRecord({"fault-fraction": 1.0, "fault-kinds": "error", "fault-phases": job.name})
    message = Message(RecordDict({"config": config}), dst_node_id=grid.node_id(0), message_type=job.message_type)
    (reply,) = grid.send_and_receive([message])
    assert reply.has_error() and reply.error.reason.strip().endswith(f"injected fault: node fails in phase {job.name}")
