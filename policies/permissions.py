"""The role matrix of contract section 3: which role may take which action in a team.

One table, one function; every management endpoint asks ``allowed(role, action)`` and the tests
check every cell.
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
    VIEW_BILLING = "view_billing"  # balance, subscription, invoices; the audit log
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
    Action.MANAGE_BILLING: _OWNER,
    Action.TRANSFER_OWNERSHIP: _OWNER,
    Action.DELETE_TEAM: _OWNER,
}


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
