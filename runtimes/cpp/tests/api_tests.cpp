// pipo-api-tests EXPORT_FOLDER: the public C++ API (pipo/runtime.h) on a real export.
//
// Checks what the CLI cannot reach: streaming equals the final result, a batch row equals the
// same prompt alone with seq_offset, max_new_tokens / stop ids, shared vs unshared weights,
// and the errors generate() throws. Prints one line per check and "N passed, N failed".
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "pipo/runtime.h"

namespace {

int passed = 0, failed = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  (ok ? passed : failed) += 1;
}

// The message generate() throws, or "" when it does not throw.
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const pipo::Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

pipo::GenerateOptions sampled(int64_t steps) {
  pipo::GenerateOptions o;
  o.max_steps = steps;
  o.threshold = 0.5;
  o.sampling.temperature = 1.0;
  o.sampling.top_k = 20;
  o.sampling.top_p = 0.95;
  o.sampling.presence_penalty = 1.5;
  o.seed = 8;
  return o;
}

std::vector<int64_t> range(int64_t a, int64_t b) {
  std::vector<int64_t> v;
  for (int64_t i = a; i < b; ++i) v.push_back(i);
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: pipo-api-tests EXPORT_FOLDER\n");
    return 2;
  }
  try {
    pipo::Runtime runtime(argv[1]);
    std::vector<std::vector<int64_t>> prompts = {{5, 17, 300}, range(40, 51), range(7, 40)};

    // streaming yields exactly the tokens generate returns, step by step in order
    std::vector<std::vector<int64_t>> streamed(prompts.size());
    int64_t last_step = -1;
    bool ordered = true;
    auto on_step = [&](const pipo::StreamEvent& e) {
      ordered = ordered && e.step >= last_step;
      last_step = e.step;
      auto& row = streamed[size_t(e.row)];
      row.insert(row.end(), e.tokens.begin(), e.tokens.end());
    };
    pipo::GenerateResult batch = runtime.generate_batch(prompts, sampled(9), on_step);
    bool same = batch.sequences.size() == prompts.size();
    for (size_t r = 0; same && r < prompts.size(); ++r) {
      same = streamed[r] == batch.sequences[r].tokens;
    }
    check(same && ordered && batch.steps == 9, "stream == generate, steps in order");

    // a batch row equals the prompt alone with seq_offset = row (padding does not leak)
    for (size_t r = 0; r < prompts.size(); ++r) {
      pipo::GenerateOptions o = sampled(9);
      o.seq_offset = int64_t(r);
      pipo::SequenceResult alone = runtime.generate(prompts[r], o).sequences.at(0);
      check(alone.pairs == batch.sequences[r].pairs,
            "batch row " + std::to_string(r) + " == alone");
    }

    // max_new_tokens cuts the tokens; a stop id ends the row before it
    pipo::GenerateOptions greedy;
    greedy.max_steps = 8;
    pipo::SequenceResult full = runtime.generate({5, 17, 300}, greedy).sequences.at(0);
    pipo::GenerateOptions cap;
    cap.max_new_tokens = 5;
    pipo::SequenceResult cut = runtime.generate({5, 17, 300}, cap).sequences.at(0);
    check(cut.tokens == std::vector<int64_t>(full.tokens.begin(), full.tokens.begin() + 5) &&
              cut.finish_reason == "length",
          "max_new_tokens = 5");
    pipo::GenerateOptions stop = greedy;
    stop.stop_token_ids = {full.tokens.at(6)};
    pipo::SequenceResult stopped = runtime.generate({5, 17, 300}, stop).sequences.at(0);
    size_t first = 0;
    while (full.tokens[first] != full.tokens[6]) ++first;
    std::vector<int64_t> before(full.tokens.begin(), full.tokens.begin() + long(first));
    check(stopped.finish_reason == "stop" && stopped.tokens == before, "stop id ends the row");

    // weights loaded per session give the same tokens as the shared mapping
    pipo::RuntimeOptions unshared;
    unshared.share_weights = false;
    pipo::Runtime plain(argv[1], unshared);
    pipo::GenerateResult unshared_result = plain.generate_batch(prompts, sampled(9));
    check(unshared_result.sequences.at(1).pairs == batch.sequences[1].pairs &&
              runtime.shared_weight_bytes() > 0 && plain.shared_weight_bytes() == 0,
          "share_weights on/off: same pairs");

    // errors generate() throws
    pipo::GenerateOptions none;
    check(contains(error_of([&] { runtime.generate(std::vector<int64_t>{}, greedy); }),
                   "empty prompt"),
          "empty prompt");
    check(contains(error_of([&] { runtime.generate({5}, none); }),
                   "give max_steps or max_new_tokens"),
          "no step limit");
    check(contains(error_of([&] { runtime.generate({5, runtime.model().vocab_size}, greedy); }),
                   "outside the vocabulary"),
          "id out of range");
    pipo::GenerateOptions longer;
    longer.max_steps = runtime.model().max_context;
    check(contains(error_of([&] { runtime.generate({5}, longer); }), "tokens of context"),
          "context exceeded");
    pipo::GenerateOptions bad = greedy;
    bad.sampling.top_p = 0;
    check(contains(error_of([&] { runtime.generate({5}, bad); }), "top_p must be in (0, 1]"),
          "bad top_p");
    check(runtime.generate({5, 17, 300}, greedy).sequences.at(0).pairs == full.pairs,
          "runtime still usable after errors");
  } catch (const std::exception& e) {
    std::printf("FAIL unexpected error: %s\n", e.what());
    ++failed;
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
