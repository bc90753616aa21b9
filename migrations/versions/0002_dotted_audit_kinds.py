"""audit event kinds: one convention, "<subject>.<what happened>"

Rows written before this revision used ``job_started``-style kinds for jobs and
dispatches beside ``series.complete``-style ones for the rest; rename them so that
``spine-node audit tail --kind job.`` finds old and new rows alike.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 18:45:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

RENAMED = {
    "job_started": "job.started",
    "job_succeeded": "job.succeeded",
    "job_failed": "job.failed",
    "job_error": "job.error",
    "job_requeued": "job.requeued",
    "job_resent": "job.resent",
    "job_retried": "job.retried",
    "job_cancelled": "job.cancelled",
    "dispatch_sent": "dispatch.sent",
    "dispatch_failed": "dispatch.failed",
    "dispatch_dead": "dispatch.dead",
    "dispatch_retried": "dispatch.retried",
}

_events = sa.table("audit_events", sa.column("kind", sa.String(48)))


def upgrade() -> None:
    for old, new in RENAMED.items():
        op.execute(_events.update().where(_events.c.kind == old).values(kind=new))


def downgrade() -> None:
    for old, new in RENAMED.items():
        op.execute(_events.update().where(_events.c.kind == new).values(kind=old))
