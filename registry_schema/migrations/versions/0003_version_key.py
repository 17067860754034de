"""versions.version_key: PEP 440 order in the database, so the newest version is one indexed row

Revision ID: 0003_version_key
Revises: 0002_registry_meta
"""

import sqlalchemy as sa
from alembic import op

from registry_schema.version_key import version_key

revision = '0003_version_key'
down_revision = '0002_registry_meta'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a plain ADD COLUMN: SQLite's batch mode would copy and drop the table, and dropping it cascades
    op.add_column('versions', sa.Column('version_key', sa.String(length=400), nullable=True))
    op.create_index('ix_versions_adapter_key', 'versions', ['adapter_id', 'version_key'], unique=False)
    connection = op.get_bind()
    rows = connection.execute(sa.text("SELECT id, version FROM versions")).all()
    if rows:
        connection.execute(sa.text("UPDATE versions SET version_key = :key WHERE id = :id"),
                           [{"id": row_id, "key": version_key(version)} for row_id, version in rows])


def downgrade() -> None:
    op.drop_index('ix_versions_adapter_key', table_name='versions')
    op.drop_column('versions', 'version_key')  # natively, for the same reason as above
