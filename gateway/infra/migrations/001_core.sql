-- Core schema: people, teams, keys, money and usage. Money columns are bigint nano-dollars.

CREATE TABLE users (
    id            text PRIMARY KEY,
    email         text NOT NULL,
    name          text NOT NULL,
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    deleted_at    timestamptz
);
CREATE UNIQUE INDEX users_email_key ON users (lower(email));

CREATE TABLE sessions (
    token_hash  bytea PRIMARY KEY,
    user_id     text NOT NULL REFERENCES users (id),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz
);
CREATE INDEX sessions_user ON sessions (user_id);

CREATE TABLE teams (
    id                   text PRIMARY KEY,
    name                 text NOT NULL,
    owner_id             text NOT NULL REFERENCES users (id),
    plan                 text,
    seats                integer NOT NULL DEFAULT 0 CHECK (seats >= 0),
    spending_limit       bigint CHECK (spending_limit >= 0),
    default_member_limit bigint CHECK (default_member_limit >= 0),
    default_enforcement  text NOT NULL DEFAULT 'hard' CHECK (default_enforcement IN ('hard', 'soft')),
    model_restrictions   text[] NOT NULL DEFAULT '{}',
    discount_bps         integer NOT NULL DEFAULT 0 CHECK (discount_bps BETWEEN 0 AND 10000),
    created_at           timestamptz NOT NULL DEFAULT now(),
    deleted_at           timestamptz
);

CREATE TABLE memberships (
    id            bigserial PRIMARY KEY,
    team_id       text NOT NULL REFERENCES teams (id),
    user_id       text NOT NULL REFERENCES users (id),
    role          text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    monthly_limit bigint CHECK (monthly_limit >= 0),
    limit_set     boolean NOT NULL DEFAULT false,   -- true: monthly_limit overrides (NULL = none)
    enforcement   text CHECK (enforcement IN ('hard', 'soft')),
    billing_mode  text NOT NULL DEFAULT 'team' CHECK (billing_mode IN ('team', 'personal')),
    joined_at     timestamptz NOT NULL DEFAULT now(),
    removed_at    timestamptz
);
CREATE UNIQUE INDEX memberships_active ON memberships (team_id, user_id) WHERE removed_at IS NULL;
CREATE INDEX memberships_user ON memberships (user_id) WHERE removed_at IS NULL;
CREATE UNIQUE INDEX memberships_one_owner ON memberships (team_id) WHERE role = 'owner' AND removed_at IS NULL;

CREATE TABLE api_keys (
    id           text PRIMARY KEY,
    hash         bytea NOT NULL UNIQUE,
    prefix       text NOT NULL,
    name         text NOT NULL,
    user_id      text NOT NULL REFERENCES users (id),
    team_id      text REFERENCES teams (id),          -- NULL: a personal key
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz,
    revoked_by   text
);
CREATE INDEX api_keys_owner ON api_keys (user_id, team_id) WHERE revoked_at IS NULL;
CREATE INDEX api_keys_team ON api_keys (team_id) WHERE revoked_at IS NULL;

-- Money put into an account: operator credits (carry over) and period allowances.
CREATE TABLE ledger (
    id         bigserial PRIMARY KEY,
    account    text NOT NULL,                         -- t_<team> or u_<user>
    kind       text NOT NULL CHECK (kind IN ('credit', 'allowance')),
    period     text,                                  -- for allowances: YYYY-MM
    amount     bigint NOT NULL,
    note       text NOT NULL DEFAULT '',
    actor      text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_account ON ledger (account, kind, period);

CREATE TABLE usage_records (
    request_id        text PRIMARY KEY,
    account           text NOT NULL,
    team_id           text,
    user_id           text NOT NULL,
    key_id            text NOT NULL,
    model             text NOT NULL,
    endpoint          text NOT NULL,
    period            text NOT NULL,
    prompt_tokens     integer NOT NULL,
    completion_tokens integer NOT NULL,
    cached_tokens     integer NOT NULL DEFAULT 0,
    list_cost         bigint NOT NULL,
    discount          bigint NOT NULL,
    charged           bigint NOT NULL,
    from_allowance    bigint NOT NULL,
    from_credits      bigint NOT NULL,
    usage_source      text NOT NULL CHECK (usage_source IN ('upstream', 'estimated')),
    encoding          text NOT NULL DEFAULT '',
    tags              text[] NOT NULL DEFAULT '{}',
    status            integer NOT NULL,
    created_at        timestamptz NOT NULL
);
CREATE INDEX usage_team_time ON usage_records (team_id, created_at) WHERE team_id IS NOT NULL;
CREATE INDEX usage_user_time ON usage_records (user_id, created_at);
CREATE INDEX usage_account_period ON usage_records (account, period);

CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    team_id     text,
    actor_id    text,
    action      text NOT NULL,
    target_type text NOT NULL DEFAULT '',
    target_id   text NOT NULL DEFAULT '',
    before      jsonb,
    after       jsonb,
    request_id  text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_team_time ON audit_log (team_id, created_at);

-- The audit log is append-only.
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END $$;
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
