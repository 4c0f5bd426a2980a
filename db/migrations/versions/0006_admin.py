"""admin: API tokens, audit trail, model switches, stage timings

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22 03:30:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('api_token',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=8), nullable=False),
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_token')),
    sa.UniqueConstraint('token_sha256', name=op.f('uq_api_token_token_sha256'))
    )
    op.create_table('audit_event',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('channel', sa.String(length=16), nullable=False),
    sa.Column('actor', sa.String(length=96), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('target', sa.String(length=128), nullable=False),
    sa.Column('source', sa.String(length=96), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('detail', sa.String(length=2048), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_event'))
    )
    op.create_index('ix_audit_event_at', 'audit_event', ['at'], unique=False)
    op.create_index(op.f('ix_audit_event_action'), 'audit_event', ['action'], unique=False)
    op.create_index(op.f('ix_audit_event_channel'), 'audit_event', ['channel'], unique=False)
    op.create_table('model_switch',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('version', sa.String(length=32), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('changed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('changed_by', sa.String(length=96), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_switch')),
    sa.UniqueConstraint('name', 'version', name=op.f('uq_model_switch_name'))
    )
    op.create_table('stage_timing',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_pk', sa.Integer(), nullable=False),
    sa.Column('stage', sa.String(length=32), nullable=False),
    sa.Column('model_name', sa.String(length=64), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_pk'], ['job.id'], name=op.f('fk_stage_timing_job_pk_job')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_stage_timing'))
    )
    op.create_index(op.f('ix_stage_timing_job_pk'), 'stage_timing', ['job_pk'], unique=False)
    op.create_index('ix_stage_timing_stage_recorded_at', 'stage_timing', ['stage', 'recorded_at'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index('ix_stage_timing_stage_recorded_at', table_name='stage_timing')
    op.drop_index(op.f('ix_stage_timing_job_pk'), table_name='stage_timing')
    op.drop_table('stage_timing')
    op.drop_table('model_switch')
    op.drop_index(op.f('ix_audit_event_channel'), table_name='audit_event')
    op.drop_index(op.f('ix_audit_event_action'), table_name='audit_event')
    op.drop_index('ix_audit_event_at', table_name='audit_event')
    op.drop_table('audit_event')
    op.drop_table('api_token')
