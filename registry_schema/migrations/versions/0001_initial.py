"""initial schema

Revision ID: 0001_initial
Revises: 
"""

import sqlalchemy as sa
from alembic import op

revision = '0001_initial'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('adapters',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('display_name', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('base_models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=300), nullable=False),
    sa.Column('revision', sa.String(length=100), nullable=True),
    sa.Column('source', sa.Text(), nullable=True),
    sa.Column('architecture', sa.String(length=200), nullable=True),
    sa.Column('structural_fingerprint', sa.String(length=80), nullable=False),
    sa.Column('structural_dtype_fingerprint', sa.String(length=80), nullable=True),
    sa.Column('content_digest', sa.String(length=80), nullable=True),
    sa.Column('details', sa.JSON(), nullable=False),
    sa.Column('added_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    with op.batch_alter_table('base_models', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_base_models_structural_fingerprint'), ['structural_fingerprint'], unique=False)

    op.create_table('versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('adapter_id', sa.Integer(), nullable=False),
    sa.Column('version', sa.String(length=100), nullable=False),
    sa.Column('digest', sa.String(length=80), nullable=False),
    sa.Column('format', sa.String(length=40), nullable=False),
    sa.Column('adapter_type', sa.String(length=40), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=True),
    sa.Column('alpha', sa.Float(), nullable=True),
    sa.Column('use_rslora', sa.Boolean(), nullable=False),
    sa.Column('use_dora', sa.Boolean(), nullable=False),
    sa.Column('base_model_name', sa.String(length=300), nullable=True),
    sa.Column('base_model_revision', sa.String(length=100), nullable=True),
    sa.Column('base_model_id', sa.Integer(), nullable=True),
    sa.Column('task_type', sa.String(length=60), nullable=True),
    sa.Column('n_modules', sa.Integer(), nullable=False),
    sa.Column('n_params', sa.BigInteger(), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('source', sa.Text(), nullable=True),
    sa.Column('source_details', sa.JSON(), nullable=False),
    sa.Column('info', sa.JSON(), nullable=False),
    sa.Column('recipe', sa.JSON(), nullable=True),
    sa.Column('installed_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['base_model_id'], ['base_models.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('adapter_id', 'version', name='uq_versions_adapter_version')
    )
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_versions_adapter_id'), ['adapter_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_versions_digest'), ['digest'], unique=False)

    op.create_table('files',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('path', sa.String(length=500), nullable=False),
    sa.Column('digest', sa.String(length=80), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['version_id'], ['versions.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('version_id', 'path', name='uq_files_version_path')
    )
    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_files_digest'), ['digest'], unique=False)
        batch_op.create_index(batch_op.f('ix_files_version_id'), ['version_id'], unique=False)

    op.create_table('lineage',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('child_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('parent_digest', sa.String(length=80), nullable=False),
    sa.Column('parent_name', sa.String(length=200), nullable=False),
    sa.Column('parent_version', sa.String(length=100), nullable=False),
    sa.Column('weight', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['child_id'], ['versions.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('child_id', 'position', name='uq_lineage_child_position')
    )
    with op.batch_alter_table('lineage', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_lineage_child_id'), ['child_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_lineage_parent_digest'), ['parent_digest'], unique=False)

    op.create_table('modules',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=500), nullable=False),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('alpha', sa.Float(), nullable=False),
    sa.Column('in_features', sa.Integer(), nullable=False),
    sa.Column('out_features', sa.Integer(), nullable=False),
    sa.Column('dtype', sa.String(length=20), nullable=False),
    sa.ForeignKeyConstraint(['version_id'], ['versions.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('modules', schema=None) as batch_op:
        batch_op.create_index('ix_modules_version_name', ['version_id', 'name'], unique=False)

    op.create_table('tags',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('adapter_id', sa.Integer(), nullable=False),
    sa.Column('tag', sa.String(length=100), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['version_id'], ['versions.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('adapter_id', 'tag', name='uq_tags_adapter_tag')
    )
    with op.batch_alter_table('tags', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_tags_adapter_id'), ['adapter_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_tags_version_id'), ['version_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('tags', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_tags_version_id'))
        batch_op.drop_index(batch_op.f('ix_tags_adapter_id'))

    op.drop_table('tags')
    with op.batch_alter_table('modules', schema=None) as batch_op:
        batch_op.drop_index('ix_modules_version_name')

    op.drop_table('modules')
    with op.batch_alter_table('lineage', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_lineage_parent_digest'))
        batch_op.drop_index(batch_op.f('ix_lineage_child_id'))

    op.drop_table('lineage')
    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_files_version_id'))
        batch_op.drop_index(batch_op.f('ix_files_digest'))

    op.drop_table('files')
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_versions_digest'))
        batch_op.drop_index(batch_op.f('ix_versions_adapter_id'))

    op.drop_table('versions')
    with op.batch_alter_table('base_models', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_base_models_structural_fingerprint'))

    op.drop_table('base_models')
    op.drop_table('adapters')
