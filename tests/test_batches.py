"""data/batches.py: the alignment rule, right padding and packing against explicit constructions."""

import numpy as np
import torch

from moekd.data.batches import longest_first, pack, response_positions, right_pad


def test_response_positions_predict_exactly_the_response_tokens():
    # 3 prompt tokens then 4 response tokens: positions 2..5 predict tokens 3..6
    assert response_positions(3, 7).tolist() == [2, 3, 4, 5]
    assert response_positions(1, 2).tolist() == [0]


def test_right_pad_against_an_explicit_layout():
    ids, attention, mask = right_pad([np.array([5, 6, 7]), np.array([8])], pad_id=1, marked=[[1, 2], [0]])
    assert ids.tolist() == [[5, 6, 7], [8, 1, 1]]
    assert attention.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert mask.tolist() == [[False, True, True], [True, False, False]]
    assert ids.dtype == torch.long and not right_pad([np.array([2])], 0)[2].any()


def test_pack_bounds_rows_times_longest_row():
    lengths = np.array([4, 2, 6, 3, 3, 9])
    batches = pack(np.arange(6), lengths, batch_tokens=12)
    assert [i for b in batches for i in b] == list(range(6))  # order kept, nothing dropped
    assert batches == [[0, 1], [2, 3], [4], [5]]  # [4, 2]: 2 x 4; [6, 3]: 2 x 6; 9 alone
    for b in batches[:-1]:
        assert len(b) * lengths[b].max() <= 12


def test_longest_first_then_pack_groups_similar_lengths():
    lengths = np.array([2, 9, 5, 5, 2])
    order = longest_first(range(5), lengths)
    assert order == [1, 2, 3, 0, 4]
    assert pack(order, lengths, 10) == [[1], [2, 3], [0, 4]]
