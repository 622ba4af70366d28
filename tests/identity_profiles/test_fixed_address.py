"""FixedSlots: per-batch tensors copied to one address for every batch (what CUDA graphs need of static inputs)."""

from __future__ import annotations

import torch

from imagegen.identity.fixed_address import FixedSlots


def test_a_slot_keeps_its_address_across_batches_and_grows_once_for_a_larger_one():
    slots = FixedSlots()
    with torch.inference_mode():  # the renderer's mode; the slot is written again outside it below
        first = slots.hold("scale", torch.tensor([0.75, 0.5]))
    address = first.data_ptr()
    with torch.no_grad():
        second = slots.hold("scale", torch.tensor([0.25]))
    assert second.data_ptr() == address and second.tolist() == [0.25]
    assert first.tolist() == [0.25, 0.5]  # the same memory, written in place
    grown = slots.hold("scale", torch.tensor([1.0, 2.0, 3.0]))
    assert grown.tolist() == [1.0, 2.0, 3.0]
    assert slots.nbytes() == 4 * 4  # doubled to 4 rows: a batch of 4 next would not move it again
    address = grown.data_ptr()
    assert slots.hold("scale", torch.ones(4)).data_ptr() == address
    assert slots.hold("scale", torch.ones(2)).data_ptr() == address


def test_another_shape_or_dtype_gets_a_slot_of_its_own():
    slots = FixedSlots()
    floats = slots.hold("x", torch.zeros(2, 3))
    assert slots.hold("x", torch.zeros(2, 3, dtype=torch.float64)).dtype == torch.float64
    assert slots.hold("x", torch.zeros(2, 4)).shape == (2, 4)
    assert slots.hold("y", torch.zeros(2, 3)).data_ptr() != floats.data_ptr()
    slots.clear()
    assert slots.nbytes() == 0
