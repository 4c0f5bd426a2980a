"""fusion: outcomes of study-level fusion models, contributing series of findings

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 03:30:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('finding_source',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('finding_pk', sa.Integer(), nullable=False),
    sa.Column('series_pk', sa.Integer(), nullable=False),
    sa.Column('role', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['finding_pk'], ['finding.id'], name=op.f('fk_finding_source_finding_pk_finding')),
    sa.ForeignKeyConstraint(['series_pk'], ['series.id'], name=op.f('fk_finding_source_series_pk_series')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_finding_source')),
    sa.UniqueConstraint('finding_pk', 'series_pk', name=op.f('uq_finding_source_finding_pk'))
    )
    op.create_index(op.f('ix_finding_source_finding_pk'), 'finding_source', ['finding_pk'], unique=False)
    op.create_index(op.f('ix_finding_source_series_pk'), 'finding_source', ['series_pk'], unique=False)
    op.create_table('fusion_outcome',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_pk', sa.Integer(), nullable=False),
    sa.Column('job_pk', sa.Integer(), nullable=False),
    sa.Column('model_name', sa.String(length=64), nullable=False),
    sa.Column('model_version', sa.String(length=32), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('missing_roles', sa.String(length=256), nullable=False),
    sa.Column('series', sa.String(length=1024), nullable=False),
    sa.Column('detail', sa.String(length=1024), nullable=False),
    sa.Column('deadline_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_pk'], ['job.id'], name=op.f('fk_fusion_outcome_job_pk_job')),
    sa.ForeignKeyConstraint(['study_pk'], ['study.id'], name=op.f('fk_fusion_outcome_study_pk_study')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_fusion_outcome')),
    sa.UniqueConstraint('study_pk', 'model_name', 'model_version', name=op.f('uq_fusion_outcome_study_pk'))
    )
    op.create_index(op.f('ix_fusion_outcome_job_pk'), 'fusion_outcome', ['job_pk'], unique=False)
    op.create_index(op.f('ix_fusion_outcome_state'), 'fusion_outcome', ['state'], unique=False)
    op.create_index(op.f('ix_fusion_outcome_study_pk'), 'fusion_outcome', ['study_pk'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index(op.f('ix_fusion_outcome_study_pk'), table_name='fusion_outcome')
    op.drop_index(op.f('ix_fusion_outcome_state'), table_name='fusion_outcome')
    op.drop_index(op.f('ix_fusion_outcome_job_pk'), table_name='fusion_outcome')
    op.drop_table('fusion_outcome')
    op.drop_index(op.f('ix_finding_source_series_pk'), table_name='finding_source')
    op.drop_index(op.f('ix_finding_source_finding_pk'), table_name='finding_source')
    op.drop_table('finding_source')
