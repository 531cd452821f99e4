from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from urllib.parse import quote

import pytest
import sqlalchemy as sa

from pai_usage import UsageTracker
from pai_usage.budgets import Budget, EnforceBudgets
from pai_usage.rollup import rollup_summary, verify_rollup
from pai_usage.summary import query_summary
from pai_usage.tenancy import add_tenant_role, enable_row_level_security, remove_tenant_role, tenant_scope
from tests.conftest import PG_SERVER_URL

NOW = datetime(2026, 4, 10, 12, tzinfo=UTC)
APRIL = (datetime(2026, 4, 1, tzinfo=UTC), datetime(2026, 5, 1, tzinfo=UTC))

# Organization ids that naive string building, LIKE patterns or case folding would confuse with `acme`.
ORGS = {
    'acme': ['1', '2.5'],
    'ACME': ['10'],
    'acme2': ['20'],
    'acm%': ['40'],
    'acm_': ['80'],
    "acme' OR '1'='1": ['160'],
    'globex': ['320'],
}


def seed(tracker: UsageTracker) -> None:
    for org, costs in ORGS.items():
        for i, cost in enumerate(costs):
            tracker.track(
                organization_id=org,
                user_id=f'{org}-user',
                provider='openai',
                model=f'gpt-4o-{i}',
                input_tokens=100,
                cost_usd=Decimal(cost),
                created_at=NOW,
            )
    tracker.track(organization_id=None, cost_usd=Decimal('640'), created_at=NOW)  # unattributed
    assert tracker.flush()


def test_summary_for_one_org_never_includes_another(tracker: UsageTracker) -> None:
    seed(tracker)
    for org, costs in ORGS.items():
        for group_by in [(), ('model',), ('organization',), ('organization', 'user', 'day')]:
            summary = query_summary(tracker.engine, *APRIL, organization_id=org, group_by=group_by)
            assert summary.totals.cost_usd == sum(Decimal(c) for c in costs), (org, group_by)
            assert summary.totals.events == len(costs)
            if 'organization' in group_by:
                assert {row.group['organization'] for row in summary.rows} == {org}
        current = tracker.get_current_month_usage(org, now=NOW)
        assert current.totals.cost_usd == sum(Decimal(c) for c in costs)

    # The same through the budget check, which caches per organization.
    enforcer = EnforceBudgets(
        tracker, budgets=[Budget(scope='organization', limit_usd=Decimal(1000))], clock=lambda: NOW
    )
    for org, costs in ORGS.items():
        [status] = enforcer.statuses(organization_id=org)
        assert status.spend_usd == sum(Decimal(c) for c in costs)


@pytest.mark.postgres
def test_rollup_summary_for_one_org_never_includes_another(pg_schema_url: str) -> None:
    with UsageTracker(pg_schema_url, flush_interval=0.005) as tracker:
        seed(tracker)
        for org, costs in ORGS.items():
            fast = rollup_summary(tracker.engine, *APRIL, organization_id=org, group_by=('organization', 'model'))
            assert fast is not None
            assert fast.totals.cost_usd == sum(Decimal(c) for c in costs)
            assert {row.group['organization'] for row in fast.rows} == {org}
    tracker.engine.dispose()


