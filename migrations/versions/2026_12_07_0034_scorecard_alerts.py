"""Scorecard alerts: a graded entity whose level changes, or one of whose rules flips, gets
an entity event (action SCORECARD) in the transaction that stored the new result, with the
entity's document before and after and the scorecard's result on each side, so automations
(SCORECARD_UPDATED) and changelog destinations react to it through the event feed.

A trigger, so every path that stores results (the reaction to a write, the worker's passes,
a definition's re-evaluation) records its changes; a first result (INSERT) and a removed one
(DELETE) are not changes of a level.

Revision ID: 0034
Revises: 0036
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0034"
down_revision: str | None = "0036"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A stored result in Port's shape: the level's title and rank, each rule's outcome.
_RESULT = """
CREATE FUNCTION portolan_scorecard_result(levels jsonb, rules jsonb, rank int, passed boolean[])
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object(
        'level', levels -> rank ->> 'title',
        'rank', rank,
        'rules', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                'identifier', r.rule ->> 'identifier',
                'status', CASE WHEN passed[r.n] THEN 'SUCCESS' ELSE 'FAILURE' END,
                'level', r.rule ->> 'level') ORDER BY r.n)
            FROM jsonb_array_elements(rules) WITH ORDINALITY AS r(rule, n)), '[]'::jsonb))
$$
"""

_EVENT = """
CREATE FUNCTION portolan_scorecard_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    card record;
    doc jsonb;
BEGIN
    SELECT levels, rules INTO card FROM scorecards
    WHERE org_id = NEW.org_id AND blueprint = NEW.blueprint AND identifier = NEW.scorecard;
    SELECT jsonb_build_object(
        'identifier', e.identifier, 'blueprint', e.blueprint, 'title', e.title,
        'icon', e.icon, 'team', to_jsonb(e.team), 'properties', e.properties,
        'relations', coalesce((
            SELECT jsonb_object_agg(l.relation, l.targets) FROM (
                SELECT relation, jsonb_agg(target_identifier ORDER BY target_identifier)
                    AS targets
                FROM entity_relations WHERE org_id = NEW.org_id
                AND source_blueprint = NEW.blueprint AND source_identifier = NEW.identifier
                GROUP BY relation) l), '{}'::jsonb))
    INTO doc FROM entities e
    WHERE e.org_id = NEW.org_id AND e.blueprint = NEW.blueprint
    AND e.identifier = NEW.identifier;
    IF doc IS NULL OR card IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO entity_events (org_id, blueprint, identifier, action, before, after, actor,
                               origin)
    VALUES (NEW.org_id, NEW.blueprint, NEW.identifier, 'SCORECARD',
            doc || jsonb_build_object('scorecards', jsonb_build_object(NEW.scorecard,
                portolan_scorecard_result(card.levels, card.rules, OLD.level_rank, OLD.passed))),
            doc || jsonb_build_object('scorecards', jsonb_build_object(NEW.scorecard,
                portolan_scorecard_result(card.levels, card.rules, NEW.level_rank, NEW.passed))),
            'scorecard:' || NEW.scorecard, 'SYSTEM');
    RETURN NULL;
END $$
"""

_TRIGGER = (
    "CREATE TRIGGER scorecard_results_changed AFTER UPDATE ON scorecard_results FOR EACH ROW "
    "WHEN ((OLD.level_rank, OLD.passed) IS DISTINCT FROM (NEW.level_rank, NEW.passed)) "
    "EXECUTE FUNCTION portolan_scorecard_event()"
)


def upgrade() -> None:
    op.execute(_RESULT)
    op.execute(_EVENT)
    op.execute(_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER scorecard_results_changed ON scorecard_results")
    op.execute("DROP FUNCTION portolan_scorecard_event()")
    op.execute("DROP FUNCTION portolan_scorecard_result(jsonb, jsonb, int, boolean[])")
