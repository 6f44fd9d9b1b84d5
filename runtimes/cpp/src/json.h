// A small JSON reader (RFC 8259) for manifest.json, and helpers to write JSON output.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace pipo {

class Json {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  // Parse a whole document; throws pipo::Error("<where>: not valid JSON (...)").
  static Json parse(const std::string& text, const std::string& where);

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_number() const { return type_ == Type::Number; }
  bool is_string() const { return type_ == Type::String; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_object() const { return type_ == Type::Object; }

  // Typed access; throws pipo::Error naming `what` when the value has another type.
  bool as_bool(const std::string& what) const;
  double as_double(const std::string& what) const;
  int64_t as_int(const std::string& what) const;  // numbers written without fraction/exponent
  const std::string& as_string(const std::string& what) const;
  const std::vector<Json>& as_array(const std::string& what) const;
  const std::map<std::string, Json>& as_object(const std::string& what) const;

  bool has(const std::string& key) const;  // object with that key
  // Object member; throws pipo::Error("<what>: missing '<key>'") when absent.
  const Json& at(const std::string& key, const std::string& what) const;

 private:
  friend class JsonParser;
  Type type_ = Type::Null;
  bool bool_ = false;
  double number_ = 0;
  bool integral_ = false;  // the number was written as an integer
  int64_t int_ = 0;
  std::string string_;
  std::vector<Json> array_;
  std::map<std::string, Json> object_;
};

// Writing: a JSON string literal, and numbers formatted like Python's json.dumps
// (shortest round-trip repr; integral floats keep ".0").
std::string json_quote(const std::string& s);
std::string json_float(double v);

}  // namespace pipo
