// FeatureVector codec: round trips, the exact wire format, malformed input, and a fuzz loop.
#include <gtest/gtest.h>
#include <google/protobuf/stubs/logging.h>

#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "carrara/core/feature_vector.hpp"
#include "test_util.hpp"

namespace carrara::core {
namespace {

using testing::expect_error;

// A minimal protobuf writer, independent of the generated code, for hand-built inputs.
class Wire {
 public:
  Wire& varint(std::uint64_t v) {
    while (v >= 0x80) {
      out_.push_back(static_cast<char>((v & 0x7F) | 0x80));
      v >>= 7;
    }
    out_.push_back(static_cast<char>(v));
    return *this;
  }
  Wire& tag(std::uint32_t field, std::uint32_t wire_type) { return varint((field << 3) | wire_type); }
  Wire& bytes(std::uint32_t field, std::string_view b) {
    tag(field, 2).varint(b.size());
    out_.append(b);
    return *this;
  }
  Wire& uint(std::uint32_t field, std::uint64_t v) { return tag(field, 0).varint(v); }
  Wire& floats(std::uint32_t field, const std::vector<float>& vs) {
    std::string b;
    for (float f : vs) {
      char buf[4];
      std::memcpy(buf, &f, 4);  // little-endian host, as protobuf's fixed32
      b.append(buf, 4);
    }
    return bytes(field, b);
  }
  Wire& raw(std::string_view b) {
    out_.append(b);
    return *this;
  }
  const std::string& str() const { return out_; }

 private:
  std::string out_;
};

// Silences protobuf's error log (e.g. "invalid UTF-8") while the fuzz loop runs.
class QuietProtobufLog {
 public:
  QuietProtobufLog() : previous_(google::protobuf::SetLogHandler(nullptr)) {}
  ~QuietProtobufLog() { google::protobuf::SetLogHandler(previous_); }
  QuietProtobufLog(const QuietProtobufLog&) = delete;
  QuietProtobufLog& operator=(const QuietProtobufLog&) = delete;

