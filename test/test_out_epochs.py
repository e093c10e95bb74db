"""audio/out epochs: chunks of an interrupted answer still in flight never play."""

from __future__ import annotations

from std_msgs.msg import UInt8MultiArray

from sonic_voice.ros.topics import EpochGate, msg_epoch, out_msg


def test_epoch_travels_in_the_layout_and_the_data_stays_plain_pcm() -> None:
    msg = out_msg(b"\x01\x00\x02\x00", 7)
    assert msg_epoch(msg) == 7
    assert bytes(msg.data) == b"\x01\x00\x02\x00"
    assert msg.layout.data_offset == 0 and msg.layout.dim[0].size == 4
    assert msg_epoch(UInt8MultiArray(data=b"\x00\x00")) is None


def test_gate_drops_stale_chunks_and_flushes_once_per_new_answer() -> None:
    gate = EpochGate()
    assert gate.admit(0) == (True, False)  # the first answer: nothing to flush
    assert gate.admit(0) == (True, False)
    assert gate.admit(1) == (True, True)  # barge-in marker: flush, then play the new epoch
    assert gate.admit(0) == (False, False)  # a chunk of the interrupted answer, late
    assert gate.admit(1) == (True, False)
    assert gate.admit(None) == (True, False)  # untagged (third-party) audio always plays
