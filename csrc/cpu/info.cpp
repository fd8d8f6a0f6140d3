#include <string>

#include "pyeccv/common.h"

namespace pyeccv {

#ifndef PYECCV_HAS_CUDA
bool cuda_compiled() { return false; }
#endif

const char* build_info() {
  static const std::string info = [] {
    std::string s = "compiler=";
#if defined(__clang__)
    s += "clang " __clang_version__;
#elif defined(__GNUC__)
    s += "gcc " __VERSION__;
#else
    s += "unknown";
#endif
#ifdef PYECCV_HAS_OPENMP
    s += "; openmp=yes";
#else
    s += "; openmp=no";
#endif
#ifdef PYECCV_HAS_CUDA
    s += "; cuda=yes";
#else
    s += "; cuda=no";
#endif
    return s;
  }();
  return info.c_str();
}

}  // namespace pyeccv
