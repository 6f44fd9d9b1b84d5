// SHA-256 (FIPS 180-4), used to verify the files an export's manifest lists.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace pipo {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t size);
  // Lower-case hex digest (64 characters); the object must not be updated afterwards.
  std::string hex_digest();

 private:
  void block(const uint8_t* p);
  uint32_t state_[8];
  uint8_t buffer_[64];
  size_t buffered_ = 0;
  uint64_t total_bytes_ = 0;
};

// Hex SHA-256 of a whole file; throws pipo::Error when it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace pipo
