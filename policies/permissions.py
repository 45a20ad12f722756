"""The role matrix of contract section 3: which role may take which action in a team.

One table, one function; every management endpoint asks ``allowed(role, action)`` and the tests
check every cell. Decisions about one member acting on another (role changes, removal, per-member
policy, billing mode, ownership transfer) are the pure functions below the table, built on it.
"""

from __future__ import annotations

from enum import StrEnum

OWNER = "owner"
ADMIN = "admin"
MEMBER = "member"
ROLES = (OWNER, ADMIN, MEMBER)


class Action(StrEnum):
    VIEW_TEAM = "view_team"  # overview and team usage
    MANAGE_OWN_KEYS = "manage_own_keys"  # create / revoke own team keys
    MANAGE_ALL_KEYS = "manage_all_keys"  # list / revoke any member's team keys
    MANAGE_MEMBERS = "manage_members"  # invite, remove, approve join requests, roles below owner
    MANAGE_POLICIES = "manage_policies"  # default member limit, overrides, enforcement, models
    VIEW_BILLING = "view_billing"  # balance, subscription, invoices
    VIEW_AUDIT = "view_audit"  # the team's audit log
    MANAGE_BILLING = "manage_billing"  # subscription / seats, spending limit, billing settings
    TRANSFER_OWNERSHIP = "transfer_ownership"
    DELETE_TEAM = "delete_team"


_EVERYONE = frozenset(ROLES)
_STAFF = frozenset((OWNER, ADMIN))
_OWNER = frozenset((OWNER,))

MATRIX: dict[Action, frozenset[str]] = {
    Action.VIEW_TEAM: _EVERYONE,
    Action.MANAGE_OWN_KEYS: _EVERYONE,
    Action.MANAGE_ALL_KEYS: _STAFF,
    Action.MANAGE_MEMBERS: _STAFF,
    Action.MANAGE_POLICIES: _STAFF,
    Action.VIEW_BILLING: _STAFF,
    Action.VIEW_AUDIT: _STAFF,
    Action.MANAGE_BILLING: _OWNER,
    Action.TRANSFER_OWNERSHIP: _OWNER,
    Action.DELETE_TEAM: _OWNER,
}


#: Roles an invitation or a role change may give (the owner role moves only by transfer).
ASSIGNABLE_ROLES = (ADMIN, MEMBER)


def allowed(role: str | None, action: Action) -> bool:
    return role is not None and role in MATRIX[action]


def may_set_role(actor: str, target_current: str, target_new: str) -> bool:
    """Role changes: never to or from owner (that is a transfer); admins change members and
    admins below the owner; members change nobody."""
    if OWNER in (target_current, target_new):
        return False
    return allowed(actor, Action.MANAGE_MEMBERS)


def may_remove(actor: str, target: str, *, self_removal: bool) -> bool:
    """Anyone but the owner may leave; owners and admins remove anyone below the owner."""
    if target == OWNER:
        return False
    if self_removal:
        return True
    return allowed(actor, Action.MANAGE_MEMBERS)


def may_manage_member(actor: str, target: str) -> bool:
    """Per-member policy (monthly limit override, enforcement) of ``target``: owners and admins,
    but only the owner touches the owner's own settings ("admins cannot change the owner")."""
    if not allowed(actor, Action.MANAGE_POLICIES):
        return False
    return target != OWNER or actor == OWNER


def may_set_billing_mode(*, self_change: bool) -> bool:
    """Whether a member's team keys bill the team or their own balance is theirs alone."""
    return self_change


def may_transfer(actor: str, target: str, *, self_target: bool) -> bool:
    """Ownership moves from the owner to another existing member (admin or member)."""
    return (
        allowed(actor, Action.TRANSFER_OWNERSHIP) and target in ASSIGNABLE_ROLES and not self_target
    )
