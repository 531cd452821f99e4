-- OPTIONAL, PostgreSQL only, never applied by `pai-usage migrate`: row-level security for apps that let
-- tenants query the ledger directly (e.g. through Supabase/PostgREST or a reporting role).
--
-- Apply it after the regular migrations, as the tables' owner:
--     psql "$DATABASE_URL" -f migrations/optional/postgresql_rls.sql
-- or `pai_usage.tenancy.enable_row_level_security(engine)`.
--
-- A role other than the owner (and without BYPASSRLS) then sees and writes only the rows of the organization
-- named by the `pai_usage.organization_id` setting of its transaction or session:
--     SELECT set_config('pai_usage.organization_id', 'acme', true)
-- With the setting absent or empty it sees nothing. The tables' owner, which the tracker normally connects as,
-- is not restricted (no FORCE ROW LEVEL SECURITY), so the writer and `pai-usage` keep working unchanged.
-- Grant tenants' roles what they need, e.g.
--     GRANT SELECT ON token_usage, token_usage_daily, token_usage_monthly TO tenant_role
-- On Supabase, key the policies on the JWT instead, e.g. (auth.jwt() ->> 'org_id').
ALTER TABLE token_usage ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS pai_usage_tenant_isolation ON token_usage;
CREATE POLICY pai_usage_tenant_isolation ON token_usage
    USING (organization_id = current_setting('pai_usage.organization_id', true))
    WITH CHECK (organization_id = current_setting('pai_usage.organization_id', true));

ALTER TABLE token_usage_daily ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS pai_usage_tenant_isolation ON token_usage_daily;
CREATE POLICY pai_usage_tenant_isolation ON token_usage_daily
    USING (organization_id = current_setting('pai_usage.organization_id', true))
    WITH CHECK (organization_id = current_setting('pai_usage.organization_id', true));

ALTER TABLE token_usage_monthly ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS pai_usage_tenant_isolation ON token_usage_monthly;
CREATE POLICY pai_usage_tenant_isolation ON token_usage_monthly
    USING (organization_id = current_setting('pai_usage.organization_id', true))
    WITH CHECK (organization_id = current_setting('pai_usage.organization_id', true));

-- The rollup triggers maintain token_usage_daily and token_usage_monthly as their owner, whoever inserts into
-- token_usage: tenants need no write access to the rollup, and a tenant's insert still updates it exactly. The search path is pinned to
-- the one in effect now, so a caller cannot substitute other rollup tables.
ALTER FUNCTION pai_usage_rollup_apply() SECURITY DEFINER SET search_path FROM CURRENT;
ALTER FUNCTION pai_usage_rollup_truncate() SECURITY DEFINER SET search_path FROM CURRENT;
