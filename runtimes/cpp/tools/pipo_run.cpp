// pipo-run: generate with an export folder from the command line (like `pipo-export run`).
//
//   pipo-run FOLDER --ids 5,17,300 [--ids 1,2 ...] [--max-steps N] [--max-new-tokens N]
//            [--threshold T] [--temperature T] [--top-k K] [--top-p P] [--min-p P]
//            [--presence-penalty X] [--repetition-penalty X] [--seed S] [--stop-token-ids a,b]
//            [--threads N] [--no-share-weights] [--stream] [--json]
//
// --json prints what `pipo-export run --json` prints: one object for one prompt, or
// {"results": [...]} for several, each with pairs, confidence (null where the head was
// skipped), tokens, finish_reason, commit_rate and timings (ttft_ms, ms_per_step,
// ms_per_token, steps). Errors: one line `error: ...` on stderr, exit status 2.
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "json.h"
#include "pipo/runtime.h"

namespace {

struct Args {
  std::string folder;
  std::vector<std::vector<int64_t>> ids;
  pipo::GenerateOptions gen;
  pipo::RuntimeOptions runtime;
  bool json = false, stream = false;
};

int64_t parse_int(const std::string& text, const std::string& flag) {
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end || errno) {
    throw pipo::Error(flag + " takes an integer, got '" + text + "'");
  }
  return v;
}

double parse_double(const std::string& text, const std::string& flag) {
  char* end = nullptr;
  errno = 0;
  double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end || errno) {
    throw pipo::Error(flag + " takes a number, got '" + text + "'");
  }
  return v;
}

uint64_t parse_seed(const std::string& text) {
  if (!text.empty() && text[0] == '-') {
    throw pipo::Error("seed must be in [0, 2**64), got " + text);
  }
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(text.c_str(), &end, 10);
  if (text.empty() || *end || errno) {
    throw pipo::Error("--seed takes an integer, got '" + text + "'");
  }
  return v;
}

std::vector<int64_t> parse_ids(const std::string& text, const std::string& flag) {
  std::vector<int64_t> ids;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    size_t a = item.find_first_not_of(' '), b = item.find_last_not_of(' ');
    if (a == std::string::npos) continue;
    item = item.substr(a, b - a + 1);
    char* end = nullptr;
    errno = 0;
    long long v = std::strtoll(item.c_str(), &end, 10);
    if (*end || errno) {
      throw pipo::Error(flag + " takes comma-separated integers, got '" + text + "'");
    }
    ids.push_back(v);
  }
  if (ids.empty()) throw pipo::Error(flag + " needs at least one token id");
  return ids;
}

const char* kUsage =
    "usage: pipo-run FOLDER --ids 5,17,300 [--ids ...] [--max-steps N] [--max-new-tokens N]\n"
    "                [--threshold T] [--temperature T] [--top-k K] [--top-p P] [--min-p P]\n"
    "                [--presence-penalty X] [--repetition-penalty X] [--seed S]\n"
    "                [--stop-token-ids a,b] [--threads N] [--no-share-weights] [--stream]\n"
    "                [--json]\n";

