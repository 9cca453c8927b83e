"""attachments: where a user message first named each (image numbers); messages: a partial index of VQA replies

A turn numbered the session's images by reading every older turn that named one, so in a
conversation that names an image in every turn, each turn read all of them (44-70 ms of the event
loop at 4,000 messages on the 2-core CPU). The numbers now come with the attachments, and the last
question asked about an image is found through its own index.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 10:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('attachments') as batch:
        batch.add_column(sa.Column('first_position', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('first_index', sa.Integer(), nullable=True))
    # What the server wrote before: the first user message of the session naming each attachment.
    op.execute(
        """
        UPDATE attachments SET (first_position, first_index) = (
            SELECT m.position, j.key FROM messages AS m, json_each(m.attachment_ids) AS j
            WHERE m.session_id = attachments.session_id AND m.attachment_ids != '[]' AND m.role = 'user'
              AND j.value = attachments.id
            ORDER BY m.position, j.key LIMIT 1
        )
        """
    )
    op.create_index(
        'ix_messages_vqa', 'messages', ['session_id', 'position'], sqlite_where=sa.text("role = 'assistant' AND skill = 'vqa'")
    )


def downgrade() -> None:
    op.drop_index('ix_messages_vqa', table_name='messages')
    with op.batch_alter_table('attachments') as batch:
        batch.drop_column('first_index')
        batch.drop_column('first_position')
