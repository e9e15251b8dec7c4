// Protocol-buffer wire format, just enough to read and write the ONNX messages the EP touches (ModelProto,
// GraphProto, NodeProto, AttributeProto, TensorProto, ValueInfoProto) without linking protobuf or onnx.
// Unknown fields are carried over as raw bytes, so rewriting a graph keeps everything it does not change.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace maia::pb {

enum WireType { VARINT = 0, FIXED64 = 1, LEN = 2, FIXED32 = 5 };

struct Field {
  uint32_t number = 0;
  WireType wire = VARINT;
  uint64_t varint = 0;     // VARINT, FIXED64, FIXED32 payloads
  const uint8_t* data = nullptr;  // LEN payload
  size_t size = 0;
  const uint8_t* raw = nullptr;   // the whole field (tag included), to copy it unchanged
  size_t raw_size = 0;
  std::string str() const { return std::string(reinterpret_cast<const char*>(data), size); }
};

class Reader {
 public:
  Reader(const void* data, size_t size) : at_(static_cast<const uint8_t*>(data)), end_(at_ + size) {}
  explicit Reader(const Field& f) : Reader(f.data, f.size) {}

  bool next(Field& f) {
    if (at_ >= end_) return false;
    f.raw = at_;
    uint64_t tag = varint();
    f.number = static_cast<uint32_t>(tag >> 3);
    f.wire = static_cast<WireType>(tag & 7);
    switch (f.wire) {
      case VARINT: f.varint = varint(); break;
      case FIXED64: f.varint = fixed(8); break;
      case FIXED32: f.varint = fixed(4); break;
      case LEN: {
        uint64_t n = varint();
        if (n > static_cast<uint64_t>(end_ - at_)) throw std::runtime_error("protobuf: truncated field");
        f.data = at_;
        f.size = static_cast<size_t>(n);
        at_ += n;
        break;
      }
      default: throw std::runtime_error("protobuf: unsupported wire type (groups)");
    }
    f.raw_size = static_cast<size_t>(at_ - f.raw);
    return true;
  }

 private:
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (at_ >= end_) throw std::runtime_error("protobuf: truncated varint");
      uint8_t b = *at_++;
      v |= static_cast<uint64_t>(b & 0x7F) << shift;
      if (!(b & 0x80)) return v;
    }
    throw std::runtime_error("protobuf: bad varint");
  }
  uint64_t fixed(int n) {
    if (end_ - at_ < n) throw std::runtime_error("protobuf: truncated fixed field");
    uint64_t v = 0;
    std::memcpy(&v, at_, n);
    at_ += n;
    return v;
  }
  const uint8_t* at_;
  const uint8_t* end_;
};

// Repeated int64 fields come packed (LEN) or one per field (VARINT).
inline void read_int64s(const Field& f, std::vector<int64_t>& out) {
  if (f.wire == VARINT) {
    out.push_back(static_cast<int64_t>(f.varint));
    return;
  }
  const uint8_t* at = f.data;
  const uint8_t* end = f.data + f.size;
  while (at < end) {
    uint64_t v = 0;
    for (int shift = 0;; shift += 7) {
      if (at >= end || shift >= 64) throw std::runtime_error("protobuf: bad packed varint");
      uint8_t b = *at++;
      v |= static_cast<uint64_t>(b & 0x7F) << shift;
      if (!(b & 0x80)) break;
    }
    out.push_back(static_cast<int64_t>(v));
  }
}

class Writer {
 public:
  std::string out;

  void varint(uint64_t v) {
    while (v >= 0x80) {
      out += static_cast<char>((v & 0x7F) | 0x80);
      v >>= 7;
    }
    out += static_cast<char>(v);
  }
  void tag(uint32_t number, WireType wire) { varint((static_cast<uint64_t>(number) << 3) | wire); }
  void int_field(uint32_t number, int64_t v) {
    tag(number, VARINT);
    varint(static_cast<uint64_t>(v));
  }
  void bytes_field(uint32_t number, const void* data, size_t size) {
    tag(number, LEN);
    varint(size);
    out.append(static_cast<const char*>(data), size);
  }
  void bytes_field(uint32_t number, const std::string& s) { bytes_field(number, s.data(), s.size()); }
  void float_field(uint32_t number, float v) {
    tag(number, FIXED32);
    char buf[4];
    std::memcpy(buf, &v, 4);
    out.append(buf, 4);
  }
  void raw(const Field& f) { out.append(reinterpret_cast<const char*>(f.raw), f.raw_size); }
};

}  // namespace maia::pb
