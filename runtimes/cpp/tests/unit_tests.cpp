// pipo-unit-tests: the C++ runtime's RNG and SHA-256 against Python's.
//
//   pipo-unit-tests                          built-in vectors (exit 1 on a mismatch; ctest)
//   pipo-unit-tests rng SEED SEQ STEP SLOT [SEED SEQ STEP SLOT ...]
//                                            one line per quadruple: the uniform (float32)
//                                            as Python's repr (pytest compares with
//                                            pipo_graphs.rng.uniform)
//   pipo-unit-tests sha256 FILE [FILE ...]   one hex digest per line (pytest: hashlib)
//   pipo-unit-tests json-float X [X ...]     each X as Python's json.dumps would write it
//
// The built-in vectors were computed with pipo_graphs.rng.uniform and hashlib.sha256.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "json.h"
#include "rng.h"
#include "sha256.h"

namespace {

int passes = 0, failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  (ok ? passes : failures) += 1;
}

struct RngCase {
  uint64_t seed, seq, step, slot;
  float expected;
};

const RngCase kRng[] = {
    {0u, 0u, 0u, 0u, 0.7581141591072083f},
    {0u, 0u, 0u, 1u, 0.6008881330490112f},
    {11u, 1u, 5u, 0u, 0.4602767825126648f},
    {11u, 1u, 5u, 1u, 0.8045483231544495f},
    {23u, 2u, 9u, 1u, 0.23760199546813965f},
    {18446744073709551615u, 3u, 7u, 0u, 0.7029119729995728f},
    {123456789u, 1000u, 4095u, 1u, 0.781293511390686f},
    {9223372036854775808u, 0u, 1u, 0u, 0.07898211479187012f},
};

std::string sha_of(const std::string& data) {
  pipo::Sha256 h;
  h.update(data.data(), data.size());
  return h.hex_digest();
}

int builtin() {
  for (const RngCase& c : kRng) {
    float got = pipo::uniform(c.seed, c.seq, c.step, c.slot);
    check(got == c.expected, "uniform(" + std::to_string(c.seed) + ", " +
                                 std::to_string(c.seq) + ", " + std::to_string(c.step) + ", " +
                                 std::to_string(c.slot) + ")");
  }
  std::vector<float> u(4);
  pipo::step_uniforms(11, {0, 1}, 5, u.data());
  check(u[2] == kRng[2].expected && u[3] == kRng[3].expected, "step_uniforms row 1 = seq 1");

  check(sha_of("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "sha256('')");
  check(sha_of("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "sha256('abc')");
  std::string million(1000000, 'a');
  check(sha_of(million) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0",
        "sha256('a' * 10**6)");
  pipo::Sha256 pieces;  // the same bytes fed in uneven chunks
  for (size_t i = 0, n = 1; i < million.size(); i += n, n = n * 7 % 1000 + 1) {
    pieces.update(million.data() + i, std::min(n, million.size() - i));
  }
  check(pieces.hex_digest() == sha_of(million), "sha256 chunked == one shot");

  check(pipo::json_float(1.0) == "1.0" && pipo::json_float(0.5) == "0.5" &&
            pipo::json_float(0.0001) == "0.0001" && pipo::json_float(1e-05) == "1e-05" &&
            pipo::json_float(double(0.42031714f)) == "0.420317143201828",
        "json_float like Python repr");
  pipo::Json j = pipo::Json::parse(R"({"a": [1, -2, 3.5e1, "x\u00e9\n"], "b": {"c": null}})", "t");
  check(j.at("a", "t").as_array("a")[1].as_int("a1") == -2 &&
            j.at("a", "t").as_array("a")[2].as_double("a2") == 35.0 &&
            j.at("a", "t").as_array("a")[3].as_string("a3") == "x\xc3\xa9\n" &&
            j.at("b", "t").at("c", "b").is_null(),
        "json parse");
  bool threw = false;
  try {
    pipo::Json::parse("{\"a\": [1, }", "bad.json");
  } catch (const std::exception& e) {
    threw = std::string(e.what()).find("bad.json: not valid JSON") == 0;
  }
  check(threw, "json error names the file");

  std::printf("%d passed, %d failed\n", passes, failures);
  return failures ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc == 1) return builtin();
    std::string cmd = argv[1];
    if (cmd == "rng" && argc > 2 && (argc - 2) % 4 == 0) {
      auto u = [&](int i) { return std::strtoull(argv[i], nullptr, 10); };
      for (int i = 2; i < argc; i += 4) {
        float x = pipo::uniform(u(i), u(i + 1), u(i + 2), u(i + 3));
        std::printf("%s\n", pipo::json_float(double(x)).c_str());
      }
      return 0;
    }
    if (cmd == "sha256" && argc > 2) {
      for (int i = 2; i < argc; ++i) std::printf("%s\n", pipo::sha256_file(argv[i]).c_str());
      return 0;
    }
    if (cmd == "json-float" && argc > 2) {
      for (int i = 2; i < argc; ++i) {
        std::printf("%s\n", pipo::json_float(std::strtod(argv[i], nullptr)).c_str());
      }
      return 0;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
  std::fprintf(stderr,
               "usage: pipo-unit-tests [rng SEED SEQ STEP SLOT | sha256 FILE | json-float X]\n");
  return 2;
}
