"""Every Redis key name ModelBridge uses, built in this one module.

All keys of one billing account share the hash tag ``{acct:<account>}`` so the hold, settle and
load scripts touch a single slot and run unchanged on Redis Cluster. An account id is
``t_<team id>`` for a team and ``u_<user id>`` for a user's personal balance.

=====================  ======  ================================================================
key                    type    contents
=====================  ======  ================================================================
{acct:A}:s             hash    loaded, credits, holds, sub_alw (allowance per period of the
                               current subscription), mh:<scope> (holds per member scope),
                               kh:<key> (holds per key with a monthly limit), crid (id of
                               the last credit ledger row counted: gateway/metering/changes.py);
                               rate logs: rlast (the last rate stamp, ms), rc:<log> ("<count>|
                               <oldest stamp>|<stamp of its last PEXPIRE>"), rs:<log> (its
                               tokens, worst case until settled); <log>: k:<key>, m:<scope>, t
{acct:A}:p:<period>    hash    alw, aspent, spend, req, ms:<scope>, mr:<scope>, ks:<key>,
                               mo:<model> — this period's counters (expire after ~3 months);
                               mx:<scope> — the member's spend this period in the same team
                               billed to the *other* account (billing mode switched mid-period),
                               kx:<key> — the same for a key;
                               al:<scope|team>:<threshold>:<limit> — alert fired (dedupe flag)
{acct:A}:cfg           hash    limit, dml, den, disc, ml:<scope>, me:<scope>, deleted; rate
                               limits: rpm, tpm (team), rpm:<scope>, tpm:<scope> (member)
{acct:A}:keys          hash    <key id> -> <member scope>[|<controls>]: the keys that may bill A
                               right now, with their controls (policies/limits.py:key_entry)
{acct:A}:blk:<scope>   set     models blocked for requests of that scope ("" = the account)
{acct:A}:hz            zset    hold id -> expiry (unix s)
{acct:A}:hv            hash    hold id -> "<amount>|<scope>", or with key or rate limits
                               "<amount>|<scope>|<flags>|<tokens>@<stamp>|<key>" (hold.lua)
{acct:A}:rid:<req id>  string  settle marker (idempotency), expires after a day
{acct:A}:usage         stream  usage records waiting for the PostgreSQL writer
{acct:A}:alerts        stream  limit alerts (thresholds crossed) waiting for the alert worker
{acct:A}:rl:k:<key>    zset    a key's rate log: "<request id>|<tokens>" scored by stamp (ms)
{acct:A}:rl:m:<scope>  zset    a member's rate log (policies/ratelimits.py; expires when idle)
{acct:A}:rl:t          zset    the team's rate log
{acct:A}:rj:<period>   hash    "<key>|<code>" -> requests of that key refused with that code this
                               period (shown with the key; not rebuilt after a Redis loss)
{acct:A}:resp:<id>     string  "<tokens>|<served by>" of a stored Responses API response this
                               account made: what a request continuing it (previous_response_id)
                               is held for and routed to (not rebuilt after a Redis loss)
mb:usage:streams:{rN}  set     names of the usage streams of the accounts whose slot is N
                               modulo 16 (for the writer): 16 registry shards
mb:usage:doorbell      stream  a stream registered (wakes an idle writer, which waits on the
                               streams it knows; trimmed to about 100 entries)
mb:keys:invalidate     pubsub  key ids whose cached auth entries must be dropped
mb:seq:invalidate      string  counter bumped on every invalidation (cache epoch)
mb:{guess}:K:S:I:n     string  attempts of kind K (login, invite, join, signup) in the bucket of
                               scope S (pair, account, client) for I (policies/guessing.py)
mb:{guess}:K:S:I:w     string  set while that bucket waits (expires when the wait is over)
=====================  ======  ================================================================

Redis Cluster. A multi-key command (a script, MULTI, XREADGROUP over several streams) may only
name keys of one slot. Account keys share their account's slot (:func:`account_slot`). The few
keys outside an account are each used alone: the usage stream registry is split in shards with
hash tags of their own (``{r0}`` .. ``{r15}``, spread over the masters), read one SMEMBERS per
shard and added to with single SADDs; a registry shard lost in a failover is rebuilt by the
writer's periodic scan of every master. ``mb:keys:invalidate`` is a classic pub/sub channel,
which a cluster broadcasts to every node, and ``mb:seq:invalidate`` a lone counter. The
guessing buckets all share the tag ``{guess}`` (one slot; logins are few).

Member scopes. In a team account ``t_T`` the scope of a request is the member's user id. In a
user account ``u_X`` it is ``X`` for the user's personal keys, and the team id ``T`` for X's team
keys in a team where X's ``billing_mode`` is ``personal``: ``u_X`` then mirrors that team's
policies under scope ``T`` (``blk:T`` = the team's blocked models, cfg ``ml:T`` / ``me:T`` = X's
effective member limit and enforcement in T, resolved), so every script still touches one slot.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.slots import key_slot

USAGE_REGISTRY_SHARDS = 16
INVALIDATE_CHANNEL = "mb:keys:invalidate"
INVALIDATE_SEQ = "mb:seq:invalidate"
USAGE_GROUP = "usage-writers"
USAGE_DOORBELL = "mb:usage:doorbell"
PERIOD_TTL_S = 100 * 24 * 3600
RID_TTL_S = 24 * 3600
RESPONSE_NOTE_TTL_S = 30 * 24 * 3600  # a stored response's note (config: metering.response_notes_s)
#: A settle marker's life once the writer has its record in PostgreSQL (ack.lua). From then on
#: a replay of that settle is dropped by the ledger check every replay makes first; the marker
#: only has to outlive a replay whose check came just before the record landed and whose
#: settle is still on its way (seconds: the script call's timeout).
RID_AFTER_LEDGER_S = 120


def account_slot(account: str) -> int:
    """The Redis Cluster slot of every key of ``account``."""
    return key_slot(f"acct:{account}")


def usage_registry(account: str) -> str:
    """The registry shard that lists ``account``'s usage stream."""
    return usage_registry_shard(account_slot(account) % USAGE_REGISTRY_SHARDS)