@pytest.fixture
def tenant_role(pg_schema_url: str) -> Iterator[str]:
    """A temporary non-superuser role with read and insert access to the private schema's tables."""
    role = f'pai_tenant_{uuid.uuid4().hex[:10]}'
    admin = sa.create_engine(PG_SERVER_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE ROLE {role} NOLOGIN NOSUPERUSER NOBYPASSRLS')
    try:
        yield role
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP OWNED BY {role}')
            conn.exec_driver_sql(f'DROP ROLE {role}')
        admin.dispose()


def as_tenant(pg_schema_url: str, role: str, organization_id: str | None = None) -> sa.Engine:
    options = f' -crole={role}'
    if organization_id is not None:
        options += f' -cpai_usage.organization_id={organization_id}'
    return sa.create_engine(pg_schema_url + quote(options))


@pytest.mark.postgres
def test_row_level_security(pg_schema_url: str, tenant_role: str) -> None:
    with UsageTracker(pg_schema_url, flush_interval=0.005) as tracker:
        seed(tracker)
    owner = tracker.engine
    enable_row_level_security(owner)
    enable_row_level_security(owner)  # idempotent
    schema = pg_schema_url.rsplit('search_path%3D', 1)[-1]
    with owner.begin() as conn:
        conn.exec_driver_sql(f'GRANT USAGE ON SCHEMA {schema} TO {tenant_role}')
        conn.exec_driver_sql(f'GRANT SELECT, INSERT ON token_usage TO {tenant_role}')
        conn.exec_driver_sql(f'GRANT SELECT ON token_usage_daily TO {tenant_role}')

    # A connection whose session names the organization: summaries see only its rows, whatever they ask for.
    acme = as_tenant(pg_schema_url, tenant_role, 'acme')
    with acme.connect() as conn:
        assert conn.exec_driver_sql('SELECT current_user').scalar() == tenant_role
        assert conn.exec_driver_sql('SELECT DISTINCT organization_id FROM token_usage').scalars().all() == ['acme']
    everything = query_summary(acme, *APRIL, group_by=('organization',))
    assert [row.group['organization'] for row in everything.rows] == ['acme']
    assert everything.totals.cost_usd == Decimal('3.5')
    assert query_summary(acme, *APRIL, organization_id='globex').totals.events == 0
    fast = rollup_summary(acme, *APRIL, group_by=('organization',))
    assert fast is not None and fast.totals.cost_usd == Decimal('3.5')

    # No setting: nothing at all (fail closed). A transaction-scoped setting works too.
    anonymous = as_tenant(pg_schema_url, tenant_role)
    assert query_summary(anonymous, *APRIL, group_by=()).totals.events == 0
    with anonymous.begin() as conn:
        tenant_scope(conn, 'globex')
        assert conn.exec_driver_sql('SELECT sum(cost_usd) FROM token_usage').scalar() == Decimal(320)
    with anonymous.connect() as conn:
        assert conn.exec_driver_sql('SELECT count(*) FROM token_usage').scalar() == 0  # it ended with the transaction

    # Writes: its own rows only; the rollup (which it cannot write) still follows, through the trigger.
    insert = (
        'INSERT INTO token_usage (id, created_at, organization_id, operation, source, input_tokens, cache_read_tokens,'
        ' cache_write_tokens, input_audio_tokens, output_tokens, reasoning_tokens, output_audio_tokens,'
        ' output_image_tokens, details, cost_usd, pricing_status, status, metadata) VALUES (gen_random_uuid(), :at,'
        " :org, 'request', 'direct', 1, 0, 0, 0, 1, 0, 0, 0, '{}', 5, 'priced', 'ok', '{}')"
    )
    with acme.begin() as conn:
        conn.execute(sa.text(insert), {'at': NOW, 'org': 'acme'})
    with pytest.raises(sa.exc.ProgrammingError, match='row-level security'), acme.begin() as conn:
        conn.execute(sa.text(insert), {'at': NOW, 'org': 'globex'})
    fast = rollup_summary(acme, *APRIL, group_by=())
    assert fast is not None and fast.totals.cost_usd == Decimal('8.5')
    assert verify_rollup(owner) == []  # the owner sees every row, and the rollup matches them all
    assert query_summary(owner, *APRIL, group_by=()).totals.events == sum(len(c) for c in ORGS.values()) + 2

    for engine in (acme, anonymous, owner):
        engine.dispose()


def test_tenant_scope_rejects_empty() -> None:
    engine = sa.create_engine('sqlite://')
    with engine.connect() as conn, pytest.raises(ValueError, match='non-empty'):
        tenant_scope(conn, '')
    with pytest.raises(ValueError, match='PostgreSQL'):
        enable_row_level_security(engine)
    engine.dispose()


@pytest.fixture
def login_roles(pg_schema_url: str) -> Iterator[tuple[str, str]]:
    """Two temporary roles that log in as themselves, as a tenant's reporting connection would."""
    roles = tuple(f'pai_tenant_{uuid.uuid4().hex[:10]}' for _ in range(2))
    admin = sa.create_engine(PG_SERVER_URL)
    with admin.begin() as conn:
        for role in roles:
            conn.exec_driver_sql(f'CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB')
    try:
        yield roles[0], roles[1]
    finally:
        with admin.begin() as conn:
            for role in roles:
                conn.exec_driver_sql(f'DROP OWNED BY {role}')
                conn.exec_driver_sql(f'DROP ROLE {role}')
        admin.dispose()


WIDENING_ATTEMPTS = [
    'SET ROLE {other}',
    "INSERT INTO pai_usage_tenant_roles VALUES (current_user, 'globex')",
    "UPDATE pai_usage_tenant_roles SET organization_id = 'globex'",
    'DELETE FROM pai_usage_tenant_roles',
    'ALTER TABLE token_usage DISABLE ROW LEVEL SECURITY',
    'DROP POLICY pai_usage_tenant_isolation ON token_usage',
    'ALTER FUNCTION pai_usage_tenant_organization(text) SECURITY INVOKER',
    'CREATE TABLE pai_usage_tenant_roles_2 (role_name text)',
]


@pytest.mark.postgres
def test_a_tenant_role_cannot_widen_its_scope(pg_schema_url: str, login_roles: tuple[str, str]) -> None:
    acme_role, globex_role = login_roles
    with UsageTracker(pg_schema_url, flush_interval=0.005) as tracker:
        seed(tracker)
    owner = tracker.engine
    enable_row_level_security(owner)
    schema = pg_schema_url.rsplit('search_path%3D', 1)[-1]
    with owner.begin() as conn:
        conn.exec_driver_sql(f'GRANT USAGE ON SCHEMA {schema} TO {acme_role}, {globex_role}')
        conn.exec_driver_sql(f'GRANT INSERT ON token_usage TO {acme_role}')
    add_tenant_role(owner, acme_role, 'acme')
    add_tenant_role(owner, globex_role, 'globex')

    acme = sa.create_engine(sa.make_url(pg_schema_url).set(username=acme_role))
    with acme.connect() as conn:
        assert conn.exec_driver_sql('SELECT session_user').scalar() == acme_role

        def orgs(table: str = 'token_usage') -> set[str]:
            return set(conn.exec_driver_sql(f'SELECT DISTINCT organization_id FROM {table}').scalars())

        assert orgs() == orgs('token_usage_daily') == {'acme'}
        # What defeats the setting-scoped policy does nothing here: the role's own mapping wins.
        conn.exec_driver_sql("SET pai_usage.organization_id = 'globex'")
        assert orgs() == orgs('token_usage_daily') == {'acme'}
        conn.execute(sa.select(sa.func.set_config('pai_usage.organization_id', "acme' OR '1'='1", False)))
        assert orgs() == {'acme'}
        conn.exec_driver_sql('RESET ROLE')
        assert orgs() == {'acme'}
        assert conn.exec_driver_sql('SELECT sum(cost_usd) FROM token_usage').scalar() == Decimal('3.5')
        conn.rollback()
        for attempt in WIDENING_ATTEMPTS:
            with pytest.raises(sa.exc.DBAPIError, match=r'permission denied|must be owner'):
                conn.exec_driver_sql(attempt.format(other=globex_role))
            conn.rollback()
        insert = (
            'INSERT INTO token_usage (id, created_at, organization_id, operation, source, input_tokens,'
            ' cache_read_tokens, cache_write_tokens, input_audio_tokens, output_tokens, reasoning_tokens,'
            ' output_audio_tokens, output_image_tokens, details, cost_usd, pricing_status, status, metadata)'
            " VALUES (gen_random_uuid(), :at, :org, 'request', 'direct', 1, 0, 0, 0, 1, 0, 0, 0, '{}', 5, 'priced',"
            " 'ok', '{}')"
        )
        with pytest.raises(sa.exc.ProgrammingError, match='row-level security'):
            conn.execute(sa.text(insert), {'at': NOW, 'org': 'globex'})
        conn.rollback()
        conn.execute(sa.text(insert), {'at': NOW, 'org': 'acme'})
        conn.commit()

    summary = query_summary(acme, *APRIL, group_by=('organization',))
    assert [row.group['organization'] for row in summary.rows] == ['acme']
    assert summary.totals.cost_usd == Decimal('8.5')  # its own insert included
    globex = sa.create_engine(sa.make_url(pg_schema_url).set(username=globex_role))
    assert query_summary(globex, *APRIL, group_by=()).totals.cost_usd == Decimal(320)

    # Without its mapping, the role falls back to the setting-scoped policy: nothing unless a setting names an org.
    remove_tenant_role(owner, acme_role)
    with acme.connect() as conn:
        assert conn.exec_driver_sql('SELECT count(*) FROM token_usage').scalar() == 0
    assert verify_rollup(owner) == []
    for engine in (acme, globex, owner):
        engine.dispose()


def test_add_tenant_role_rejects_empty() -> None:
    engine = sa.create_engine('sqlite://')
    with pytest.raises(ValueError, match='non-empty'):
        add_tenant_role(engine, '', 'acme')
    engine.dispose()
