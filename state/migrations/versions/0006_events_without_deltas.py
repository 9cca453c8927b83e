"""events: streamed deltas are no longer logged; the ones logged before go, with their partial index

A resume already sent an ended reply as its response.done (the whole text), so these rows were
never read again.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 15:40:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index('ix_events_not_delta', table_name='events')
    op.execute("DELETE FROM events WHERE type = 'response.delta'")


def downgrade() -> None:
    op.create_index('ix_events_not_delta', 'events', ['session_id', 'seq'], sqlite_where=sa.text("type != 'response.delta'"))
