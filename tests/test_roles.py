"""Tests of unifyreg.roles: Role labels and segment extraction."""

import pytest
import torch

from unifyreg.roles import Role, role_counts, role_segments, sample_segment

R = Role


def _batch():
    roles = torch.tensor(
        [
            [R.SPECIAL, R.TEXT_PROMPT, R.TEXT_PROMPT, R.SPECIAL, R.IMAGE_RESPONSE, R.PAD],
            [R.SPECIAL, R.IMAGE_PROMPT, R.TEXT_PROMPT, R.SPECIAL, R.TEXT_RESPONSE, R.SPECIAL],
        ]
    )
    hidden = torch.arange(3 * 2 * 6 * 4, dtype=torch.float32).view(3, 2, 6, 4)
    return hidden, roles


def test_role_segments_gather_tokens_in_order_with_mask():
    hidden, roles = _batch()
    Z, mask = role_segments(hidden, roles, Role.TEXT_PROMPT)
    assert Z.shape == (3, 2, 2, 4)
    assert mask.tolist() == [[True, True], [True, False]]
    torch.testing.assert_close(Z[:, 0], hidden[:, 0, [1, 2]])
    torch.testing.assert_close(Z[:, 1, :1], hidden[:, 1, [2]])


def test_role_absent_from_batch_gives_empty_segment():
    hidden, roles = _batch()
    Z, mask = role_segments(hidden, roles, Role.PAD)
    assert Z.shape == (3, 2, 1, 4) and mask.tolist() == [[True], [False]]
    roles_without = roles.clone()
    roles_without[roles_without == R.PAD] = R.SPECIAL
    Z, mask = role_segments(hidden, roles_without, Role.PAD)
    assert Z.shape == (3, 2, 0, 4) and mask.shape == (2, 0)


def test_sample_segment_and_counts():
    hidden, roles = _batch()
    torch.testing.assert_close(
        sample_segment(hidden, roles, Role.IMAGE_PROMPT, 1), hidden[:, 1, [1]]
    )
    assert role_counts(roles, Role.SPECIAL).tolist() == [2, 3]
    with pytest.raises(IndexError, match="sample 2"):
        sample_segment(hidden, roles, Role.TEXT_PROMPT, 2)


def test_shape_mismatch_and_bad_role_names_raise():
    hidden, roles = _batch()
    with pytest.raises(ValueError, match="does not match"):
        role_segments(hidden[:, :, :5], roles, Role.TEXT_PROMPT)
    assert Role.parse("image_response") is Role.IMAGE_RESPONSE
    with pytest.raises(ValueError, match="unknown role 'caption'.*text_prompt"):
        Role.parse("caption")


def test_role_sets_gather_the_union_in_position_order():
    hidden, roles = _batch()
    Z, mask = role_segments(hidden, roles, {Role.TEXT_PROMPT, Role.IMAGE_PROMPT})
    assert mask.tolist() == [[True, True], [True, True]]
    torch.testing.assert_close(Z[:, 1], hidden[:, 1, [1, 2]])
    assert role_counts(roles, [Role.TEXT_PROMPT, Role.IMAGE_PROMPT]).tolist() == [2, 2]
