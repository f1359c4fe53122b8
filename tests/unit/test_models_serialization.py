"""models.serialization: exact round trips, and every kind of damage is a SerializationError."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from fakes import crafted_blob
from models.serialization import SerializationError, dumps, from_b64, loads, to_b64

META = {"architecture": "dense_ae/3-2-3/tanh", "model_version": 7, "note": "ü"}


@settings(max_examples=40, deadline=None)
@given(st.lists(arrays(np.float64, array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)), max_size=4))
def test_round_trip_is_exact(weights):
    out, meta = loads(dumps(weights, META))
    assert meta == META
    assert len(out) == len(weights)
    for a, b in zip(weights, out):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)  # NaN and inf included


def test_header_names_architecture_version_and_shapes():
    blob = dumps([np.zeros((2, 3)), np.ones(3)], META)
    assert blob.startswith(b"FLEADW")
    assert b'"architecture":"dense_ae/3-2-3/tanh"' in blob and b'"shapes":[[2,3],[3]]' in blob


def test_every_single_byte_flip_is_detected():
    blob = dumps([np.arange(6.0).reshape(2, 3)], {"architecture": "x", "model_version": 1})
    for i in range(len(blob)):
        damaged = bytearray(blob)
        damaged[i] ^= 0x01
        with pytest.raises(SerializationError):
            loads(bytes(damaged))


@pytest.mark.parametrize("cut", [0, 5, 11, 40, -1])
def test_truncation_is_detected(cut):
    blob = dumps([np.arange(6.0)], META)
    with pytest.raises(SerializationError):
        loads(blob[:cut])


def test_wrong_magic_and_expected_shapes():
    blob = dumps([np.zeros((2, 2))], META)
    with pytest.raises(SerializationError, match="magic"):
        loads(b"PICKLE!!" + blob[8:])
    with pytest.raises(SerializationError, match="shape mismatch"):
        loads(blob, expected_shapes=[(2, 3)])
    assert loads(blob, expected_shapes=[(2, 2)])[0][0].shape == (2, 2)


def test_base64_helpers():
    blob = dumps([np.ones(2)], META)
    assert from_b64(to_b64(blob)) == blob
    with pytest.raises(SerializationError, match="base64"):
        from_b64("not base64 !")


def test_float32_arrays_stay_float32_and_float64_blobs_keep_format_1():
    factor = np.arange(6, dtype=np.float32).reshape(2, 3)
    blob = dumps([factor, np.ones(2)], META)
    out, _ = loads(blob)
    assert out[0].dtype == np.float32 and out[1].dtype == np.float64
    np.testing.assert_array_equal(out[0], factor)
    assert len(blob) < len(dumps([factor.astype(np.float64), np.ones(2)], META))
    assert b'"format_version":1' in dumps([np.ones(2)], META) and b'"format_version":2' in blob
    damaged = bytearray(blob)
    damaged[-1] ^= 0x01
    with pytest.raises(SerializationError):
        loads(bytes(damaged))




def _crafted(changes: dict, drop: tuple[str, ...] = ()) -> bytes:
    return crafted_blob(dumps([np.ones((3, 2), dtype=np.float32), np.zeros(4)], META), drop, **changes)

@pytest.mark.parametrize("changes", [
    {"shapes": [[-3], [4]]},                       # negative sizes that add up to the payload's length
    {"shapes": [[3, 2.0], [4]]},                   # not an integer
    {"shapes": [[3, True], [4]]},
    {"dtypes": [["<f4"], "<f8"]},                  # unhashable
    {"dtypes": [{"a": 1}, "<f8"]},
    {"meta": ["architecture"]},                    # not an object: callers read meta.get(...)
    {"meta": None},
    {"shapes": "3,2"},
])
def test_a_crafted_header_with_a_valid_digest_is_a_serialization_error(changes):
    """Found by fuzzing headers with their digest recomputed: these raised ValueError, KeyError or TypeError (or
    returned a meta that was no dict), which the REST API turned into a 500 instead of a 400 with the reason."""
    with pytest.raises(SerializationError):
        loads(_crafted(changes))


def test_a_header_without_meta_reads_as_no_metadata():
    assert loads(_crafted({}))[1] == META and loads(_crafted({}, drop=("meta",)))[1] == {}
