"""exports: one row per (output object, destination)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 00:40:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('export',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('instance_pk', sa.Integer(), nullable=False),
    sa.Column('job_pk', sa.Integer(), nullable=True),
    sa.Column('destination', sa.String(length=64), nullable=False),
    sa.Column('ae_title', sa.String(length=16), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('port', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('deadline_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_error', sa.String(length=256), nullable=False),
    sa.Column('last_status', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['instance_pk'], ['instance.id'], name=op.f('fk_export_instance_pk_instance')),
    sa.ForeignKeyConstraint(['job_pk'], ['job.id'], name=op.f('fk_export_job_pk_job')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_export')),
    sa.UniqueConstraint('instance_pk', 'destination', name=op.f('uq_export_instance_pk'))
    )
    op.create_index(op.f('ix_export_destination'), 'export', ['destination'], unique=False)
    op.create_index(op.f('ix_export_instance_pk'), 'export', ['instance_pk'], unique=False)
    op.create_index(op.f('ix_export_job_pk'), 'export', ['job_pk'], unique=False)
    op.create_index('ix_export_state_next_attempt_at', 'export', ['state', 'next_attempt_at'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index('ix_export_state_next_attempt_at', table_name='export')
    op.drop_index(op.f('ix_export_job_pk'), table_name='export')
    op.drop_index(op.f('ix_export_instance_pk'), table_name='export')
    op.drop_index(op.f('ix_export_destination'), table_name='export')
    op.drop_table('export')
