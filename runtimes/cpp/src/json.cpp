#include "json.h"

#include <charconv>
#include <cmath>
#include <cstdlib>

#include "pipo/runtime.h"

namespace pipo {

class JsonParser {
 public:
  JsonParser(const std::string& text, const std::string& where) : s_(text), where_(where) {}

  Json document() {
    Json v = value(0);
    skip_space();
    if (i_ != s_.size()) fail("extra data after the document");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& why) const {
    size_t line = 1, col = 1;
    for (size_t k = 0; k < i_ && k < s_.size(); ++k) {
      if (s_[k] == '\n') { ++line; col = 1; } else { ++col; }
    }
    throw Error(where_ + ": not valid JSON (" + why + ": line " + std::to_string(line) +
                " column " + std::to_string(col) + ")");
  }
  void skip_space() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r'))
      ++i_;
  }
  bool eat(char c) {
    skip_space();
    if (i_ < s_.size() && s_[i_] == c) { ++i_; return true; }
    return false;
  }
  void expect(char c) {
    if (!eat(c)) fail(std::string("expected '") + c + "'");
  }
  bool literal(const char* word) {
    size_t n = std::char_traits<char>::length(word);
    if (s_.compare(i_, n, word) != 0) return false;
    i_ += n;
    return true;
  }

  Json value(int depth) {
    if (depth > 256) fail("nesting too deep");
    skip_space();
    if (i_ >= s_.size()) fail("unexpected end");
    Json v;
    char c = s_[i_];
    if (c == '{') {
      ++i_;
      v.type_ = Json::Type::Object;
      if (eat('}')) return v;
      do {
        skip_space();
        if (i_ >= s_.size() || s_[i_] != '"') fail("expected a string key");
        std::string key = string();
        expect(':');
        v.object_[key] = value(depth + 1);
      } while (eat(','));
      expect('}');
    } else if (c == '[') {
      ++i_;
      v.type_ = Json::Type::Array;
      if (eat(']')) return v;
      do { v.array_.push_back(value(depth + 1)); } while (eat(','));
      expect(']');
    } else if (c == '"') {
      v.type_ = Json::Type::String;
      v.string_ = string();
    } else if (literal("true") || literal("false")) {
      v.type_ = Json::Type::Bool;
      v.bool_ = c == 't';
    } else if (literal("null")) {
      v.type_ = Json::Type::Null;
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      number(v);
    } else if (literal("NaN") || literal("Infinity") || literal("-Infinity")) {
      v.type_ = Json::Type::Number;  // Python's json.dumps writes these
      v.number_ = c == 'N' ? NAN : (c == '-' ? -INFINITY : INFINITY);
    } else {
      fail("unexpected character");
    }
    return v;
  }

  void number(Json& v) {
    size_t start = i_;
    if (s_[i_] == '-') ++i_;
    bool integral = true;
    auto digits = [&] {
      size_t from = i_;
      while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') ++i_;
      if (i_ == from) fail("bad number");
    };
    digits();
    if (i_ < s_.size() && s_[i_] == '.') { ++i_; integral = false; digits(); }
    if (i_ < s_.size() && (s_[i_] == 'e' || s_[i_] == 'E')) {
      ++i_; integral = false;
      if (i_ < s_.size() && (s_[i_] == '+' || s_[i_] == '-')) ++i_;
      digits();
    }
    std::string text = s_.substr(start, i_ - start);
    v.type_ = Json::Type::Number;
    v.number_ = std::strtod(text.c_str(), nullptr);
    if (integral) {
      auto r = std::from_chars(text.data(), text.data() + text.size(), v.int_);
      v.integral_ = r.ec == std::errc();
    }
  }

  void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6)); out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12)); out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18)); out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F)); out += char(0x80 | (cp & 0x3F));
    }
  }

  uint32_t hex4() {
    if (i_ + 4 > s_.size()) fail("bad \\u escape");
    uint32_t cp = 0;
    for (int k = 0; k < 4; ++k) {
      char h = s_[i_++];
      cp <<= 4;
      if (h >= '0' && h <= '9') cp |= uint32_t(h - '0');
      else if (h >= 'a' && h <= 'f') cp |= uint32_t(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') cp |= uint32_t(h - 'A' + 10);
      else fail("bad \\u escape");
    }
    return cp;
  }

  std::string string() {
    ++i_;  // opening quote
    std::string out;
    while (true) {
      if (i_ >= s_.size()) fail("unterminated string");
      char c = s_[i_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (c != '\\') { out += c; continue; }
      if (i_ >= s_.size()) fail("unterminated string");
      char e = s_[i_++];
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
          if (cp >= 0xD800 && cp < 0xDC00 && s_.compare(i_, 2, "\\u") == 0) {
            i_ += 2;
            uint32_t low = hex4();
            if (low < 0xDC00 || low > 0xDFFF) fail("bad surrogate pair");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default: fail("bad escape");
      }
    }
  }

  const std::string& s_;
  const std::string& where_;
  size_t i_ = 0;
};

Json Json::parse(const std::string& text, const std::string& where) {
  return JsonParser(text, where).document();
}

namespace {
[[noreturn]] void wrong_type(const std::string& what, const char* expected) {
  throw Error(what + " is not " + expected);
}
}  // namespace

bool Json::as_bool(const std::string& what) const {
  if (type_ != Type::Bool) wrong_type(what, "a boolean");
  return bool_;
}
double Json::as_double(const std::string& what) const {
  if (type_ != Type::Number) wrong_type(what, "a number");
  return number_;
}
int64_t Json::as_int(const std::string& what) const {
  if (type_ != Type::Number || !integral_) wrong_type(what, "an integer");
  return int_;
}
const std::string& Json::as_string(const std::string& what) const {
  if (type_ != Type::String) wrong_type(what, "a string");
  return string_;
}
const std::vector<Json>& Json::as_array(const std::string& what) const {
  if (type_ != Type::Array) wrong_type(what, "an array");
  return array_;
}
const std::map<std::string, Json>& Json::as_object(const std::string& what) const {
  if (type_ != Type::Object) wrong_type(what, "an object");
  return object_;
}
bool Json::has(const std::string& key) const {
  return type_ == Type::Object && object_.count(key) > 0;
}
const Json& Json::at(const std::string& key, const std::string& what) const {
  auto& obj = as_object(what);
  auto it = obj.find(key);
  if (it == obj.end()) throw Error(what + ": missing '" + key + "'");
  return it->second;
}

std::string json_quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += char(c);
        }
    }
  }
  return out + "\"";
}

std::string json_float(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, v);  // shortest round-trip, like Python repr
  std::string s(buf, r.ptr);
  // Python repr: exponent form only outside [1e-4, 1e16); digits with ".0" when integral
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  auto e = s.find('e');
  if (e != std::string::npos) {
    double a = std::fabs(v);
    if (a >= 1e-4 && a < 1e16) {  // to_chars chose scientific but Python would not
      r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::fixed);
      s.assign(buf, r.ptr);
      if (s.find('.') == std::string::npos) s += ".0";
    } else {  // Python writes e-05 / e+16 with at least two exponent digits and a sign
      std::string mant = s.substr(0, e), exp = s.substr(e + 1);
      char sign = exp[0] == '-' ? '-' : '+';
      if (exp[0] == '-' || exp[0] == '+') exp = exp.substr(1);
      if (exp.size() < 2) exp = "0" + exp;
      s = mant + "e" + sign + exp;
    }
  }
  return s;
}

}  // namespace pipo