 private:
  google::protobuf::LogHandler* previous_;
};

DecodedVector sample(std::size_t n, std::vector<std::size_t> missing_at = {}) {
  DecodedVector v;
  v.entity_id = "driver-1042";
  v.group = "trips";
  v.group_version = 7;
  v.event_timestamp_us = 1'700'000'000'123'456;
  v.created_timestamp_us = 1'700'000'000'999'999;
  for (std::size_t i = 0; i < n; ++i) v.values.push_back(static_cast<float>(i) * 0.5f - 3.25f);
  if (!missing_at.empty()) {
    v.missing.assign(n, 0);
    for (std::size_t i : missing_at) v.missing[i] = 1;
  }
  return v;
}

void expect_same(const DecodedVector& got, const DecodedVector& want) {
  EXPECT_EQ(got.entity_id, want.entity_id);
  EXPECT_EQ(got.group, want.group);
  EXPECT_EQ(got.group_version, want.group_version);
  EXPECT_EQ(got.event_timestamp_us, want.event_timestamp_us);
  EXPECT_EQ(got.created_timestamp_us, want.created_timestamp_us);
  ASSERT_EQ(got.values.size(), want.values.size());
  for (std::size_t i = 0; i < want.values.size(); ++i) {
    // Bitwise: NaN payloads and -0.0 survive.
    EXPECT_EQ(std::bit_cast<std::uint32_t>(got.values[i]), std::bit_cast<std::uint32_t>(want.values[i]))
        << "value " << i;
  }
  ASSERT_EQ(got.missing.size(), got.values.size());
  for (std::size_t i = 0; i < want.values.size(); ++i) {
    const bool want_missing = !want.missing.empty() && want.missing[i] != 0;
    EXPECT_EQ(got.missing[i] != 0, want_missing) << "missing " << i;
    EXPECT_EQ(got.present(i), !want_missing);
  }
  EXPECT_FALSE(got.present(got.values.size()));
}

TEST(Codec, RoundTrip) {
  const std::vector<DecodedVector> cases = {
      sample(0),
      sample(1),
      sample(32),
      sample(8, {0, 7}),
      sample(9, {8}),                 // the only missing value in the second byte
      sample(20, {3, 9}),             // trailing present values: the bitmap stops at byte 2
      sample(64, {0, 1, 2, 63}),
      sample(3, {0, 1, 2}),           // all missing
      sample(17, {}),
  };
  for (const DecodedVector& want : cases) {
    const std::string bytes = encode_feature_vector(want);
    DecodedVector got;
    decode_feature_vector(bytes, got);
    expect_same(got, want);
    VectorPtr p = decode_feature_vector(bytes);
    expect_same(*p, want);
  }
}

TEST(Codec, RoundTripSpecialFloatsAndExtremes) {
  DecodedVector v;
  v.entity_id = std::string(300, 'e');  // a length that needs a two-byte varint
  v.group = "g";
  v.group_version = std::numeric_limits<std::uint32_t>::max();
  v.event_timestamp_us = std::numeric_limits<std::int64_t>::min();
  v.created_timestamp_us = -1;
  v.values = {std::numeric_limits<float>::quiet_NaN(), -0.0f, std::numeric_limits<float>::infinity(),
              -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::denorm_min(),
              std::numeric_limits<float>::max()};
  DecodedVector got;
  decode_feature_vector(encode_feature_vector(v), got);
  expect_same(got, v);
}

TEST(Codec, EmptyVectorEncodesToNothing) {
  // proto3 writes no default fields: an all-default vector is zero bytes, and decodes back.
  DecodedVector empty;
  EXPECT_EQ(encode_feature_vector(empty), "");
  DecodedVector got = sample(5, {1});
  decode_feature_vector("", got);  // reuse: every field must be reset
  expect_same(got, empty);
}

TEST(Codec, WireFormatIsTheProtoSchema) {
  DecodedVector v;
  v.entity_id = "e1";
  v.group = "g";
  v.group_version = 3;
  v.event_timestamp_us = 5;
  v.created_timestamp_us = 6;
  v.values = {1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f, 8.0f, 9.0f, 10.0f};
  v.missing = {0, 1, 0, 0, 0, 0, 0, 0, 1, 0};
  const std::string want = Wire()
                               .bytes(1, "e1")
                               .bytes(2, "g")
                               .uint(3, 3)
                               .uint(4, 5)
                               .uint(5, 6)
                               .floats(6, v.values)
                               .bytes(7, std::string("\x02\x01", 2))
                               .str();
  EXPECT_EQ(encode_feature_vector(v), want);
}

TEST(Codec, DecodesHandBuiltInput) {
  // Fields out of order, values split over two packed runs plus one unpacked, short bitmap.
  const std::string bytes = Wire()
                                .bytes(7, std::string("\x04", 1))
                                .floats(6, {1.5f, 2.5f})
                                .bytes(2, "grp")
                                .tag(6, 5)
                                .raw(std::string("\x00\x00\x40\x40", 4))  // 3.0f, unpacked
                                .floats(6, {4.5f, 5.5f, 6.5f, 7.5f, 8.5f, 9.5f, 10.5f})
                                .bytes(1, "ent")
                                .tag(3, 2).varint(1).raw("x")  // wrong wire type: an unknown field
                                .uint(3, 2)
                                .uint(99, 12345)  // unknown field: skipped
                                .str();
  DecodedVector got;
  decode_feature_vector(bytes, got);
  EXPECT_EQ(got.entity_id, "ent");
  EXPECT_EQ(got.group, "grp");
  EXPECT_EQ(got.group_version, 2u);
  EXPECT_EQ(got.values, (std::vector<float>{1.5f, 2.5f, 3.0f, 4.5f, 5.5f, 6.5f, 7.5f, 8.5f, 9.5f, 10.5f}));
  EXPECT_EQ(got.missing, (std::vector<std::uint8_t>{0, 0, 1, 0, 0, 0, 0, 0, 0, 0}));
}

TEST(Codec, EncodeRejectsBadMask) {
  DecodedVector v = sample(4);
  v.missing = {0, 1};
  expect_error([&] { (void)encode_feature_vector(v); }, ErrorCode::kInvalidArgument, {"2", "4"});
}

TEST(Codec, EncodeRejectsInvalidUtf8) {
  // proto3 strings: decode rejects them, so encode must not produce them.
  DecodedVector v = sample(2);
  v.entity_id = "bad-\xc3\x28";
  expect_error([&] { (void)encode_feature_vector(v); }, ErrorCode::kInvalidArgument, {"entity_id", "UTF-8"});
  v = sample(2);
  v.group = "\xff";
  expect_error([&] { (void)encode_feature_vector(v); }, ErrorCode::kInvalidArgument, {"group", "UTF-8"});
  v = sample(2);
  v.entity_id = "\xc3\xa9t\xc3\xa9-\xf0\x9f\x9a\x97";  // valid multi-byte UTF-8 is fine
  expect_same(*decode_feature_vector(encode_feature_vector(v)), v);
}

TEST(Codec, TruncatedInputThrows) {
  const std::string bytes = encode_feature_vector(sample(32, {5}));
  // Every strict prefix that cuts a field in half must be rejected (prefixes ending on a field
  // boundary are valid messages).
  int rejected = 0;
  for (std::size_t len = 0; len < bytes.size(); ++len) {
    DecodedVector out;
    try {
      decode_feature_vector(std::string_view(bytes).substr(0, len), out);
      EXPECT_EQ(out.missing.size(), out.values.size());
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kDecode);
      ++rejected;
    }
  }
  EXPECT_GT(rejected, static_cast<int>(bytes.size()) - 10);
  // Cut inside the packed values specifically.
  const std::string cut = Wire().bytes(2, "g").tag(6, 2).varint(128).raw(std::string(64, '\0')).str();
  expect_error([&] { (void)decode_feature_vector(cut); }, ErrorCode::kDecode, {"malformed"});
}

TEST(Codec, GarbageThrows) {
  const std::vector<std::string> cases = {
      std::string("\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", 11),  // over-long varint tag
      std::string("\x0a\x05\x61", 3),          // string length past the end
      std::string("\x00", 1),                  // field number 0
      std::string("\x0f", 1),                  // wire type 7
      std::string("\x32\x03\x00\x00\x00", 5),  // packed floats, length not a multiple of 4
      std::string("\x0a\x02\xc3\x28", 4),      // entity_id that is not UTF-8 (proto3 string)
  };
  QuietProtobufLog quiet;
  for (std::size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE("case " + std::to_string(i));
    expect_error([&] { (void)decode_feature_vector(cases[i]); }, ErrorCode::kDecode);
  }
}

TEST(Codec, BitmapLongerThanValuesThrows) {
  // 8 values need one byte; two (even all-zero) are rejected.
  const std::string bytes = Wire()
                                .floats(6, std::vector<float>(8, 1.0f))
                                .bytes(7, std::string("\x00\x00", 2))
                                .str();
  expect_error([&] { (void)decode_feature_vector(bytes); }, ErrorCode::kDecode, {"2 bytes", "8 values"});
  // No values at all, one bitmap byte.
  expect_error([&] { (void)decode_feature_vector(Wire().bytes(7, std::string("\x01", 1)).str()); },
               ErrorCode::kDecode);
}

TEST(Codec, BitmapBitBeyondValuesThrows) {
  // 10 values, bit 10 set (byte 1, bit 2).
  const std::string bytes = Wire()
                                .floats(6, std::vector<float>(10, 1.0f))
                                .bytes(7, std::string("\x01\x04", 2))
                                .str();
  DecodedVector out = sample(3, {1});
  const DecodedVector before = out;
  expect_error([&] { decode_feature_vector(bytes, out); }, ErrorCode::kDecode, {"value 10", "10"});
  // A failed decode leaves the output as it was.
  expect_same(out, before);
  // The same bitmap over 11 values is fine.
  const std::string ok = Wire()
                             .floats(6, std::vector<float>(11, 1.0f))
                             .bytes(7, std::string("\x01\x04", 2))
                             .str();
  VectorPtr v = decode_feature_vector(ok);
  EXPECT_EQ(v->missing, (std::vector<std::uint8_t>{1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}));
}

TEST(Codec, DecodeAfterFailureIsClean) {
  // The per-thread scratch message must not carry anything from a failed parse.
  const std::string good = encode_feature_vector(sample(4, {2}));
  const std::string bad = Wire().floats(6, {1.0f, 2.0f}).bytes(7, std::string("\x08", 1)).str();
  for (int i = 0; i < 3; ++i) {
    EXPECT_THROW((void)decode_feature_vector(bad), Error);
    expect_same(*decode_feature_vector(good), sample(4, {2}));
  }
}

TEST(Codec, DecodeFromManyThreads) {
  // Each thread has its own scratch message; it is freed when the thread ends (LSan checks).
  std::vector<std::string> inputs;
  for (std::size_t n = 0; n < 40; ++n) inputs.push_back(encode_feature_vector(sample(n, n > 3 ? std::vector<std::size_t>{n / 2} : std::vector<std::size_t>{})));
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      DecodedVector out;
      for (int i = 0; i < 2'000; ++i) {
        const std::size_t n = static_cast<std::size_t>(i * 7 + t) % inputs.size();
        decode_feature_vector(inputs[n], out);
        if (out.values.size() != n || (n > 3 && out.missing[n / 2] != 1)) wrong.fetch_add(1);
        if (i % 100 == 0) {
          EXPECT_THROW((void)decode_feature_vector("\xff"), Error);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(wrong.load(), 0);
}

TEST(Codec, FuzzOnlyEverThrowsError) {
  QuietProtobufLog quiet;
  std::mt19937_64 rng(0xC0FFEE);
  std::vector<std::string> seeds;
  for (std::size_t n : {0, 1, 7, 8, 9, 32, 100}) {
    DecodedVector v = sample(n);
    if (n > 0) {
      v.missing.assign(n, 0);
      v.missing[n - 1] = 1;
      v.missing[0] = 1;
    }
    seeds.push_back(encode_feature_vector(v));
  }
  auto byte = [&] { return static_cast<char>(rng() & 0xFF); };
  int ok = 0, rejected = 0;
  constexpr int kIterations = 200'000;
  DecodedVector out;
  for (int it = 0; it < kIterations; ++it) {
    std::string input;
    const auto mode = rng() % 4;
    if (mode == 0) {  // random bytes
      input.resize(rng() % 64);
      for (char& c : input) c = byte();
    } else {  // a valid message, mutated
      input = seeds[rng() % seeds.size()];
      const int edits = 1 + static_cast<int>(rng() % 4);
      for (int e = 0; e < edits; ++e) {
        const auto kind = rng() % 4;
        if (kind == 0 && !input.empty()) {
          input[rng() % input.size()] = byte();
        } else if (kind == 1 && !input.empty()) {
          input[rng() % input.size()] ^= static_cast<char>(1U << (rng() % 8));
        } else if (kind == 2) {
          input.resize(input.empty() ? 0 : rng() % input.size());
        } else {
          input.insert(input.begin() + static_cast<std::ptrdiff_t>(input.empty() ? 0 : rng() % input.size()),
                       byte());
        }
      }
    }
    try {
      decode_feature_vector(input, out);
      ++ok;
      ASSERT_EQ(out.missing.size(), out.values.size());
      // Whatever decodes must re-encode and decode to the same vector.
      DecodedVector again;
      decode_feature_vector(encode_feature_vector(out), again);
      expect_same(again, out);
    } catch (const Error& e) {
      ASSERT_EQ(e.code(), ErrorCode::kDecode) << e.what();
      ++rejected;
    } catch (const std::exception& e) {
      FAIL() << "non-carrara exception on iteration " << it << ": " << e.what();
    } catch (...) {
      FAIL() << "unknown exception on iteration " << it;
    }
  }
  EXPECT_EQ(ok + rejected, kIterations);
  EXPECT_GT(ok, 1000);
  EXPECT_GT(rejected, 1000);
}

}  // namespace
}  // namespace carrara::core
