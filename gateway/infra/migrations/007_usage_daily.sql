-- Daily rollup of usage_records, maintained by the usage writer in the same transaction as the
-- records themselves (only rows actually inserted count, so a redelivered batch adds nothing).
-- Usage reports read it: a year for a busy team is a few thousand rows, whatever the table size.
CREATE TABLE usage_daily (
    account           text NOT NULL,
    day               date NOT NULL,
    user_id           text NOT NULL,
    key_id            text NOT NULL,
    model             text NOT NULL,
    tags              text[] NOT NULL,
    requests          bigint NOT NULL,
    prompt_tokens     bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    list_cost         bigint NOT NULL,
    discount          bigint NOT NULL,
    charged           bigint NOT NULL,
    PRIMARY KEY (account, day, user_id, key_id, model, tags)
);

INSERT INTO usage_daily
SELECT account, (created_at AT TIME ZONE 'UTC')::date, user_id, key_id, model, tags, count(*),
       sum(prompt_tokens), sum(completion_tokens), sum(list_cost), sum(discount), sum(charged)
FROM usage_records
GROUP BY 1, 2, 3, 4, 5, 6;
