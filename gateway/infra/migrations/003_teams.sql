-- People joining teams: invitations by email, the public invite link and its join requests, and
-- the outbox of every mail the gateway sends. Tokens are stored only as SHA-256.

CREATE TABLE invitations (
    id          text PRIMARY KEY,
    team_id     text NOT NULL REFERENCES teams (id),
    email       text NOT NULL,
    role        text NOT NULL CHECK (role IN ('admin', 'member')),
    token_hash  bytea NOT NULL UNIQUE,
    invited_by  text NOT NULL REFERENCES users (id),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    accepted_at timestamptz,
    accepted_by text REFERENCES users (id),
    revoked_at  timestamptz,
    revoked_by  text
);
CREATE INDEX invitations_team ON invitations (team_id, created_at);
CREATE INDEX invitations_email ON invitations (team_id, lower(email))
    WHERE accepted_at IS NULL AND revoked_at IS NULL;

-- A team's public invite link; at most one enabled at a time, earlier ones kept disabled.
CREATE TABLE invite_links (
    id          text PRIMARY KEY,
    team_id     text NOT NULL REFERENCES teams (id),
    token_hash  bytea NOT NULL UNIQUE,
    created_by  text NOT NULL REFERENCES users (id),
    created_at  timestamptz NOT NULL DEFAULT now(),
    disabled_at timestamptz,
    disabled_by text
);
CREATE UNIQUE INDEX invite_links_enabled ON invite_links (team_id) WHERE disabled_at IS NULL;

CREATE TABLE join_requests (
    id          text PRIMARY KEY,
    team_id     text NOT NULL REFERENCES teams (id),
    user_id     text NOT NULL REFERENCES users (id),
    link_id     text REFERENCES invite_links (id),
    status      text NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'approved', 'denied', 'cancelled')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    decided_at  timestamptz,
    decided_by  text
);
CREATE UNIQUE INDEX join_requests_pending ON join_requests (team_id, user_id) WHERE status = 'pending';
CREATE INDEX join_requests_team ON join_requests (team_id, status, created_at);

-- Every outgoing mail. status: pending (not attempted yet), sent, failed (SMTP refused or timed
-- out: the body is kept so an operator can still pass the link on), logged (no SMTP configured:
-- written to the server log, the body kept so a local user can follow the link). Once a mail is
-- sent, its one-time secrets are redacted from the stored body.
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL,
    ref_id      text NOT NULL DEFAULT '',
    to_addr     text NOT NULL,
    subject     text NOT NULL,
    body        text NOT NULL,
    status      text NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'sent', 'failed', 'logged')),
    error       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz
);
CREATE INDEX outbox_ref ON outbox (kind, ref_id);