Args parse_args(int argc, char** argv) {
  Args a;
  std::vector<std::string> rest(argv + 1, argv + argc);
  for (size_t i = 0; i < rest.size(); ++i) {
    std::string flag = rest[i], value;
    bool has_value = false;
    auto eq = flag.find('=');
    if (flag.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = flag.substr(eq + 1);
      flag = flag.substr(0, eq);
      has_value = true;
    }
    auto next = [&]() -> std::string {
      if (has_value) return value;
      if (i + 1 >= rest.size()) throw pipo::Error(flag + " needs a value");
      return rest[++i];
    };
    if (flag == "-h" || flag == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (flag == "--ids") {
      a.ids.push_back(parse_ids(next(), flag));
    } else if (flag == "--max-steps") {
      a.gen.max_steps = parse_int(next(), flag);
    } else if (flag == "--max-new-tokens") {
      a.gen.max_new_tokens = parse_int(next(), flag);
    } else if (flag == "--stop-token-ids") {
      a.gen.stop_token_ids = parse_ids(next(), flag);
    } else if (flag == "--threshold") {
      a.gen.threshold = parse_double(next(), flag);
    } else if (flag == "--temperature") {
      a.gen.sampling.temperature = parse_double(next(), flag);
    } else if (flag == "--top-k") {
      a.gen.sampling.top_k = parse_int(next(), flag);
    } else if (flag == "--top-p") {
      a.gen.sampling.top_p = parse_double(next(), flag);
    } else if (flag == "--min-p") {
      a.gen.sampling.min_p = parse_double(next(), flag);
    } else if (flag == "--presence-penalty") {
      a.gen.sampling.presence_penalty = parse_double(next(), flag);
    } else if (flag == "--repetition-penalty") {
      a.gen.sampling.repetition_penalty = parse_double(next(), flag);
    } else if (flag == "--seed") {
      a.gen.seed = parse_seed(next());
    } else if (flag == "--threads") {
      int64_t threads = parse_int(next(), flag);
      // as pipo_runtime's RunnerOptions: more than 4 threads per core only thrash
      int64_t cores = std::max<int64_t>(1, int64_t(std::thread::hardware_concurrency()));
      if (threads < 0 || threads > 4 * cores) {
        throw pipo::Error("threads must be an integer in [0, " + std::to_string(4 * cores) +
                          "] (4x the " + std::to_string(cores) + " cores here; 0 = ONNX "
                          "Runtime's default), got " + std::to_string(threads));
      }
      a.runtime.intra_op_threads = int(threads);
    } else if (flag == "--no-share-weights" && !has_value) {
      a.runtime.share_weights = false;
    } else if (flag == "--json" && !has_value) {
      a.json = true;
    } else if (flag == "--stream" && !has_value) {
      a.stream = true;
    } else if (flag.rfind("-", 0) == 0 && flag.size() > 1) {
      throw pipo::Error("unknown option " + flag + " (see pipo-run --help)");
    } else if (a.folder.empty()) {
      a.folder = flag;
    } else {
      throw pipo::Error("unexpected argument '" + flag + "' (one export folder only)");
    }
  }
  if (a.folder.empty()) throw pipo::Error("no export folder given (see pipo-run --help)");
  if (a.ids.empty()) throw pipo::Error("no prompt: pass --ids 5,17,300");
  if (!a.gen.max_steps && !a.gen.max_new_tokens) a.gen.max_steps = 16;
  return a;
}

template <class T, class F>
std::string json_list(const std::vector<T>& items, F item) {
  std::string out = "[";
  for (size_t i = 0; i < items.size(); ++i) out += (i ? ", " : "") + item(items[i]);
  return out + "]";
}

double round3(double v) { return std::round(v * 1000.0) / 1000.0; }

std::string result_json(const pipo::SequenceResult& s, const std::string& timings) {
  using pipo::json_float;
  auto id = [](int64_t v) { return std::to_string(v); };
  std::string pairs = json_list(s.pairs, [&](const std::array<int64_t, 2>& p) {
    return "[" + id(p[0]) + ", " + id(p[1]) + "]";
  });
  std::string conf = json_list(s.confidence, [](float c) {
    return c == pipo::kSkippedConfidence ? std::string("null") : json_float(double(c));
  });
  return "{\"pairs\": " + pairs + ", \"confidence\": " + conf + ", \"tokens\": " +
         json_list(s.tokens, id) + ", \"finish_reason\": " + pipo::json_quote(s.finish_reason) +
         ", \"commit_rate\": " + json_float(s.commit_rate()) + ", \"timings\": " + timings + "}";
}

std::string tokens_text(const std::vector<int64_t>& tokens) {
  std::string out;
  for (size_t i = 0; i < tokens.size(); ++i) out += (i ? ", " : "") + std::to_string(tokens[i]);
  return "[" + out + "]";
}

int run(const Args& a) {
  pipo::Runtime runtime(a.folder, a.runtime);
  bool show = a.stream && !a.json;
  bool batch = a.ids.size() > 1;
  pipo::StreamCallback on_step;
  if (show) {
    on_step = [&](const pipo::StreamEvent& e) {
      std::string piece;
      for (int64_t t : e.tokens) piece += std::to_string(t) + " ";
      if (batch) std::cout << "[" << e.row << "] " << piece << std::endl;
      else std::cout << piece << std::flush;
    };
  }
  pipo::GenerateResult r = runtime.generate_batch(a.ids, a.gen, on_step);
  if (show && !batch) std::cout << "\n";
  std::string timings = "{\"ttft_ms\": " + pipo::json_float(round3(r.ttft_ms)) +
                        ", \"ms_per_step\": " + pipo::json_float(round3(r.ms_per_step())) +
                        ", \"ms_per_token\": " + pipo::json_float(round3(r.ms_per_token())) +
                        ", \"steps\": " + std::to_string(r.steps) + "}";
  if (a.json) {
    if (!batch) {
      std::cout << result_json(r.sequences[0], timings) << std::endl;
    } else {
      std::cout << "{\"results\": "
                << json_list(r.sequences, [&](const pipo::SequenceResult& s) {
                     return result_json(s, timings);
                   })
                << "}" << std::endl;
    }
    return 0;
  }
  for (size_t i = 0; i < r.sequences.size(); ++i) {
    const pipo::SequenceResult& s = r.sequences[i];
    std::string head = batch ? "[" + std::to_string(i) + "] " : "";
    std::string pairs = json_list(s.pairs, [](const std::array<int64_t, 2>& p) {
      return "[" + std::to_string(p[0]) + ", " + std::to_string(p[1]) + "]";
    });
    char rate[32];
    std::snprintf(rate, sizeof rate, "%.2f", s.commit_rate());
    std::cout << head << "tokens: " << tokens_text(s.tokens) << "\n"
              << head << "pairs: " << pairs << "  commit rate " << rate
              << "  finish: " << s.finish_reason << "\n";
  }
  char line[160];
  std::snprintf(line, sizeof line,
                "pipo-run: time to first pair %.1f ms, %.2f ms/step, %.2f ms/token\n",
                r.ttft_ms, r.ms_per_step(), r.ms_per_token());
  std::cout << line;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const std::exception& e) {
    std::string msg = e.what();
    for (char& c : msg) {
      if (c == '\n' || c == '\r') c = ' ';  // one line, whatever ORT put in its message
    }
    std::cerr << "error: " << msg << std::endl;
    return 2;
  }
}
