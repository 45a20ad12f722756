-- Key controls and rate limits (contract section 10). NULL everywhere means "no such control".

ALTER TABLE api_keys
    ADD COLUMN expires_at    timestamptz,                        -- refused from this second on
    ADD COLUMN models        text[],                             -- the models it may use; NULL: all
    ADD COLUMN monthly_limit bigint CHECK (monthly_limit >= 0),  -- nano-dollars, hard
    ADD COLUMN rpm           integer CHECK (rpm >= 0),
    ADD COLUMN tpm           bigint CHECK (tpm >= 0);

ALTER TABLE memberships
    ADD COLUMN rpm integer CHECK (rpm >= 0),
    ADD COLUMN tpm bigint CHECK (tpm >= 0);

ALTER TABLE teams
    ADD COLUMN rpm_limit integer CHECK (rpm_limit >= 0),
    ADD COLUMN tpm_limit bigint CHECK (tpm_limit >= 0);
