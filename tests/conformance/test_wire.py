"""The wire between the suite and a target's process, read as a hostile child would write it.

Tensors cross beside the pickle (protocol 5 out-of-band buffers); what the parent reads must still be primitives
only, in buffers of its own, and a frame that is not the protocol must be refused, never trusted.
"""

from __future__ import annotations

import io
import os
import pickle
import struct

import pytest
import torch

from lora_lab.conformance.isolation import wire


def _frame(data: bytes, sizes: list[int], buffers: list[bytes] = ()) -> io.BytesIO:
    return io.BytesIO(struct.pack(f"<QI{len(sizes)}Q", len(data), len(sizes), *sizes) + data + b"".join(buffers))


def test_a_tensor_crosses_out_of_band_and_arrives_as_a_copy_of_its_own():
    sent = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "wb", buffering=0) as out:
        wire.send(out, ["ok", wire.encode(sent)])
    with os.fdopen(read_fd, "rb", buffering=0) as inbox:
        reply = wire.receive(inbox)
    sent.fill_(-1)  # the sender's tensor changes after the send: what arrived must not
    got = wire.decode(reply[1])
    assert torch.equal(got, torch.arange(12, dtype=torch.float32).reshape(3, 4))
    assert torch.equal(wire.decode(reply[1]), got) and wire.decode(reply[1]).data_ptr() != got.data_ptr()


def test_a_pickle_that_names_a_class_is_refused():
    crafted = pickle.dumps(["ok", os.system], protocol=5)  # GLOBAL os.system: would be called by a trusting reader
    with pytest.raises(pickle.UnpicklingError, match="refusing posix.system|refusing os.system"):
        wire.receive(_frame(crafted, []))


def test_a_frame_with_more_buffers_than_the_protocol_allows_is_refused():
    with pytest.raises(ValueError, match="not the protocol"):
        wire.receive(_frame(b"", [0] * (wire.MAX_BUFFERS + 1)))


def test_a_pickle_that_asks_for_a_buffer_it_did_not_send_is_refused():
    buffers: list = []
    data = pickle.dumps(["ok", pickle.PickleBuffer(b"1234")], protocol=5, buffer_callback=buffers.append)
    with pytest.raises(pickle.UnpicklingError):
        wire.receive(_frame(data, []))  # NEXT_BUFFER with no buffer behind it


def test_a_frame_cut_short_is_the_end_of_the_connection():
    data, _ = wire.dumps(["ok", 1])
    with pytest.raises(EOFError):
        wire.receive(_frame(data, [8]))  # a buffer of 8 bytes announced, none sent
