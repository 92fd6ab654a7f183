// What the codec fuzzer decodes, shared with the seed generator so that the seeds stay valid
// encodings of exactly the types the fuzzer picks.
//
// An input's first byte picks a kind (modulo kKindCount); the rest are the bytes to decode.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <list>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include "multiproc/codec.hpp"

namespace multiproc_fuzz {

enum class Color : std::uint8_t { red = 1, green = 2, blue = 3 };

// Trivially copyable: travels as its bytes.
struct Point {
  double x;
  double y;
  std::int32_t id;
  Color color;
};

// A cereal type: its members go through cereal's own containers and multiproc's archive (bool
// validated, sizes bounded), including cereal's smart pointer ids and variant indices.
struct Record {
  std::string name;
  std::int32_t age = 0;
  bool active = false;
  std::vector<std::string> tags;
  std::map<std::string, std::vector<double>> scores;
  std::optional<std::int64_t> lucky;
  std::variant<std::int32_t, std::string, std::vector<std::uint8_t>> id;
  std::set<std::int32_t> seen;
  std::shared_ptr<std::string> note;
  std::unique_ptr<std::int32_t> extra;
  std::vector<bool> flags;
  std::pair<std::string, float> pair;

  template <class Archive>
  void serialize(Archive& ar) {
    ar(name, age, active, tags, scores, lucky, id, seen, note, extra, flags, pair);
  }
};

// Decode targets, one per kind. `outcome` is not a type: it decodes a task outcome
// (read_outcome_tag, then the value or outcome_error).
using Int = int;
using String = std::string;
using IntVector = std::vector<int>;
using StringVector = std::vector<std::string>;
using ScoreMap = std::map<std::string, std::vector<double>>;
using OptionalTuple = std::optional<std::tuple<int, std::string>>;
using Variant = std::variant<int, std::string, std::vector<std::uint8_t>>;
using BoolVector = std::vector<bool>;
using StringSet = std::set<std::string>;
using HashMap = std::unordered_map<std::int64_t, std::string>;
using Nested = std::deque<std::list<std::int16_t>>;
using ArrayPair = std::pair<std::array<std::string, 2>, std::optional<bool>>;
using VariantVector = std::vector<std::variant<std::monostate, double, std::string, Point>>;
using EmptyNested = std::vector<std::vector<std::monostate>>;

enum class Kind : std::uint8_t {
  int_,
  string,
  int_vector,
  string_vector,
  score_map,
  optional_tuple,
  variant,
  record,
  outcome,
  bool_vector,
  string_set,
  hash_map,
  nested,
  array_pair,
  variant_vector,
  point,
  empty_nested,
  count_,
};
inline constexpr std::size_t kKindCount = static_cast<std::size_t>(Kind::count_);

}  // namespace multiproc_fuzz
