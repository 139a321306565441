"""Sign election and agreement (SEMANTICS.md section 4): hand-worked stacks and a loop reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergesmith.ops.consensus import agreement_mask, elect_sign

# Columns chosen so that: col 0 and col 3 elect differently under sum and count; col 2 is all
# zeros; col 4 has a zero entry in a column whose vote ties.
STACK = torch.tensor(
    [
        [1.0, -2.0, 0.0, 3.0, -1.0],
        [-3.0, 1.0, 0.0, -1.0, 1.0],
        [1.0, -0.5, 0.0, -1.0, 0.0],
    ]
)
# Column sums: -1, -1.5, 0, 1, 0.  Sign votes: +1, -1, 0, -1, 0.
SUM_SIGN = torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0])
COUNT_SIGN = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])


def test_sum_elects_the_sign_of_the_total() -> None:
    assert torch.equal(elect_sign(STACK, "sum"), SUM_SIGN)


def test_count_elects_the_sign_of_the_vote() -> None:
    assert torch.equal(elect_sign(STACK, "count"), COUNT_SIGN)


def test_agreement_under_sum_election() -> None:
    expected = torch.tensor(
        [
            [False, True, False, True, False],
            [True, False, False, False, True],
            [False, True, False, False, False],
        ]
    )
    assert torch.equal(agreement_mask(STACK, SUM_SIGN), expected)


def test_agreement_under_count_election() -> None:
    expected = torch.tensor(
        [
            [True, True, False, False, False],
            [False, False, False, True, True],
            [True, True, False, True, False],
        ]
    )
    assert torch.equal(agreement_mask(STACK, COUNT_SIGN), expected)


@pytest.mark.parametrize("method", ["sum", "count"])
def test_a_tied_election_goes_to_plus_one(method: str) -> None:
    stack = torch.tensor([[2.0, 0.0, -0.0], [-2.0, 0.0, -0.0]])
    assert torch.equal(elect_sign(stack, method), torch.ones(3))


def test_exact_zeros_never_agree_with_either_sign() -> None:
    stack = torch.tensor([[0.0, -0.0, 0.0, -0.0]])
    sign = torch.tensor([1.0, 1.0, -1.0, -1.0])
    assert not agreement_mask(stack, sign).any()


def test_unknown_consensus_method_is_rejected() -> None:
    with pytest.raises(ValueError):
        elect_sign(STACK, "majority")


def test_election_does_not_modify_the_stack() -> None:
    before = STACK.clone()
    agreement_mask(STACK, elect_sign(STACK, "sum"))
    agreement_mask(STACK, elect_sign(STACK, "count"))
    assert torch.equal(STACK, before)


def _loop_reference(stack: list[list[float]], method: str) -> tuple[list[float], list[list[bool]]]:
    def sgn(x: float) -> int:
        return (x > 0) - (x < 0)

    width = len(stack[0])
    signs = []
    for j in range(width):
        column = [row[j] for row in stack]
        total = sum(column) if method == "sum" else sum(sgn(x) for x in column)
        signs.append(1.0 if total >= 0 else -1.0)
    agree = [[x != 0 and sgn(x) == signs[j] for j, x in enumerate(row)] for row in stack]
    return signs, agree


@settings(max_examples=100, deadline=None)
@given(
    method=st.sampled_from(["sum", "count"]),
    stack=st.integers(1, 6).flatmap(
        lambda width: st.lists(
            # Dyadic values: float32 sums are exact, so the loop and torch see the same totals.
            st.lists(
                st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0]),
                min_size=width,
                max_size=width,
            ),
            min_size=1,
            max_size=5,
        )
    ),
)
def test_election_and_agreement_match_a_loop(method: str, stack: list[list[float]]) -> None:
    signs, agree = _loop_reference(stack, method)
    tensor = torch.tensor(stack)
    elected = elect_sign(tensor, method)
    assert elected.tolist() == signs
    assert agreement_mask(tensor, elected).tolist() == agree
