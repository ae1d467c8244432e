"""FeatureVector encode/decode in C++: round trips, wire compatibility, malformed input."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from carrara.core import FeatureVector, decode_feature_vector, encode_feature_vector
from carrara.errors import DecodeError, InvalidArgumentError
from carrara.v1 import feature_vector_pb2 as pb

int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@st.composite
def vectors(draw: st.DrawFn) -> tuple[str, str, int, np.ndarray, np.ndarray, int, int]:
    n = draw(st.integers(0, 70))
    values = draw(arrays(np.float32, n, elements=st.floats(width=32, allow_nan=False)))
    missing = draw(arrays(np.bool_, n))
    return (
        draw(st.text(max_size=40)),
        draw(st.text(max_size=20)),
        draw(st.integers(0, 2**32 - 1)),
        values,
        missing,
        draw(int64),
        draw(int64),
    )


@settings(max_examples=300, deadline=None)
@given(vectors())
def test_round_trip(v: tuple[str, str, int, np.ndarray, np.ndarray, int, int]) -> None:
    entity, group, version, values, missing, ts, created = v
    data = encode_feature_vector(entity, group, version, values, missing, ts, created)
    out = decode_feature_vector(data)
    assert (out.entity_id, out.group, out.group_version) == (entity, group, version)
    assert (out.event_timestamp_us, out.created_timestamp_us) == (ts, created)
    assert out.values.dtype == np.float32
    np.testing.assert_array_equal(out.values, values)
    np.testing.assert_array_equal(out.missing, missing)
    # The Python protobuf runtime reads the same bytes: the wire format is the contract.
    msg = pb.FeatureVector.FromString(data)
    assert msg.entity_id == entity and list(msg.values) == values.tolist()
    bitmap = np.unpackbits(np.frombuffer(msg.missing, np.uint8), bitorder="little")
    padded = np.zeros(max(len(bitmap), len(values)), bool)
    padded[: len(missing)] = missing
    np.testing.assert_array_equal(bitmap.astype(bool), padded[: len(bitmap)])


def test_python_encoded_bytes_decode_in_cpp() -> None:
    msg = pb.FeatureVector(
        entity_id="d-1", group="trips", group_version=4, event_timestamp_us=17, values=[1.5, -2.0]
    )
    msg.missing = bytes([0b10])
    out = decode_feature_vector(msg.SerializeToString())
    assert out.values.tolist() == [1.5, -2.0]
    assert out.missing.tolist() == [False, True]
    assert out.group_version == 4 and out.event_timestamp_us == 17


def test_nan_and_inf_survive() -> None:
    values = np.array([np.nan, np.inf, -np.inf, 0.0], np.float32)
    out = decode_feature_vector(encode_feature_vector("e", "g", 1, values))
    assert np.isnan(out.values[0]) and out.values[1] == np.inf and out.values[2] == -np.inf
    assert not out.missing.any()


def test_feature_vector_object() -> None:
    v = FeatureVector("e", "g", 2, [1, 2, 3], [False, True, False], 10, 11)
    assert len(v) == 3
    assert v == FeatureVector.decode(v.encode())
    assert v != FeatureVector("e", "g", 2, [1, 2, 4], [False, True, False], 10, 11)
    assert "entity_id='e'" in repr(v)
    with pytest.raises(TypeError):
        hash(v)
    with pytest.raises(InvalidArgumentError, match="one boolean per value"):
        FeatureVector("e", "g", 1, [1, 2], [True])
    with pytest.raises(InvalidArgumentError, match="one-dimensional"):
        FeatureVector("e", "g", 1, [[1, 2]])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x0a\x05ab", "malformed"),  # truncated string
        (b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", "malformed"),  # bad varint / tag
        (b"\x32\x03\x00\x00\x80", "malformed"),  # packed floats, length not a multiple of 4
        (
            pb.FeatureVector(values=[1.0], missing=b"\x01\x00").SerializeToString(),
            "bitmap has 2 bytes for 1 values",
        ),
        (
            pb.FeatureVector(values=[1.0, 2.0], missing=b"\x04").SerializeToString(),
            "marks value 2 missing but has only 2",
        ),
    ],
)
def test_malformed_input_raises_decode_error(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_feature_vector(data)


def test_wrong_type_is_type_error() -> None:
    with pytest.raises(TypeError, match="must be bytes"):
        FeatureVector.decode("not bytes")  # type: ignore[arg-type]


def test_fuzz_random_and_mutated_bytes_never_crash() -> None:
    rng = random.Random(1234)
    seed = encode_feature_vector("entity-1", "trips", 3, np.arange(20, dtype=np.float32), None, 5)
    decoded = errors = 0
    for i in range(20_000):
        if i % 2:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
        else:
            buf = bytearray(seed)
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(len(buf))] = rng.getrandbits(8)
            data = bytes(buf[: rng.randint(0, len(buf))])
        try:
            decode_feature_vector(data)
            decoded += 1
        except DecodeError:
            errors += 1
    assert decoded + errors == 20_000
    assert errors > 1_000 and decoded > 100  # both paths were really exercised
