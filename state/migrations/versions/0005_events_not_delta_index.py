"""events: a partial index of the events other than streamed deltas (a resume reads them alone)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 13:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_events_not_delta', 'events', ['session_id', 'seq'], sqlite_where=sa.text("type != 'response.delta'"))


def downgrade() -> None:
    op.drop_index('ix_events_not_delta', table_name='events')
