"""The groups whose losses the trainer logs: ``loss/<role>``, ``loss/turn_<position>`` and ``loss/turn_<k>``.

Index 0 of the role groups is "no role" (scaffolding, code -1), then the roles in code order; turn positions are
first/middle/last/only among the messages of a role; turn index k (1-based, the k-th message of its role) has a
last group holding turn ``DEFAULT_MAX_TURN_INDEX`` and later ones.
"""
from __future__ import annotations

from ..token_codes import DEFAULT_MAX_TURN_INDEX, TURN_POSITIONS, role_names, turn_index_names

ROLE_GROUPS: tuple[str, ...] = ("scaffolding",) + role_names()
TURN_POSITION_GROUPS: tuple[str, ...] = tuple(f"turn_{position}" for position in TURN_POSITIONS)
TURN_INDEX_GROUPS: tuple[str, ...] = turn_index_names(DEFAULT_MAX_TURN_INDEX)
