-- Billing: invoice lines of subscriptions, alert webhooks, and the alert outbox.
-- Money columns are bigint nano-dollars.

-- One line per charge of a subscription: the first one, seats or plan added mid-period, and the
-- renewal of each later period (recorded on the period's first billing touch or by the sweep).
CREATE TABLE invoices (
    id         bigserial PRIMARY KEY,
    team_id    text NOT NULL REFERENCES teams (id),
    period     text NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('subscription', 'change', 'renewal')),
    plan       text NOT NULL,
    seats      integer NOT NULL CHECK (seats >= 0),
    amount     bigint NOT NULL CHECK (amount >= 0),
    note       text NOT NULL DEFAULT '',
    actor      text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX invoices_team ON invoices (team_id, period);
CREATE UNIQUE INDEX invoices_one_renewal ON invoices (team_id, period) WHERE kind = 'renewal';

-- Alert webhooks of a team, and the team's signing secret (HMAC-SHA256 needs it in clear).
CREATE TABLE webhook_secrets (
    team_id    text PRIMARY KEY REFERENCES teams (id),
    secret     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhooks (
    id         text PRIMARY KEY,
    team_id    text NOT NULL REFERENCES teams (id),
    url        text NOT NULL,
    created_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    deleted_at timestamptz,
    deleted_by text
);
CREATE INDEX webhooks_team ON webhooks (team_id) WHERE deleted_at IS NULL;

-- The alert outbox: one row per threshold crossed, once per period and limit value (the unique
-- index is the dedupe of last resort behind the Redis flag); ``body`` is the exact JSON sent.
CREATE TABLE alert_events (
    id           text PRIMARY KEY,
    team_id      text NOT NULL REFERENCES teams (id),
    user_id      text NOT NULL DEFAULT '',           -- '' for the team's spending limit
    type         text NOT NULL,
    period       text NOT NULL,
    threshold    text NOT NULL,                      -- 80, 100, exceeded
    limit_amount bigint NOT NULL,
    body         text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX alert_events_once
    ON alert_events (team_id, user_id, period, threshold, limit_amount);

-- One delivery per event and webhook, retried with exponential backoff until delivered or given
-- up. A worker claims a delivery by pushing next_attempt_at past the attempt (a lease), so a
-- crashed worker's delivery is retried by another: at least once.
CREATE TABLE alert_deliveries (
    id              bigserial PRIMARY KEY,
    event_id        text NOT NULL REFERENCES alert_events (id),
    webhook_id      text NOT NULL REFERENCES webhooks (id),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    failed_at       timestamptz,
    last_status     integer,
    last_error      text NOT NULL DEFAULT '',
    UNIQUE (event_id, webhook_id)
);
CREATE INDEX alert_deliveries_due ON alert_deliveries (next_attempt_at)
    WHERE delivered_at IS NULL AND failed_at IS NULL;
