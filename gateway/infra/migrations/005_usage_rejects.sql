-- Usage records the writer could not insert (malformed): kept whole, never dropped.
CREATE TABLE usage_rejects (
    id         bigserial PRIMARY KEY,
    stream     text NOT NULL,
    entry_id   text NOT NULL,
    fields     jsonb NOT NULL,
    error      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream, entry_id)
);
