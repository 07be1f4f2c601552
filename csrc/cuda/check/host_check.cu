// Host build of the device helpers of csrc/cuda/common.cuh (Philox dropout, activations and
// their derivatives), so that tests/test_cuda_build.py can compare them with pyadapt.reference on
// a machine without a GPU: the kernels call exactly these functions. Not part of the module.
//
// Reads lines from stdin and answers one line each:
//   philox SEED OFFSET   -> the uniform's float32 bits, as an unsigned integer
//   keep SEED OFFSET P   -> the dropout factor (double) for keep probability 1 - P
//   act NAME H           -> act(H) and act'(H) in double and in float, "%.17g" each
#include <cstdio>
#include <cstring>

#include "../common.cuh"

using namespace pyadapt::cuda;

static Act parse(const char* name) {
  if (!std::strcmp(name, "relu")) return Act::Relu;
  if (!std::strcmp(name, "gelu")) return Act::Gelu;
  if (!std::strcmp(name, "quick_gelu")) return Act::QuickGelu;
  if (!std::strcmp(name, "silu")) return Act::Silu;
  return Act::Identity;
}

int main() {
  char cmd[32], name[32];
  while (std::scanf("%31s", cmd) == 1) {
    if (!std::strcmp(cmd, "philox")) {
      unsigned long long seed, offset;
      if (std::scanf("%llu %llu", &seed, &offset) != 2) return 2;
      const float u = philox_uniform(seed, offset);
      unsigned int bits;
      std::memcpy(&bits, &u, sizeof bits);
      std::printf("%u\n", bits);
    } else if (!std::strcmp(cmd, "keep")) {
      long long seed_in;
      unsigned long long offset;
      double p;
      if (std::scanf("%lld %llu %lf", &seed_in, &offset, &p) != 3) return 2;
      const int64_t seed = seed_in;
      const Dropout drop{&seed, float(p), 1.0 / (1.0 - p)};
      std::printf("%.17g\n", dropout_factor<double>(drop, offset));
    } else if (!std::strcmp(cmd, "act")) {
      double h;
      if (std::scanf("%31s %lf", name, &h) != 2) return 2;
      const Act a = parse(name);
      std::printf("%.17g %.17g %.17g %.17g\n", act_forward<double>(h, a),
                  act_derivative<double>(h, a), double(act_forward<float>(float(h), a)),
                  double(act_derivative<float>(float(h), a)));
    } else {
      return 2;
    }
  }
  return 0;
}
