-- Account changes committed in PostgreSQL whose Redis writes are not done yet
-- (gateway/metering/changes.py). A management transaction inserts one row with what it changed;
-- after its commit the row is applied to Redis and deleted in one short transaction. A row left
-- behind (Redis unreachable, the process killed between the commit and the write) is applied by
-- the outbox sweep: at start and every few seconds, in one process at a time.
CREATE TABLE account_outbox (
    id         bigserial PRIMARY KEY,
    changes    jsonb NOT NULL,        -- AccountChanges as JSON: what to re-read and write
    created_at timestamptz NOT NULL   -- the app's clock at the change
);
