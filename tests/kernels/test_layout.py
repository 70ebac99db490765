"""How a plan maps onto the kernels' views: layout.classify's shapes and layout.family's four families,
the vocabulary both backends share."""

import pytest

from normlab.core.plan import batch_plan, group_plan, instance_plan, layer_plan
from normlab.kernels.layout import (
    CHANNEL_PLANES, CHANNEL_ROWS, ROW, ROW_CHANNELS_LAST, ChannelShape, RowShape, classify, family,
)


@pytest.mark.parametrize("plan, channels_last, expected", [
    (batch_plan((8, 4, 5, 5)), False, CHANNEL_PLANES),
    (batch_plan((8, 4, 5, 5)), True, CHANNEL_ROWS),
    (batch_plan((8, 4)), False, CHANNEL_ROWS),
    (batch_plan((8, 4, 1, 1)), False, CHANNEL_ROWS),
    (group_plan((2, 6, 3, 3), 3), False, ROW),
    (group_plan((2, 6, 3, 3), 3), True, ROW_CHANNELS_LAST),
    (instance_plan((2, 6, 3, 3)), True, ROW_CHANNELS_LAST),
    (layer_plan((2, 6, 3, 3), (3, 3)), True, ROW),  # γ varies along the spatial axes: not per channel
    (layer_plan((4, 7), (7,)), False, ROW),
])
def test_family(plan, channels_last, expected):
    assert family(plan, channels_last) == expected
    assert isinstance(classify(plan), ChannelShape if expected.startswith("channel") else RowShape)
