// Batched linear sum assignment through pyeccv's C++ API: plain pointers and sizes, no torch.
#include <pyeccv/hungarian.h>

#include <cstdio>
#include <vector>

int main() {
  // Two 3x3 problems (row-major), the second one maximised away through a large cost.
  const std::vector<double> cost = {4, 1, 3,  2, 0, 5,  3, 2, 2,
                                    1, 9, 9,  9, 1, 9,  9, 9, 1};
  std::vector<int64_t> col_for_row(6, -7);
  std::vector<int32_t> status(2, -7);
  pyeccv::LsapProblem p;
  p.cost = cost.data();
  p.dtype = pyeccv::DType::kFloat64;
  p.batch = 2;
  p.rows = 3;
  p.cols = 3;
  p.stride_batch = 9;
  p.stride_row = 3;
  p.stride_col = 1;
  p.col_for_row = col_for_row.data();
  p.status = status.data();
  pyeccv::lsap_cpu(p, /*num_threads=*/0);
  double total = 0;
  for (int b = 0; b < 2; ++b)
    for (int i = 0; i < 3; ++i) total += cost[b * 9 + i * 3 + col_for_row[b * 3 + i]];
  std::printf("status %d %d | cols %lld %lld %lld | %lld %lld %lld | total %g\n", status[0], status[1],
              (long long)col_for_row[0], (long long)col_for_row[1], (long long)col_for_row[2],
              (long long)col_for_row[3], (long long)col_for_row[4], (long long)col_for_row[5], total);
  return (status[0] == 0 && status[1] == 0 && total == 8.0) ? 0 : 1;
}
