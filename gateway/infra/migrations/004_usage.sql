-- Usage reports (gateway/api/usage.py): one account's records over a range of days.
-- Both reports filter on (account, created_at): t_<team> for a team, u_<user> for /api/me/usage.
CREATE INDEX usage_account_time ON usage_records (account, created_at);

-- group_by=day groups by this exact expression (usage.DAY_EXPR). Without statistics on it the
-- planner guesses ~1 group per row and sorts a year of rows on disk instead of hashing 365 groups.
CREATE STATISTICS usage_records_day ON ((created_at AT TIME ZONE 'UTC')::date) FROM usage_records;
