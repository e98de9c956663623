// libFuzzer target: cluster decompression (raw deflate and zstd) of arbitrary
// streams into a cluster buffer; a success must fill the cluster exactly.
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "core/decompress.h"

using namespace qcow2img;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  static ClusterDecompressor decompressor;
  Codec codec = (data[0] & 1) ? Codec::Zstd : Codec::Deflate;
  size_t clusterSize = size_t{512} << (data[1] % 13);
  // Exactly sized, so ASan sees any write past the cluster.
  std::vector<uint8_t> output(clusterSize);
  std::vector<uint8_t> input(data + 2, data + size);
  decompressor.decompress(codec, input.data(), input.size(), output.data(), output.size());
  return 0;
}
