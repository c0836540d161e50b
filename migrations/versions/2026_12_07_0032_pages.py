"""Pages (Port's dashboards and catalog pages) and their widgets; audit log entries for
their changes.

Revision ID: 0032
Revises: 0031
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from app.db import rls

revision: str = "0032"
down_revision: str | None = "0031"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONB = postgresql.JSONB(astext_type=sa.Text())
UUID = postgresql.UUID(as_uuid=True)
TABLES = ("page_widgets", "pages")


def _ts(name: str) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "pages",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("identifier", sa.String(100), nullable=False),
        sa.Column("type", sa.String(40), nullable=False),
        sa.Column("blueprint", sa.String(100), nullable=True),
        sa.Column("attributes", JSONB, nullable=False),
        sa.Column("read_access", JSONB, nullable=False),
        sa.Column("update_access", JSONB, nullable=False),
        _ts("created_at"),
        sa.Column("created_by", sa.String(200), nullable=False),
        _ts("updated_at"),
        sa.Column("updated_by", sa.String(200), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name="fk_pages_org_id_organizations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "identifier", name="pk_pages"),
    )
    op.create_table(
        "page_widgets",
        sa.Column("org_id", UUID, nullable=False),
        sa.Column("page", sa.String(100), nullable=False),
        sa.Column("id", sa.String(100), nullable=False),
        sa.Column("container", sa.String(100), nullable=True),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(60), nullable=False),
        sa.Column("definition", JSONB, nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id", "page"],
            ["pages.org_id", "pages.identifier"],
            name="fk_page_widgets_org_id_page_pages",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "page", "id", name="pk_page_widgets"),
    )
    for table in TABLES:
        for statement in rls.fence_table(table):
            op.execute(statement)
    # Audit entries (portolan_audit_row, migration 0014): every change of a page (its fields
    # and permissions) and of a widget.
    op.execute(
        "CREATE TRIGGER pages_audit AFTER INSERT OR UPDATE OR DELETE ON pages FOR EACH ROW "
        "EXECUTE FUNCTION portolan_audit_row('page', 'identifier', 'created_at', 'updated_at', "
        "'updated_by')"
    )
    op.execute(
        "CREATE TRIGGER page_widgets_audit AFTER INSERT OR UPDATE OR DELETE ON page_widgets "
        "FOR EACH ROW EXECUTE FUNCTION portolan_audit_row('page-widget', 'id')"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER page_widgets_audit ON page_widgets")
    op.execute("DROP TRIGGER pages_audit ON pages")
    for table in TABLES:
        op.drop_table(table)
