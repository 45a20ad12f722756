"""The role matrix of contract section 3 and the member-on-member decisions, cell by cell.

The expected tables are written out here by hand from the contract, not derived from
``policies.permissions``: a change to the module that breaks a cell fails here.
"""

from __future__ import annotations

import itertools

import pytest

from policies.permissions import (
    ADMIN,
    MATRIX,
    MEMBER,
    OWNER,
    ROLES,
    Action,
    allowed,
    may_manage_member,
    may_remove,
    may_set_billing_mode,
    may_set_role,
    may_transfer,
)

Y, N = True, False

#                                       owner admin member
CONTRACT: dict[Action, tuple[bool, bool, bool]] = {
    Action.VIEW_TEAM: (Y, Y, Y),
    Action.MANAGE_OWN_KEYS: (Y, Y, Y),
    Action.MANAGE_ALL_KEYS: (Y, Y, N),
    Action.MANAGE_MEMBERS: (Y, Y, N),
    Action.MANAGE_POLICIES: (Y, Y, N),
    Action.VIEW_BILLING: (Y, Y, N),
    Action.VIEW_AUDIT: (Y, Y, N),
    Action.MANAGE_BILLING: (Y, N, N),
    Action.TRANSFER_OWNERSHIP: (Y, N, N),
    Action.DELETE_TEAM: (Y, N, N),
}

CELLS = [(action, role, CONTRACT[action][i]) for action in Action for i, role in enumerate(ROLES)]


def test_every_action_is_in_the_contract_table_and_the_matrix() -> None:
    assert set(CONTRACT) == set(Action) == set(MATRIX)
    assert ROLES == (OWNER, ADMIN, MEMBER)


@pytest.mark.parametrize(("action", "role", "expected"), CELLS)
def test_matrix_cell(action: Action, role: str, expected: bool) -> None:
    assert allowed(role, action) is expected


@pytest.mark.parametrize("action", list(Action))
@pytest.mark.parametrize("role", [None, "", "Owner", "superuser", "removed"])
def test_no_role_may_do_nothing(action: Action, role: str | None) -> None:
    assert allowed(role, action) is False


def _set_role(actor: str, current: str, new: str) -> bool:
    # Contract: never to or from owner (that is a transfer); owners and admins change the roles
    # of everyone below the owner; members change nobody.
    return OWNER not in (current, new) and actor in (OWNER, ADMIN)


@pytest.mark.parametrize(("actor", "current", "new"), list(itertools.product(ROLES, ROLES, ROLES)))
def test_may_set_role_every_combination(actor: str, current: str, new: str) -> None:
    assert may_set_role(actor, current, new) is _set_role(actor, current, new)


SET_ROLE_SPOT_CHECKS = [
    (OWNER, MEMBER, ADMIN, Y),
    (OWNER, ADMIN, MEMBER, Y),
    (ADMIN, MEMBER, ADMIN, Y),
    (ADMIN, ADMIN, MEMBER, Y),
    (ADMIN, OWNER, ADMIN, N),  # admins cannot change the owner
    (OWNER, OWNER, ADMIN, N),  # the owner steps down only by transfer
    (OWNER, MEMBER, OWNER, N),  # never a second owner
    (MEMBER, MEMBER, ADMIN, N),
    (MEMBER, ADMIN, MEMBER, N),
]


@pytest.mark.parametrize(("actor", "current", "new", "expected"), SET_ROLE_SPOT_CHECKS)
def test_may_set_role_spot_checks(actor: str, current: str, new: str, expected: bool) -> None:
    assert may_set_role(actor, current, new) is expected


#            actor   target  self   -> allowed
REMOVE = [
    (OWNER, OWNER, Y, N),  # the owner cannot leave without transferring
    (OWNER, ADMIN, N, Y),
    (OWNER, MEMBER, N, Y),
    (ADMIN, OWNER, N, N),
    (ADMIN, ADMIN, N, Y),
    (ADMIN, ADMIN, Y, Y),
    (ADMIN, MEMBER, N, Y),
    (MEMBER, OWNER, N, N),
    (MEMBER, ADMIN, N, N),
    (MEMBER, MEMBER, N, N),
    (MEMBER, MEMBER, Y, Y),
]


def test_remove_table_covers_every_possible_case() -> None:
    possible = {
        (a, t, s)
        for a, t, s in itertools.product(ROLES, ROLES, (True, False))
        if not s or a == t  # removing yourself: actor and target are the same membership
        if not (a == t == OWNER and not s)  # one owner: an owner removing another owner
    }
    assert {(a, t, s) for a, t, s, _ in REMOVE} == possible


@pytest.mark.parametrize(("actor", "target", "self_removal", "expected"), REMOVE)
def test_may_remove(actor: str, target: str, self_removal: bool, expected: bool) -> None:
    assert may_remove(actor, target, self_removal=self_removal) is expected


#                 actor:  owner admin member   (target role)
MANAGE_MEMBER = {
    OWNER: (Y, N, N),
    ADMIN: (Y, Y, N),
    MEMBER: (Y, Y, N),
}


@pytest.mark.parametrize(("actor", "target"), list(itertools.product(ROLES, ROLES)))
def test_may_manage_member(actor: str, target: str) -> None:
    assert may_manage_member(actor, target) is MANAGE_MEMBER[target][ROLES.index(actor)]


@pytest.mark.parametrize("self_change", [True, False])
def test_billing_mode_is_the_members_own_choice(self_change: bool) -> None:
    assert may_set_billing_mode(self_change=self_change) is self_change


@pytest.mark.parametrize(
    ("actor", "target", "self_target"), list(itertools.product(ROLES, ROLES, (True, False)))
)
def test_may_transfer(actor: str, target: str, self_target: bool) -> None:
    expected = actor == OWNER and target in (ADMIN, MEMBER) and not self_target
    assert may_transfer(actor, target, self_target=self_target) is expected
