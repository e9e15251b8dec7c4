// A small JSON reader and writer for the EP's data files: Maia program headers, side-file indexes, device profiles
// and the capability table (runtime/capability_table.json). Parses the JSON the Python side writes (json.dumps);
// dump() writes what json.dumps(sort_keys=True, separators=(",", ":")) writes for the same values.
#pragma once

#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace maia {

struct Json {
  enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
  bool b = false;
  double num = 0;
  std::string str;
  std::vector<Json> arr;
  std::map<std::string, Json> obj;

  bool has(const std::string& key) const { return kind == Object && obj.count(key) > 0; }
  const Json& operator[](const std::string& key) const {
    static const Json null_value;
    if (kind != Object) return null_value;
    auto it = obj.find(key);
    return it == obj.end() ? null_value : it->second;
  }
  const Json& operator[](size_t i) const { return arr.at(i); }
  size_t size() const { return kind == Array ? arr.size() : obj.size(); }
  int64_t as_int() const {
    if (kind != Number) throw std::runtime_error("JSON: expected a number");
    return static_cast<int64_t>(num);
  }
  const std::string& as_str() const {
    if (kind != String) throw std::runtime_error("JSON: expected a string");
    return str;
  }
  // a profile figure: a plain number or {"value": N, ...}
  double figure() const { return kind == Object ? (*this)["value"].num : num; }

  static Json of(double v) {
    Json j;
    j.kind = Number;
    j.num = v;
    return j;
  }
  static Json of(const std::string& s) {
    Json j;
    j.kind = String;
    j.str = s;
    return j;
  }
  static Json of(const char* s) { return of(std::string(s)); }
  static Json list() {
    Json j;
    j.kind = Array;
    return j;
  }
  static Json object() {
    Json j;
    j.kind = Object;
    return j;
  }
  Json& set(const std::string& key, Json value) {
    kind = Object;
    return obj[key] = std::move(value);
  }
  Json& push(Json value) {
    kind = Array;
    arr.push_back(std::move(value));
    return arr.back();
  }

  std::string dump() const {
    std::string out;
    write(out);
    return out;
  }

  static Json parse(const char* begin, size_t length) {
    Parser p{begin, begin + length};
    Json out = p.value();
    p.skip();
    if (p.at != p.end) throw std::runtime_error("JSON: trailing characters");
    return out;
  }
  static Json parse(const std::string& text) { return parse(text.data(), text.size()); }

