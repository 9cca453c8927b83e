"""messages: a partial index of the rows that name attachments (state.context reads them per turn)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 12:40:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        'ix_messages_attached', 'messages', ['session_id', 'position'], sqlite_where=sa.text("attachment_ids != '[]'")
    )


def downgrade() -> None:
    op.drop_index('ix_messages_attached', table_name='messages')