def usage_registry_shard(shard: int) -> str:
    return f"mb:usage:streams:{{r{shard}}}"


def usage_registries() -> list[str]:
    return [usage_registry_shard(n) for n in range(USAGE_REGISTRY_SHARDS)]


def guess_keys(kind: str, scope: str, ident: str) -> tuple[str, str]:
    """The attempt counter and the wait flag of one guessing bucket. One hash tag for all of
    them: ``guess.lua`` touches an attempt's few buckets in one step."""
    base = f"mb:{{guess}}:{kind}:{scope}:{ident}"
    return base + ":n", base + ":w"


def team_account(team_id: str) -> str:
    return f"t_{team_id}"


def user_account(user_id: str) -> str:
    return f"u_{user_id}"


@dataclass(frozen=True, slots=True)
class AccountKeys:
    """Key names of one billing account."""

    account: str

    @property
    def tag(self) -> str:
        return f"{{acct:{self.account}}}"

    @property
    def state(self) -> str:
        return f"{self.tag}:s"

    def period(self, period: str) -> str:
        return f"{self.tag}:p:{period}"

    @property
    def cfg(self) -> str:
        return f"{self.tag}:cfg"

    @property
    def keys(self) -> str:
        return f"{self.tag}:keys"

    def blocked(self, scope: str = "") -> str:
        return f"{self.tag}:blk:{scope}"

    @property
    def hold_expiry(self) -> str:
        return f"{self.tag}:hz"

    @property
    def hold_values(self) -> str:
        return f"{self.tag}:hv"

    def settled_marker(self, request_id: str) -> str:
        return f"{self.settled_marker_prefix}{request_id}"

    @property
    def settled_marker_prefix(self) -> str:
        """What ack.lua puts before a request id to name its marker."""
        return f"{self.tag}:rid:"

    @property
    def usage_stream(self) -> str:
        return f"{self.tag}:usage"

    @property
    def alerts(self) -> str:
        return f"{self.tag}:alerts"

    def refusals(self, period: str) -> str:
        return f"{self.tag}:rj:{period}"

    def key_rate_log(self, key_id: str) -> str:
        return f"{self.tag}:rl:k:{key_id}"

    def member_rate_log(self, scope: str) -> str:
        return f"{self.tag}:rl:m:{scope}"

    @property
    def team_rate_log(self) -> str:
        return f"{self.tag}:rl:t"

    def response(self, response_id: str) -> str:
        return f"{self.tag}:resp:{response_id}"

    def rate_keys(self, key_id: str, scope: str) -> list[str]:
        """The three rate logs a request of this key and scope may touch."""
        return [
            self.key_rate_log(key_id),
            self.member_rate_log(scope),
            self.team_rate_log,
        ]


def account_of_stream(stream: str) -> str:
    """``{acct:t_abc}:usage`` -> ``t_abc``."""
    return stream[len("{acct:") : stream.index("}")]