 private:
  void write(std::string& out) const {
    switch (kind) {
      case Null: out += "null"; return;
      case Bool: out += b ? "true" : "false"; return;
      case Number: {
        char buf[32];
        if (std::isnan(num)) out += "NaN";
        else if (std::isinf(num)) out += num > 0 ? "Infinity" : "-Infinity";
        else if (num == std::floor(num) && std::fabs(num) < 9.0e15) {
          std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(num));
          out += buf;
        } else {
          std::snprintf(buf, sizeof buf, "%.17g", num);
          out += buf;
        }
        return;
      }
      case String: write_string(str, out); return;
      case Array: {
        out += '[';
        for (size_t i = 0; i < arr.size(); ++i) {
          if (i) out += ',';
          arr[i].write(out);
        }
        out += ']';
        return;
      }
      case Object: {
        out += '{';
        bool first = true;
        for (const auto& [key, value] : obj) {  // std::map: sorted keys, as sort_keys=True
          if (!first) out += ',';
          first = false;
          write_string(key, out);
          out += ':';
          value.write(out);
        }
        out += '}';
        return;
      }
    }
  }

  // ensure_ascii: control characters and non-ASCII (decoded from UTF-8) as \uXXXX escapes
  static void write_string(const std::string& s, std::string& out) {
    auto escape = [&out](uint32_t cp) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", cp);
      out += buf;
    };
    out += '"';
    for (size_t i = 0; i < s.size();) {
      const unsigned char c = static_cast<unsigned char>(s[i]);
      if (c == '"') out += "\\\"";
      else if (c == '\\') out += "\\\\";
      else if (c == '\n') out += "\\n";
      else if (c == '\r') out += "\\r";
      else if (c == '\t') out += "\\t";
      else if (c == '\b') out += "\\b";
      else if (c == '\f') out += "\\f";
      else if (c < 0x20) escape(c);
      else if (c < 0x80) out += static_cast<char>(c);
      else {
        const int extra = c >= 0xF0 ? 3 : c >= 0xE0 ? 2 : c >= 0xC0 ? 1 : -1;
        if (extra < 0 || i + extra >= s.size()) {  // not a UTF-8 lead byte, or truncated: escape the byte
          escape(c);
          ++i;
          continue;
        }
        uint32_t cp = c & (0x3F >> extra);
        for (int k = 1; k <= extra; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
        if (cp >= 0x10000) {
          cp -= 0x10000;
          escape(0xD800 + (cp >> 10));
          escape(0xDC00 + (cp & 0x3FF));
        } else {
          escape(cp);
        }
        i += extra + 1;
        continue;
      }
      ++i;
    }
    out += '"';
  }

  struct Parser {
    const char* at;
    const char* end;
    void skip() {
      while (at < end && (*at == ' ' || *at == '\n' || *at == '\r' || *at == '\t')) ++at;
    }
    [[noreturn]] void fail(const char* what) { throw std::runtime_error(std::string("JSON: ") + what); }
    char peek() {
      skip();
      if (at >= end) fail("unexpected end");
      return *at;
    }
    void expect(const char* word) {
      for (; *word; ++word, ++at)
        if (at >= end || *at != *word) fail("bad literal");
    }
    static void utf8(std::string& out, uint32_t cp) {
      if (cp < 0x80) {
        out += static_cast<char>(cp);
      } else if (cp < 0x800) {
        out += static_cast<char>(0xC0 | (cp >> 6));
        out += static_cast<char>(0x80 | (cp & 0x3F));
      } else if (cp < 0x10000) {
        out += static_cast<char>(0xE0 | (cp >> 12));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (cp & 0x3F));
      } else {
        out += static_cast<char>(0xF0 | (cp >> 18));
        out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (cp & 0x3F));
      }
    }
    uint32_t hex4() {
      if (end - at < 4) fail("bad \\u escape");
      uint32_t v = 0;
      for (int i = 0; i < 4; ++i, ++at) {
        char c = *at;
        v <<= 4;
        if (c >= '0' && c <= '9') v |= c - '0';
        else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
        else fail("bad \\u escape");
      }
      return v;
    }
    std::string string() {
      ++at;  // opening quote
      std::string out;
      while (true) {
        if (at >= end) fail("unterminated string");
        char c = *at++;
        if (c == '"') return out;
        if (c != '\\') {
          out += c;
          continue;
        }
        if (at >= end) fail("bad escape");
        char e = *at++;
        switch (e) {
          case '"': out += '"'; break;
          case '\\': out += '\\'; break;
          case '/': out += '/'; break;
          case 'b': out += '\b'; break;
          case 'f': out += '\f'; break;
          case 'n': out += '\n'; break;
          case 'r': out += '\r'; break;
          case 't': out += '\t'; break;
          case 'u': {
            uint32_t cp = hex4();
            if (cp >= 0xD800 && cp < 0xDC00 && end - at >= 6 && at[0] == '\\' && at[1] == 'u') {
              at += 2;
              uint32_t low = hex4();
              cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
            }
            utf8(out, cp);
            break;
          }
          default: fail("bad escape");
        }
      }
    }
    Json value() {
      Json v;
      char c = peek();
      if (c == '{') {
        v.kind = Object;
        ++at;
        if (peek() == '}') {
          ++at;
          return v;
        }
        while (true) {
          if (peek() != '"') fail("expected a key");
          std::string key = string();
          if (peek() != ':') fail("expected ':'");
          ++at;
          v.obj[key] = value();
          char d = peek();
          ++at;
          if (d == '}') return v;
          if (d != ',') fail("expected ',' or '}'");
        }
      }
      if (c == '[') {
        v.kind = Array;
        ++at;
        if (peek() == ']') {
          ++at;
          return v;
        }
        while (true) {
          v.arr.push_back(value());
          char d = peek();
          ++at;
          if (d == ']') return v;
          if (d != ',') fail("expected ',' or ']'");
        }
      }
      if (c == '"') {
        v.kind = String;
        v.str = string();
        return v;
      }
      if (c == 't') {
        expect("true");
        v.kind = Bool;
        v.b = true;
        return v;
      }
      if (c == 'f') {
        expect("false");
        v.kind = Bool;
        return v;
      }
      if (c == 'n') {
        expect("null");
        return v;
      }
      if (c == 'N') {  // Python's json.dumps writes NaN/Infinity for non-finite estimates
        expect("NaN");
        v.kind = Number;
        v.num = 0.0 / 0.0;
        return v;
      }
      const char* start = at;
      if (*at == '-') ++at;
      if (at < end && *at == 'I') {
        expect("Infinity");
        v.kind = Number;
        v.num = (*start == '-' ? -1.0 : 1.0) * 1e308 * 10;
        return v;
      }
      while (at < end && (std::isdigit(static_cast<unsigned char>(*at)) || *at == '.' || *at == 'e' || *at == 'E' ||
                          *at == '+' || *at == '-'))
        ++at;
      if (at == start) fail("unexpected character");
      v.kind = Number;
      v.num = std::stod(std::string(start, at));
      return v;
    }
  };
};

}  // namespace maia
