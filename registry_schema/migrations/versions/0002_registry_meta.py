"""registry_meta: the registry's identity, which ties a blob store to its database

Revision ID: 0002_registry_meta
Revises: 0001_initial
"""

import sqlalchemy as sa
from alembic import op

revision = '0002_registry_meta'
down_revision = '0001_initial'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('registry_meta',
    sa.Column('key', sa.String(length=40), nullable=False),
    sa.Column('value', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )


def downgrade() -> None:
    op.drop_table('registry_meta')
