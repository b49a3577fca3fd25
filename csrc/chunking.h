// The fixed table of work items every kernel iterates over.
//
// Every non-empty tensor is cut into chunks of at most `chunk_elems` elements;
// the table lists them tensor by tensor, in order. The boundaries depend only
// on the tensor sizes and the chunk length, never on the number of threads or
// blocks, so every partial sum, and therefore every result, is bitwise
// reproducible. Zero-element tensors own no chunks but keep their own index:
// output rows are always indexed by the tensor's position in the input list.
#pragma once

#include <ATen/core/Tensor.h>
#include <cstdint>
#include <vector>

namespace regext {

// Elements per chunk, on every backend: big enough that a chunk amortizes its
// bookkeeping (one CUDA block, one task of at::parallel_for), small enough that
// 500 small tensors and one huge tensor both spread over all cores.
constexpr int64_t kChunkElems = int64_t{1} << 15;

struct Chunk {
  int64_t tensor;  // position in the input list
  int64_t begin;   // first element, counted in the tensor's memory order
  int64_t length;  // number of elements, 1..chunk_elems
};

struct ChunkTable {
  std::vector<Chunk> chunks;
  // chunks of tensor t are chunks[first_chunk[t] .. first_chunk[t + 1]).
  std::vector<int64_t> first_chunk;
};

inline ChunkTable make_chunk_table(at::TensorList tensors, int64_t chunk_elems) {
  ChunkTable table;
  table.first_chunk.reserve(tensors.size() + 1);
  for (size_t t = 0; t < tensors.size(); ++t) {
    table.first_chunk.push_back(static_cast<int64_t>(table.chunks.size()));
    const int64_t n = tensors[t].numel();
    for (int64_t begin = 0; begin < n; begin += chunk_elems) {
      table.chunks.push_back({static_cast<int64_t>(t), begin, std::min(chunk_elems, n - begin)});
    }
  }
  table.first_chunk.push_back(static_cast<int64_t>(table.chunks.size()));
  return table;
}

}  // namespace regext
