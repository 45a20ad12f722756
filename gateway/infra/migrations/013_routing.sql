-- Routing (contract section 9): a usage record keeps the requested model (`model`, what reports
-- group by), the model that served it and how many upstream attempts it took. Records from
-- before routing: served_model '' (the requested model served them), one attempt.

ALTER TABLE usage_records
    ADD COLUMN served_model text NOT NULL DEFAULT '',
    ADD COLUMN attempts     integer NOT NULL DEFAULT 1 CHECK (attempts >= 1);
