-- OPTIONAL, PostgreSQL only, never applied by `pai-usage migrate`: row-level security for apps that let
-- tenants query the ledger directly (e.g. through a reporting role per tenant, or PostgREST).
--
-- Apply it after the regular migrations, as the tables' owner:
--     psql "$DATABASE_URL" -f migrations/optional/postgresql_rls.sql
-- or `pai_usage.tenancy.enable_row_level_security(engine)`. The tables' owner (which the tracker normally
-- connects as), superusers and BYPASSRLS roles are not restricted (no FORCE ROW LEVEL SECURITY).
--
-- Two ways to restrict every other role, with different threat models (see docs/postgres.md):
--
-- 1. A role per tenant (safe against a tenant who can run SQL): a role listed in `pai_usage_tenant_roles`
--    sees and writes only its organization's rows, keyed on `current_user`. It cannot widen that: the mapping
--    is writable only by the owner, and no setting it can change is consulted for it.
--        INSERT INTO pai_usage_tenant_roles VALUES ('tenant_acme', 'acme')   -- or tenancy.add_tenant_role()
-- 2. A shared role scoped by a setting (protects against application bugs only): any other role sees the
--    rows of the organization named by its `pai_usage.organization_id` setting, and nothing without it:
--        SELECT set_config('pai_usage.organization_id', 'acme', true)        -- or tenancy.tenant_scope()
--    Whoever can run SQL on such a connection can set it to any organization: never hand it to a tenant.
CREATE TABLE IF NOT EXISTS pai_usage_tenant_roles (
    role_name VARCHAR(63) PRIMARY KEY,
    organization_id VARCHAR(255) NOT NULL
);
REVOKE ALL ON pai_usage_tenant_roles FROM PUBLIC;

-- Runs as the owner, so tenants need no access to the mapping, and the search path is pinned to the one in effect
-- now, so a caller cannot substitute another table. It answers for the role the policy passes, `current_user`.
CREATE OR REPLACE FUNCTION pai_usage_tenant_organization(role_name text) RETURNS text
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT
    AS 'SELECT organization_id::text FROM pai_usage_tenant_roles WHERE pai_usage_tenant_roles.role_name = $1';

-- A mapped role gets its own organization, whatever its settings say, and an unmapped role gets the setting's.
-- Grant tenants' roles what they need, e.g.
--     GRANT SELECT ON token_usage, token_usage_daily, token_usage_monthly TO tenant_role
-- On Supabase, key the policies on the JWT instead, e.g. (auth.jwt() ->> 'org_id').
ALTER TABLE token_usage ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS pai_usage_tenant_isolation ON token_usage;
CREATE POLICY pai_usage_tenant_isolation ON token_usage
    USING (organization_id = COALESCE(pai_usage_tenant_organization(current_user::text),
                                      current_setting('pai_usage.organization_id', true)))
    WITH CHECK (organization_id = COALESCE(pai_usage_tenant_organization(current_user::text),
                                           current_setting('pai_usage.organization_id', true)));

ALTER TABLE token_usage_daily ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS pai_usage_tenant_isolation ON token_usage_daily;
CREATE POLICY pai_usage_tenant_isolation ON token_usage_daily
    USING (organization_id = COALESCE(pai_usage_tenant_organization(current_user::text),
                                      current_setting('pai_usage.organization_id', true)))
    WITH CHECK (organization_id = COALESCE(pai_usage_tenant_organization(current_user::text),
                                           current_setting('pai_usage.organization_id', true)));

ALTER TABLE token_usage_monthly ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS pai_usage_tenant_isolation ON token_usage_monthly;
CREATE POLICY pai_usage_tenant_isolation ON token_usage_monthly
    USING (organization_id = COALESCE(pai_usage_tenant_organization(current_user::text),
                                      current_setting('pai_usage.organization_id', true)))
    WITH CHECK (organization_id = COALESCE(pai_usage_tenant_organization(current_user::text),
                                           current_setting('pai_usage.organization_id', true)));

-- The rollup triggers maintain token_usage_daily and token_usage_monthly as their owner, whoever inserts into
-- token_usage: tenants need no write access to the rollup, and a tenant's insert still updates it exactly.
-- The search path is pinned to the one in effect now, so a caller cannot substitute other rollup tables.
ALTER FUNCTION pai_usage_rollup_apply() SECURITY DEFINER SET search_path FROM CURRENT;
ALTER FUNCTION pai_usage_rollup_truncate() SECURITY DEFINER SET search_path FROM CURRENT;
